"""MariaDB / MySQL binlog source (mysql-replication + PyMySQL).

Positions: on MariaDB the GTID state (``{"gtid": "0-1-42,1-2-7", "file": ..., "pos": ...}``; one GTID per
replication domain), on MySQL the binlog file and position. A transaction is complete at its ``XID`` event
(or a ``COMMIT`` query for non-transactional engines, or the end of a standalone DDL event group); only then is
its position handed to the runner, so checkpoints always sit on transaction boundaries.

mysql-replication 1.0.17 quirks handled here (see docs/cdc.md): with ``is_mariadb=True`` it ignores
``log_file``/``log_pos`` and its internal reconnect re-sends the GTID it *started* from (replaying everything
since), so after each commit ``auto_position`` is advanced on the reader object; it is used in blocking mode
and every other disconnection ends the stream (:class:`~cachesync.cdc.base.Disconnected`) so that the runner's
own reconnect loop resumes from the last checkpoint.

Read inline (:attr:`MySQLSource.inline`, :meth:`MySQLSource.stream_marks`): the stream connection's packet read is
wrapped so that, between two transactions, it first checks whether a byte can be read without waiting (PyMySQL's
buffered reader, then a non-blocking peek of the socket); if not it raises before reading anything (the library's
state stays that of a packet boundary), the stream yields its ``None`` mark and waits in ``select`` (0.2 s at
most) -- so the runner applies a lone commit at once and can stop while idle, with no reader thread.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Iterator, Mapping
from typing import Any
from urllib.parse import unquote, urlsplit

from .._driver import encode_userinfo, redact_url, scrub
from ..db import MYSQL, dialect_of
from .._driver import wait_readable
from .base import CdcConfigError, Change, Disconnected, PositionLost, Source, Transaction

log = logging.getLogger("cachesync.cdc.mysql")

REQUIRED_SETTINGS = (
    ("log_bin", "ON", "start the server with --log-bin (binary logging is off)"),
    ("binlog_format", "ROW", "set binlog_format=ROW (row events carry the changed rows)"),
    ("binlog_row_image", "FULL", "set binlog_row_image=FULL (old row images with every column, for key changes)"),
    ("binlog_row_metadata", "FULL",
     "set binlog_row_metadata=FULL (otherwise row events carry UNKNOWN_COL0.. instead of column names)"),
)

_TRUNCATE = re.compile(r"^\s*TRUNCATE\s+(?:TABLE\s+)?(?:`?([\w$]+)`?\s*\.\s*)?`?([\w$]+)`?\s*;?\s*$", re.I)
_NAME = r"(?:`[^`]+`|[\w$]+)(?:\s*\.\s*(?:`[^`]+`|[\w$]+))?"
_COMMENT = re.compile(r"/\*.*?\*/", re.S)
_DROP = re.compile(rf"^\s*DROP\s+TABLE\s+(?:IF\s+EXISTS\s+)?((?:{_NAME})(?:\s*,\s*{_NAME})*)"
                   r"(?:\s+(?:RESTRICT|CASCADE))?\s*;?\s*$", re.I)
_RENAME = re.compile(rf"^\s*RENAME\s+TABLES?\s+((?:{_NAME})\s+TO\s+(?:{_NAME})"
                     rf"(?:\s*,\s*(?:{_NAME})\s+TO\s+(?:{_NAME}))*)\s*;?\s*$", re.I)
_ALTER = re.compile(rf"^\s*ALTER\s+(?:ONLINE\s+|IGNORE\s+)*TABLE\s+(?:IF\s+EXISTS\s+)?({_NAME})\s+(.*)$", re.I | re.S)
_ALTER_RENAME = re.compile(rf"(?:^|,)\s*RENAME\s+(?:TO\s+|AS\s+)?({_NAME})\s*(?:,|;?\s*$)", re.I)


def _split_name(name: str, default_schema: str | None) -> tuple[str | None, str]:
    parts = [p.strip().strip("`") for p in re.findall(r"`[^`]+`|[\w$]+", name)]
    return (parts[0], parts[1]) if len(parts) == 2 else (default_schema, parts[0])


def truncated_table(query: str, default_schema: str | None) -> tuple[str | None, str] | None:
    """``(schema, table)`` of a ``TRUNCATE [TABLE] [db.]t`` statement (a QueryEvent in the binlog), else None."""
    m = _TRUNCATE.match(query)
    if m is None:
        return None
    return (m.group(1) or default_schema), m.group(2)


def ddl_tables(query: str, default_schema: str | None) -> list[tuple[str | None, str]]:
    """``(schema, table)`` of every table whose rows a DDL statement of the binlog makes disappear or replaces:
    ``TRUNCATE``, ``DROP TABLE [IF EXISTS] a, b`` (not ``DROP TEMPORARY``), ``RENAME TABLE a TO b, ...`` and
    ``ALTER TABLE a ... RENAME [TO|AS] b`` (both names of a rename: the old name's rows are gone, and whatever was
    cached under the new name belonged to another table). ``[]`` for any other statement."""
    tt = truncated_table(query, default_schema)
    if tt is not None:
        return [tt]
    q = _COMMENT.sub(" ", query)
    m = _DROP.match(q)
    if m is not None:
        return [_split_name(n, default_schema) for n in re.findall(_NAME, m.group(1))]
    m = _RENAME.match(q)
    if m is not None:
        names = re.split(r"\s+TO\s+|\s*,\s*", m.group(1).strip(), flags=re.I)
        return [_split_name(n, default_schema) for n in names if n]
    m = _ALTER.match(q)
    if m is not None:
        r = _ALTER_RENAME.search(m.group(2))
        if r is not None:
            return [_split_name(m.group(1), default_schema), _split_name(r.group(1), default_schema)]
    return []


ER_MASTER_FATAL_ERROR_READING_BINLOG = 1236
ER_CONNECTION_KILLED_DUPLICATE_SERVER_ID = 4052
ACCESS_ERRORS = (1044, 1045, 1142, 1227, 1524, 1698)


def check_settings(variables: Mapping[str, str]) -> list[str]:
    """Problems with the server ``variables`` (``SHOW VARIABLES`` output, names lower case) for CDC, each
    naming the setting; an empty list when everything is right."""
    problems = []
    v = {k.lower(): str(val) for k, val in variables.items()}
    for name, want, how in REQUIRED_SETTINGS:
        got = v.get(name)
        if got is None:
            if name == "binlog_row_metadata":
                problems.append(f"{name} does not exist on this server (MariaDB >= 10.5 / MySQL >= 8.0.14 needed): "
                                "row events would carry no column names")
            else:
                problems.append(f"{name} is not reported by the server; {how}")
        elif got.upper() != want:
            problems.append(f"{name} is {got!r}, must be {want!r}: {how}")
    return problems


def _s(v: Any) -> str | None:
    if v is None:
        return None
    return v.decode() if isinstance(v, bytes) else str(v)


def _parse_gtids(s: str) -> dict[int, str]:
    out: dict[int, str] = {}
    for part in (p.strip() for p in s.split(",")):
        if part:
            out[int(part.split("-", 1)[0])] = part
    return out


class _WouldBlock(Exception):
    """Raised by the stream connection's packet read, before it reads anything, when no packet has arrived."""


def _has_data(conn: Any) -> bool:
    """Whether PyMySQL connection ``conn`` can read a byte without waiting: in its buffered reader already, or
    readable from the socket now (a non-blocking peek). True also when the connection is closed or broken (the read
    then raises as it would have)."""
    rf, sock = getattr(conn, "_rfile", None), getattr(conn, "_sock", None)
    if rf is None or sock is None:
        return True
    try:
        timeout = sock.gettimeout()
        sock.settimeout(0.0)
        try:
            return bool(rf.peek(1))  # b"": nothing buffered and the socket would block (or end of stream)
        finally:
            sock.settimeout(timeout)
    except (OSError, ValueError):
        return True


def _pymysql_connect(**kw: Any) -> Any:
    """PyMySQL connect for mysql-replication, which still passes the deprecated ``db``/``passwd`` names."""
    import pymysql

    if "db" in kw:
        kw["database"] = kw.pop("db")
    if "passwd" in kw:
        kw["password"] = kw.pop("passwd")
    return pymysql.connect(**kw)


class MySQLSource(Source):
    """Reads row events from a MariaDB/MySQL binlog as a replica with ``server_id`` (unique per reader).

    ``db_url``: ``mysql://user:pass@host:port/db`` (only tables of that database are read); ``tables``: the
    table names to read (default: all); ``connect_timeout`` (default 5.0 s).
    """

    kind = "mysql"
    inline = True  # read in the runner's thread (stream_marks: a None before it would wait for the server)

    def __init__(self, db_url: str, server_id: int, tables: list[str] | None = None, *,
                 connect_timeout: float = 5.0) -> None:
        if dialect_of(db_url) is not MYSQL:
            raise CdcConfigError(f"database URL {redact_url(db_url)!r} is not a mysql:// or mariadb:// URL")
        if not isinstance(server_id, int) or not 1 <= server_id < 2**32:
            raise CdcConfigError(f"server_id must be an integer in 1..4294967295, got {server_id!r}")
        p = urlsplit(encode_userinfo(db_url))  # a password may hold unencoded "/", "#", "?" or "@"
        self.url = redact_url(db_url)
        try:
            self.host, self.port = p.hostname or "127.0.0.1", p.port or 3306
        except ValueError as e:
            raise CdcConfigError(f"database URL {self.url!r}: {scrub(e, db_url)}") from None
        self.user, self.password = unquote(p.username or "root"), unquote(p.password or "")
        self.db = p.path.lstrip("/")
        if not self.db:
            raise CdcConfigError(f"database URL {self.url!r}: name the database (mysql://user@host/db)")
        self.server_id = server_id
        self.tables = sorted({t.split(".")[-1] for t in tables}) if tables else None
        self.connect_timeout = connect_timeout
        self.mariadb: bool | None = None
        self._lock = threading.Lock()
        self._reader: Any = None
        self._closed = False
        self._undecodable = 0
        self.connection_id: int | None = None
        """Server-side id of the current binlog connection (for monitoring and tests)."""

    @property
    def ident(self) -> str:
        return f"mysql:{self.host}:{self.port}/{self.db}"

    def counters(self) -> dict[str, int]:
        """``undecodable_events``: row events the binlog decoder could not read; each invalidated every key of
        its table instead."""
        return {"undecodable_events": self._undecodable}

    def _settings(self) -> dict[str, Any]:
        return {"host": self.host, "port": self.port, "user": self.user, "password": self.password,
                "connect_timeout": self.connect_timeout}

    def _connect(self) -> Any:
        import pymysql

        try:
            return pymysql.connect(host=self.host, port=self.port, user=self.user, password=self.password,
                                   connect_timeout=self.connect_timeout, autocommit=True)
        except pymysql.err.OperationalError as e:
            code = e.args[0] if e.args else 0
            if code in ACCESS_ERRORS:
                raise CdcConfigError(f"cannot log in to {self.url}: {self._scrub(e.args[-1])}") from None
            raise Disconnected(f"cannot connect to {self.url}: {self._scrub(e.args[-1])}") from None

    def _scrub(self, msg: object) -> str:
        """A driver message without the password (a driver may echo it)."""
        return scrub(msg, secrets=[self.password] if self.password else [])

    def check(self) -> None:
        """Binlog settings (:func:`check_settings`) and the replication privileges of the user."""
        conn = self._connect()
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT VERSION()")
                self.mariadb = "mariadb" in str(cur.fetchone()[0]).lower()
                cur.execute("SHOW GLOBAL VARIABLES WHERE Variable_name IN "
                            "('log_bin','binlog_format','binlog_row_image','binlog_row_metadata')")
                variables = {str(k).lower(): str(v) for k, v in cur.fetchall()}
                problems = check_settings(variables)
                if problems:
                    raise CdcConfigError(f"MariaDB/MySQL at {self.url} is not set up for CDC: " + "; ".join(problems))
                cur.execute("SHOW GRANTS")
                grants = " ".join(str(r[0]).upper() for r in cur.fetchall())
        finally:
            conn.close()
        missing = [g for g, alts in (("REPLICATION SLAVE", ("REPLICATION SLAVE", "REPLICATION REPLICA")),
                                     ("REPLICATION CLIENT", ("REPLICATION CLIENT", "BINLOG MONITOR")))
                   if not any(a in grants for a in alts) and "ALL PRIVILEGES ON *.*" not in grants]
        if missing:
            raise CdcConfigError(
                f"user {self.user!r} at {self.url} lacks the privilege(s) {', '.join(missing)} needed to read "
                f"the binlog: GRANT REPLICATION SLAVE, REPLICATION CLIENT ON *.* TO '{self.user}'@'%'")

    def current_position(self) -> dict[str, Any]:
        conn = self._connect()
        try:
            with conn.cursor() as cur:
                if self.mariadb is None:
                    cur.execute("SELECT VERSION()")
                    self.mariadb = "mariadb" in str(cur.fetchone()[0]).lower()
                pos: dict[str, Any] = {}
                if self.mariadb:
                    cur.execute("SELECT @@GLOBAL.gtid_binlog_pos")
                    pos["gtid"] = str(cur.fetchone()[0] or "")
                try:
                    cur.execute("SHOW BINARY LOG STATUS" if not self.mariadb else "SHOW MASTER STATUS")
                except Exception:
                    cur.execute("SHOW MASTER STATUS")
                row = cur.fetchone()
                if row is None:
                    raise CdcConfigError(f"binary logging is off at {self.url}: start the server with --log-bin")
                pos["file"], pos["pos"] = str(row[0]), int(row[1])
                return pos
        finally:
            conn.close()

    def stream(self, position: dict[str, Any]) -> Iterator[Transaction]:
        for t in self._stream(position, False):
            if t is not None:
                yield t

    def stream_marks(self, position: dict[str, Any]) -> Iterator[Transaction | None]:
        """:meth:`stream` with a ``None`` between two transactions whenever the next binlog packet has not arrived
        yet (checked before each packet is read: in the socket's buffer, or readable without waiting), before it
        waits for it -- at most 0.2 s at a time, then ``None`` again."""
        return self._stream(position, True)

    def _stream(self, position: dict[str, Any], marks: bool) -> Iterator[Transaction | None]:
        import pymysql
        from pymysqlreplication import BinLogStreamReader
        from pymysqlreplication.event import MariadbGtidEvent, QueryEvent, XidEvent
        from pymysqlreplication.row_event import DeleteRowsEvent, UpdateRowsEvent, WriteRowsEvent

        if self.mariadb is None:
            self.current_position()
        gtids = _parse_gtids(str(position.get("gtid", ""))) if self.mariadb else {}
        kw: dict[str, Any] = {}
        if self.mariadb:
            kw.update(is_mariadb=True, auto_position=",".join(gtids[d] for d in sorted(gtids)))
        else:
            kw.update(resume_stream=True, log_file=position.get("file"), log_pos=position.get("pos"))
        with self._lock:
            if self._closed:
                return
            reader = BinLogStreamReader(
                connection_settings=self._settings(), server_id=self.server_id, blocking=True,
                only_events=[MariadbGtidEvent, XidEvent, QueryEvent, WriteRowsEvent, UpdateRowsEvent,
                             DeleteRowsEvent],
                only_schemas=[self.db], only_tables=self.tables, enable_logging=False,
                pymysql_wrapper=_pymysql_connect, **kw)
            self._reader = reader
        connect = reader._BinLogStreamReader__connect_to_stream
        connected = [False]

        def connect_once() -> None:
            # the library reconnects by itself on errors 2006/2013, from the GTID it was created with; refuse,
            # so that the runner's reconnect loop resumes from the last checkpoint instead
            if connected[0] or self._closed:
                raise Disconnected(f"binlog connection to {self.url} lost")
            connected[0] = True
            connect()
            sc = reader._stream_connection
            self.connection_id = sc.thread_id()
            if marks:
                read_packet = sc._read_packet

                def checked_read_packet(*a: Any, **kw: Any) -> Any:
                    # between transactions, and not just after select() said the socket is readable: raise
                    # (before reading anything, so the reader's state stays consistent) instead of waiting
                    if gate[0]:
                        if gate[1]:
                            gate[1] = False
                        elif not _has_data(sc):
                            raise _WouldBlock
                    return read_packet(*a, **kw)
                sc._read_packet = checked_read_packet

        reader._BinLogStreamReader__connect_to_stream = connect_once
        txn: Transaction | None = None
        standalone = False
        gtid: str | None = None
        gate = [False, False]  # [check for data before reading a packet, except for the next one]
        try:
            while True:
                try:
                    gate[0] = marks and txn is None
                    ev = reader.fetchone()
                except _WouldBlock:
                    yield None  # caught up: the runner applies what it holds before this waits
                    if self._closed:
                        return
                    sock = getattr(reader._stream_connection, "_sock", None)
                    try:
                        if sock is None or wait_readable(sock, 0.2):
                            gate[1] = True  # readable (or closed): read the next packet without checking
                    except (OSError, ValueError) as e:
                        if self._closed:
                            return
                        raise Disconnected(f"binlog connection to {self.url} lost: {e}") from None
                    continue
                except Disconnected:
                    if self._closed:
                        return
                    raise
                except pymysql.err.OperationalError as e:
                    code = e.args[0] if e.args else 0
                    if self._closed:
                        return
                    if code == ER_MASTER_FATAL_ERROR_READING_BINLOG:
                        raise PositionLost(f"the binlog position {position} is no longer available at {self.url} "
                                           f"(error 1236: {e.args[-1]})") from None
                    if code == ER_CONNECTION_KILLED_DUPLICATE_SERVER_ID:
                        raise CdcConfigError(f"another binlog reader uses server_id {self.server_id} at {self.url} "
                                             "(error 4052); give each reader its own --server-id") from None
                    if code in ACCESS_ERRORS:
                        raise CdcConfigError(f"user {self.user!r} may not read the binlog at {self.url}: "
                                             f"{e.args[-1]}; GRANT REPLICATION SLAVE, REPLICATION CLIENT") from None
                    raise Disconnected(f"binlog connection to {self.url} lost: {e.args[-1]}") from None
                except (pymysql.err.InterfaceError, pymysql.err.InternalError, OSError, AttributeError,
                        ValueError, IndexError) as e:
                    # AttributeError/ValueError: the socket was closed under the reader by close()
                    if self._closed:
                        return
                    raise Disconnected(f"binlog connection to {self.url} lost: {type(e).__name__}: {e}") from None
                if ev is None:
                    if self._closed:
                        return
                    raise Disconnected(f"{self.url} ended the binlog stream (server shutting down?)")
                if isinstance(ev, MariadbGtidEvent):
                    txn = Transaction({}, None)  # a new group; a partial one (after a reconnect) is dropped
                    standalone = bool(ev.flags & 1)
                    gtid = ev.gtid
                    continue
                if isinstance(ev, (WriteRowsEvent, UpdateRowsEvent, DeleteRowsEvent)):
                    if txn is None:
                        txn = Transaction({}, None)
                    tbl = ev.table
                    try:  # the rows are decoded here, from the event already read
                        if isinstance(ev, WriteRowsEvent):
                            got = [Change(ev.schema, tbl, None, r["values"]) for r in ev.rows]
                        elif isinstance(ev, UpdateRowsEvent):
                            got = [Change(ev.schema, tbl, r["before_values"], r["after_values"]) for r in ev.rows]
                        else:
                            got = [Change(ev.schema, tbl, r["values"], None) for r in ev.rows]
                    except Exception as e:  # a value the binlog decoder cannot read (e.g. an invalid date)
                        if self._closed:
                            return
                        # its rows are unknown: invalidate every key of the table's templates (prefix SCAN)
                        self._undecodable += 1
                        log.error("CDC %s: a row event of table %s.%s cannot be decoded (%s: %s); invalidating every "
                                  "key of the table instead (counted in stats['undecodable_events'])", self.ident,
                                  ev.schema, tbl, type(e).__name__, str(e)[:300])
                        got = [Change(ev.schema, tbl, None, None, truncate=True)]
                    txn.changes.extend(got)
                    continue
                end = False
                if isinstance(ev, XidEvent):
                    end = True
                elif isinstance(ev, QueryEvent):
                    q = ev.query.strip().upper()
                    if q == "BEGIN":
                        if not self.mariadb:
                            txn = Transaction({}, None)
                        continue
                    end = q == "COMMIT" or standalone
                    for schema, table in ddl_tables(ev.query, _s(getattr(ev, "schema", None))):
                        if schema != self.db or (self.tables is not None and table not in self.tables):
                            continue
                        # a DDL statement (TRUNCATE, DROP, RENAME), not row events: the runner invalidates every
                        # key of the table's templates (prefix SCAN)
                        if txn is None:
                            txn = Transaction({}, None)
                        txn.changes.append(Change(schema, table, None, None, truncate=True))
                if not end:
                    continue
                if self.mariadb and txn is not None and gtid is not None:
                    gtids[int(gtid.split("-", 1)[0])] = gtid
                state = ",".join(gtids[d] for d in sorted(gtids))
                pos = {"file": reader.log_file, "pos": reader.log_pos}
                if self.mariadb:
                    pos["gtid"] = state
                    reader.auto_position = state  # so its internal reconnect does not replay from the start
                out = txn or Transaction({}, None)
                out.position = pos
                out.commit_time = float(ev.timestamp)
                txn, standalone = None, False
                yield out
        finally:
            with self._lock:
                self._reader = None
            try:
                reader.close()
            except Exception:
                pass

    def close(self) -> None:
        with self._lock:
            self._closed = True
            r = self._reader
        if r is not None:
            try:
                sock = getattr(r._stream_connection, "_sock", None)
                if sock is not None:
                    import socket

                    sock.shutdown(socket.SHUT_RDWR)
            except Exception:
                pass

    def reopen(self) -> None:
        with self._lock:
            self._closed = False
