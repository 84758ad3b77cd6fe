"""PostgreSQL logical decoding source: pgoutput over a psycopg2 ``LogicalReplicationConnection``.

* The publication (default ``cachesync``) and the logical slot (default ``cachesync``) are created when
  missing and reused otherwise; tables the rules name are added to an existing publication.
* Position: ``{"lsn": end_lsn_of_last_applied_commit}``. PostgreSQL 15 rewinds a slot's confirmed position
  on a clean server restart, so this checkpoint (not the slot) is authoritative; it is passed as
  ``start_lsn`` and transactions ending at or before it are skipped.
* Feedback: the LSN the runner acknowledged (applied + checkpointed) is sent as the flush position once
  every ``feedback_interval`` seconds so the server can recycle WAL -- not after every commit, which slowed
  the walsender's send of the next one (p99). When idle with nothing in flight the server's current WAL end
  is acknowledged (otherwise writes to other tables would pile up WAL behind the slot).
* Old row images: UPDATE/DELETE carry the old row only with ``REPLICA IDENTITY FULL``; otherwise only the
  primary key columns (when they changed) -- a rule template on a non-key column then cannot form its OLD key.
  :meth:`check` warns about such tables and the runner counts/warns per change (see docs/cdc.md).
* Logical messages (PostgreSQL 14+, pgoutput option ``messages``): a *transactional* message with prefix
  ``message_prefix`` (default ``cachesync``, written by :meth:`cachesync.outbox.Outbox.emit`) carries the JSON
  ``{"keys": [...], "version": ...}``; its keys join the keys of its transaction (same batch, same checkpoint).
  Other prefixes and non-transactional messages are ignored (``stats["messages_ignored"]``); a malformed
  ``cachesync`` message is logged with the reason and counted (``stats["messages_malformed"]``), and the stream
  goes on.
"""

from __future__ import annotations

import hashlib
import json
import math
import logging
import threading
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import unquote, urlsplit

from .._driver import encode_userinfo, redact_url, scrub
from ..db import POSTGRESQL, dialect_of
from ..errors import CachesyncError
from ..core.keys import check_key
from ..core.options import CacheOptions
from ..core.rules import Rules
from .._driver import wait_readable
from .base import CdcConfigError, Change, Disconnected, PositionLost, Source, Transaction
from .pgoutput import DecodeError, Decoder, DecodedTransaction, LogicalMessage, RowChange

log = logging.getLogger("cachesync.cdc.postgres")
_MAX_KEY_BYTES = CacheOptions().max_key_bytes


def lsn_str(lsn: int) -> str:
    """``0/16B3748`` form of an LSN."""
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


def parse_lsn(s: str) -> int:
    hi, lo = s.split("/")
    return (int(hi, 16) << 32) | int(lo, 16)


def check_wal_level(wal_level: str) -> list[str]:
    """Problems with the server's ``wal_level`` for logical decoding (empty list when it is ``logical``)."""
    if wal_level != "logical":
        return [f"wal_level is {wal_level!r}, must be 'logical': ALTER SYSTEM SET wal_level = logical; then restart "
                "PostgreSQL (also set max_replication_slots, max_wal_senders, max_slot_wal_keep_size)"]
    return []


def _dsn(url: str) -> str:
    return encode_userinfo("postgresql://" + url.split("://", 1)[1])


def _ident_ok(name: str, what: str) -> str:
    if not name or not all(c.isalnum() or c == "_" for c in name) or len(name) > 63 or name[0].isdigit():
        raise CdcConfigError(f"{what} {name!r} must be 1-63 characters of [a-z0-9_] not starting with a digit")
    return name


class PostgresSource(Source):
    """Reads committed changes of the rule tables through logical slot ``slot`` and publication ``publication``.

    ``db_url``: ``postgresql://user@host:port/db``; ``rules``: the tables to publish and the key templates (for
    the replica identity check); ``feedback_interval`` (default 1.0 s); ``create`` (default True): create the
    publication/slot when missing; ``messages`` (default True): also read transactional logical messages
    (PostgreSQL 14+; ignored with a warning on older servers) whose prefix is ``message_prefix`` (default
    ``cachesync``) -- see :meth:`cachesync.outbox.Outbox.emit`.
    """

    kind = "postgresql"
    inline = True  # read in the runner's thread (stream_marks: a None before it waits for the server)

    def __init__(self, db_url: str, rules: Rules, *, slot: str = "cachesync", publication: str = "cachesync",
                 feedback_interval: float = 1.0, create: bool = True, connect_timeout: float = 5.0,
                 messages: bool = True, message_prefix: str = "cachesync") -> None:
        if dialect_of(db_url) is not POSTGRESQL:
            raise CdcConfigError(f"database URL {redact_url(db_url)!r} is not a postgresql:// URL")
        self.dsn = _dsn(db_url)
        self.url = redact_url(db_url)
        p = urlsplit(self.dsn)  # userinfo percent-encoded: a password's "/" or "#" does not end the netloc
        try:
            self.host, self.port, self.db = p.hostname or "localhost", p.port or 5432, p.path.lstrip("/") or "?"
        except ValueError as e:
            raise CdcConfigError(f"database URL {self.url!r}: {scrub(e, db_url)}") from None
        self.user = unquote(p.username or "")
        self.rules = rules
        self.slot = _ident_ok(slot, "slot name")
        self.publication = _ident_ok(publication, "publication name")
        self.feedback_interval = feedback_interval
        self.create = create
        self.connect_timeout = connect_timeout
        self._closed = threading.Event()
        self._acked = 0
        self._delivered = 0
        self._tables: list[str] = []
        if not isinstance(message_prefix, str) or not message_prefix or "\0" in message_prefix:
            raise CdcConfigError(f"message prefix {message_prefix!r} must be a non-empty string without NUL")
        self.messages = messages
        self.message_prefix = message_prefix
        self._counters = {"messages_ignored": 0, "messages_malformed": 0, "undecodable_messages": 0}
        self._poisoned = False  # a message of the current transaction could not be decoded: flush what rules cover
        self._rule_oids: dict[int, str] = {}  # oid -> rule table name (check(); DDL messages keep it current)

    def counters(self) -> dict[str, int]:
        return dict(self._counters)

    @property
    def ident(self) -> str:
        return f"postgresql:{self.host}:{self.port}/{self.db}#slot={self.slot}"

    def _connect(self, **kw: Any) -> Any:
        import psycopg2

        try:
            conn = psycopg2.connect(self.dsn, connect_timeout=max(1, int(self.connect_timeout)), **kw)
        except psycopg2.OperationalError as e:
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            msg = scrub(msg, self.dsn)  # libpq may echo a token of the URL
            if "authentication" in msg or "permission" in msg or "no pg_hba.conf entry" in msg:
                raise CdcConfigError(f"cannot log in to {self.url}: {msg}") from None
            raise Disconnected(f"cannot connect to {self.url}: {msg}") from None
        return conn

    # ------------------------------------------------------------------ preflight

    def check(self) -> None:
        """wal_level, the replication privilege, the tables, REPLICA IDENTITY, then create/reuse publication + slot."""
        import psycopg2

        conn = self._connect()
        conn.autocommit = True
        try:
            with conn.cursor() as cur:
                cur.execute("SHOW wal_level")
                problems = check_wal_level(cur.fetchone()[0])
                if problems:
                    raise CdcConfigError(f"PostgreSQL at {self.url} is not set up for CDC: " + "; ".join(problems))
                cur.execute("SHOW server_version_num")
                if self.messages and int(cur.fetchone()[0]) < 140000:
                    log.warning("PostgreSQL at %s is older than 14: pgoutput cannot send logical messages, so "
                                "Outbox.emit() invalidations will NOT be applied by this reader", self.url)
                    self.messages = False
                cur.execute("SELECT rolreplication OR rolsuper FROM pg_roles WHERE rolname = current_user")
                if not cur.fetchone()[0]:
                    raise CdcConfigError(f"role {self.user or '(current user)'!r} at {self.url} lacks the REPLICATION "
                                         "attribute needed for logical decoding: ALTER ROLE ... WITH REPLICATION")
                tables = []
                for name in self.rules.tables:
                    cur.execute("SELECT to_regclass(%s)::oid, to_regclass(%s)::text", (name, name))
                    oid, qual = cur.fetchone()
                    if oid is None:
                        raise CdcConfigError(f"table {name!r} of the rules does not exist in {self.url}")
                    tables.append((name, oid, qual))
                    self._check_identity(cur, name, oid, qual)
                self._tables = [q for _, _, q in tables]
                self._rule_oids = {int(oid): name for name, oid, _ in tables}
                self._ensure_publication(cur, tables)
                self._ensure_slot(cur)
        except psycopg2.Error as e:
            raise CdcConfigError(f"PostgreSQL at {self.url}: {str(e).strip()}") from None
        finally:
            conn.close()

    def _check_identity(self, cur: Any, name: str, oid: int, qual: str) -> None:
        cur.execute("SELECT relreplident FROM pg_class WHERE oid = %s", (oid,))
        ident = cur.fetchone()[0]
        if ident == "f":
            return
        cur.execute("""SELECT a.attname FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid
                       AND a.attnum = ANY(i.indkey) WHERE i.indrelid = %s AND
                       (CASE WHEN %s = 'i' THEN i.indisreplident ELSE i.indisprimary END)""", (oid, ident))
        keycols = {r[0] for r in cur.fetchall()}
        need = set(self.rules.tables[name].columns)
        if not need <= keycols:
            log.warning(
                "table %s has REPLICA IDENTITY %s: UPDATE/DELETE events carry only the key column(s) %s of the old "
                "row, but the key templates %s also use %s. When one of those columns changes, the OLD key cannot "
                "be invalidated. Fix: ALTER TABLE %s REPLICA IDENTITY FULL;", qual,
                {"d": "DEFAULT", "n": "NOTHING", "i": "USING INDEX"}.get(ident, ident), sorted(keycols),
                list(self.rules.tables[name].keys), sorted(need - keycols), qual)

    def _ensure_publication(self, cur: Any, tables: list[tuple[str, int, str]]) -> None:
        from psycopg2 import sql

        cur.execute("SELECT 1 FROM pg_publication WHERE pubname = %s", (self.publication,))
        if cur.fetchone() is None:
            if not self.create:
                raise CdcConfigError(f"publication {self.publication!r} does not exist in {self.url}")
            stmt = sql.SQL("CREATE PUBLICATION {} FOR TABLE {}").format(
                sql.Identifier(self.publication), sql.SQL(", ").join(sql.SQL(q) for _, _, q in tables))
            cur.execute(stmt)
            log.info("created publication %s for %s", self.publication, [q for _, _, q in tables])
            return
        cur.execute("SELECT puballtables FROM pg_publication WHERE pubname = %s", (self.publication,))
        if cur.fetchone()[0]:
            return
        cur.execute("SELECT c.oid FROM pg_publication_rel pr JOIN pg_publication p ON p.oid = pr.prpubid "
                    "JOIN pg_class c ON c.oid = pr.prrelid WHERE p.pubname = %s", (self.publication,))
        have = {r[0] for r in cur.fetchall()}
        for _, oid, q in tables:
            if oid not in have:
                cur.execute(sql.SQL("ALTER PUBLICATION {} ADD TABLE {}").format(sql.Identifier(self.publication),
                                                                               sql.SQL(q)))
                log.warning("added table %s to the existing publication %s", q, self.publication)

    def _ensure_slot(self, cur: Any) -> None:
        cur.execute("SELECT plugin, database FROM pg_replication_slots WHERE slot_name = %s", (self.slot,))
        row = cur.fetchone()
        if row is None:
            if not self.create:
                raise CdcConfigError(f"replication slot {self.slot!r} does not exist in {self.url}")
            cur.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (self.slot,))
            log.info("created logical replication slot %s (drop it with `cachesync cdc drop-slot` when retiring "
                     "this reader: an abandoned slot keeps WAL forever)", self.slot)
            return
        plugin, database = row
        if plugin != "pgoutput":
            raise CdcConfigError(f"replication slot {self.slot!r} uses plugin {plugin!r}, not pgoutput; "
                                 "choose another --slot")
        cur.execute("SELECT current_database()")
        if cur.fetchone()[0] != database:
            raise CdcConfigError(f"replication slot {self.slot!r} belongs to database {database!r}; "
                                 "choose another --slot")

    def current_position(self) -> dict[str, Any]:
        conn = self._connect()
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = %s",
                            (self.slot,))
                row = cur.fetchone()
                if row is None or row[0] is None:
                    cur.execute("SELECT pg_current_wal_lsn()::text")
                    row = cur.fetchone()
                return {"lsn": parse_lsn(row[0]), "lsn_text": row[0]}
        finally:
            conn.close()

    def drop_slot(self, drop_publication: bool = False) -> bool:
        """Drop the slot (and with ``drop_publication`` the publication); False if the slot did not exist."""
        import psycopg2
        from psycopg2 import sql

        conn = self._connect()
        conn.autocommit = True
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT active_pid FROM pg_replication_slots WHERE slot_name = %s", (self.slot,))
                row = cur.fetchone()
                if row is not None and row[0] is not None:
                    raise CdcConfigError(f"replication slot {self.slot!r} is in use by server process {row[0]}; "
                                         "stop the reader first")
                if row is not None:
                    cur.execute("SELECT pg_drop_replication_slot(%s)", (self.slot,))
                if drop_publication:
                    cur.execute(sql.SQL("DROP PUBLICATION IF EXISTS {}").format(sql.Identifier(self.publication)))
                return row is not None
        except psycopg2.Error as e:
            raise CdcConfigError(f"PostgreSQL at {self.url}: {str(e).strip()}") from None
        finally:
            conn.close()

    # ------------------------------------------------------------------ stream

    def ack(self, position: dict[str, Any]) -> None:
        self._acked = max(self._acked, int(position["lsn"]))

    def reopen(self) -> None:
        self._closed.clear()

    def close(self) -> None:
        self._closed.set()

    def _change(self, rc: RowChange) -> Change:
        rel = rc.relation
        if rc.kind == "insert":
            return Change(rel.namespace, rel.name, None, rc.new)
        old = rc.old
        if rc.kind in ("update", "delete") and rc.old_kind != "O":
            # no full old image: only the key columns are known (from 'K', or unchanged = the new image's)
            src = rc.old if rc.old_kind == "K" else rc.new
            old = {c: src[c] for c in rel.key_columns if src is not None and c in src}
        return Change(rel.namespace, rel.name, old, rc.new, truncate=rc.kind == "truncate")

    def _message_keys(self, m: LogicalMessage, into: dict[str, Any], changes: list[Change] | None = None,
                      prefixes: list[str] | None = None) -> bool:
        """Add the keys of one transactional logical message to ``into`` (for a DDL message of
        :func:`install_ddl_triggers`, the table flushes to ``changes``; for a capture trigger's TRUNCATE message
        ``{"prefixes": [...]}``, the prefixes to ``prefixes``); False if it is not ours or malformed."""
        if m.prefix != self.message_prefix:
            self._counters["messages_ignored"] += 1
            return False
        try:
            doc = json.loads(m.content.decode("utf-8"))
            if not isinstance(doc, dict):
                raise ValueError(f"expected a JSON object, got {type(doc).__name__}")
            ddl = doc.get("ddl")
            if ddl is not None:
                if not isinstance(ddl, list) or not all(
                        isinstance(d, dict) and d.get("op") in ("drop", "alter") and isinstance(d.get("oid"), int)
                        and isinstance(d.get("table"), str) and isinstance(d.get("schema"), str) for d in ddl):
                    raise ValueError("'ddl' must be a list of {op: drop|alter, oid, schema, table}")
            flush = doc.get("prefixes")
            if flush is not None and (not isinstance(flush, list) or not all(isinstance(p, str) for p in flush)):
                raise ValueError("'prefixes' must be a list of strings")
            keys, ver = doc.get("keys"), doc.get("version")
            if (ddl is None and flush is None) or keys is not None:
                if not isinstance(keys, list) or not keys:
                    raise ValueError("'keys' must be a non-empty list of strings")
                for k in keys:
                    if not isinstance(k, str):
                        raise ValueError(f"key {k!r} is not a string")
                    check_key(k, _MAX_KEY_BYTES)
            if ver is not None and (isinstance(ver, bool) or not isinstance(ver, (str, int, float))
                                    or not math.isfinite(float(ver))):
                raise ValueError(f"'version' must be a finite number, a numeric string or null, got {ver!r}")
        except (ValueError, OverflowError, RecursionError, CachesyncError) as e:  # incl. JSON/Unicode errors
            self._counters["messages_malformed"] += 1
            log.error("CDC %s: ignoring a malformed %r logical message at LSN %s (%d bytes: %r): %s", self.ident,
                      m.prefix, lsn_str(m.lsn), len(m.content), m.content[:200], e)
            return False
        if flush and prefixes is not None:
            prefixes.extend(flush)
        for d in ddl or ():
            got = self._ddl_changes(d["op"], d["oid"], d["schema"], d["table"])
            if changes is not None:
                changes.extend(got)
        for k in keys or ():
            old = into.get(k)
            if k not in into or (ver is not None and (old is None or _newer(ver, old))):
                into[k] = ver
        return True

    def _ddl_changes(self, op: str, oid: int, schema: str, table: str) -> list[Change]:
        """Table flushes for one DDL event: a dropped table; a table renamed from or to a rule table's name (the
        old name is the one :meth:`check` or an earlier rename recorded for the oid; an ``ALTER TABLE`` that kept
        the name flushes nothing)."""
        covered = table in self.rules.tables or f"{schema}.{table}" in self.rules.tables
        if op == "drop":
            self._rule_oids.pop(oid, None)
            return [Change(schema, table, None, None, truncate=True)] if covered else []
        old = self._rule_oids.get(oid)
        if old is not None and old in (table, f"{schema}.{table}"):
            return []  # not a rename
        out = []
        if old is not None:  # renamed away from a rule table's name: its rows are gone from that name
            out.append(Change(None, old, None, None, truncate=True))
            del self._rule_oids[oid]
        if covered:  # renamed to a rule table's name: whatever was cached under it belonged to another table
            out.append(Change(schema, table, None, None, truncate=True))
            self._rule_oids[oid] = table if table in self.rules.tables else f"{schema}.{table}"
        return out

    def _txn(self, t: DecodedTransaction) -> Transaction:
        if not t.messages and not self._poisoned:  # row changes only (what a stream is mostly made of)
            change = self._change
            return Transaction({"lsn": t.end_lsn, "lsn_text": lsn_str(t.end_lsn)}, t.commit_time,
                               [change(c) for c in t.changes])
        return self._txn_general(t)

    def _txn_general(self, t: DecodedTransaction) -> Transaction:
        """:meth:`_txn` for any transaction (the reference its fast path is checked against)."""
        keys: dict[str, Any] = {}
        ddl: list[Change] = []
        flush: list[str] = []
        n = sum(self._message_keys(m, keys, ddl, flush) for m in t.messages) if t.messages else 0
        if self._poisoned:  # some of its changes are unknown: every key the rules cover
            self._poisoned = False
            flush.extend(p for rule in self.rules.tables.values() for p in rule.prefixes())
        return Transaction({"lsn": t.end_lsn, "lsn_text": lsn_str(t.end_lsn)}, t.commit_time,
                           [self._change(c) for c in t.changes] + ddl, keys=keys, messages=n, prefixes=flush)

    def stream(self, position: dict[str, Any]) -> Iterator[Transaction]:
        for t in self._stream(position, False):
            if t is not None:
                yield t

    def stream_marks(self, position: dict[str, Any]) -> Iterator[Transaction | None]:
        return self._stream(position, True)

    def _stream(self, position: dict[str, Any], marks: bool) -> Iterator[Transaction | None]:
        import psycopg2
        from psycopg2.extras import LogicalReplicationConnection

        start = int(position.get("lsn", 0))
        self._acked = max(self._acked, start)
        self._delivered = start
        try:
            conn = psycopg2.connect(self.dsn, connection_factory=LogicalReplicationConnection,
                                    connect_timeout=max(1, int(self.connect_timeout)))
        except psycopg2.OperationalError as e:
            raise Disconnected(f"cannot open a replication connection to {self.url}: "
                               f"{scrub(str(e).strip(), self.dsn)}") from None
        decoder = Decoder()
        options = {"proto_version": "1", "publication_names": self.publication}
        if self.messages:
            options["messages"] = "true"
        try:
            cur: Any = conn.cursor()
            try:
                cur.start_replication(slot_name=self.slot, decode=False, start_lsn=start, options=options)
            except psycopg2.Error as e:
                self._raise(e, position)
            last_fb = 0.0
            while not self._closed.is_set():
                try:
                    msg = cur.read_message()
                except psycopg2.Error as e:
                    if self._closed.is_set():
                        return
                    self._raise(e, position)
                if msg is None:
                    if marks:
                        yield None  # caught up: the runner applies what it holds (before any feedback or wait)
                        if self._closed.is_set():
                            return
                    now = time.monotonic()
                    ack = self._acked
                    if not decoder.in_transaction and self._delivered <= ack and cur.wal_end > ack:
                        ack = cur.wal_end  # idle and everything applied: let the server release WAL
                    # at most one feedback per interval, NOT one per applied commit: each status update makes the
                    # walsender process a reply (and at times write + fsync the slot's state) on the very path
                    # that sends the next commit; per-commit feedback put the p99 commit->invalidated over 5 ms
                    if now - last_fb >= self.feedback_interval:
                        try:
                            cur.send_feedback(write_lsn=ack, flush_lsn=ack, apply_lsn=ack)
                        except psycopg2.Error as e:
                            if self._closed.is_set():
                                return
                            self._raise(e, position)
                        last_fb = now
                    try:
                        wait_readable(conn, 0.2)
                    except (OSError, ValueError) as e:
                        if self._closed.is_set():
                            return
                        raise Disconnected(f"replication connection to {self.url} lost: {e}") from None
                    continue
                try:
                    t = decoder.feed(msg.payload)
                except DecodeError as e:  # e.g. text that is not UTF-8 (a SQL_ASCII database): never fatal
                    self._counters["undecodable_messages"] += 1
                    self._poisoned = True
                    log.error("CDC %s: a pgoutput message cannot be decoded (%s); its transaction will invalidate "
                              "every key the rules cover (counted in stats['undecodable_messages'])", self.ident,
                              str(e)[:300])
                    continue
                if decoder.nontransactional_messages:
                    self._counters["messages_ignored"] += decoder.nontransactional_messages
                    decoder.nontransactional_messages = 0
                if t is None:
                    continue
                if t.end_lsn <= start:
                    continue  # applied before the checkpoint
                self._delivered = t.end_lsn
                yield self._txn(t)
                now = time.monotonic()
                if now - last_fb >= self.feedback_interval:
                    try:
                        cur.send_feedback(write_lsn=self._acked, flush_lsn=self._acked, apply_lsn=self._acked)
                    except psycopg2.Error as e:
                        self._raise(e, position)
                    last_fb = now
        finally:
            try:
                conn.close()
            except Exception:
                pass

    def _raise(self, e: Exception, position: dict[str, Any]) -> Any:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        code = getattr(e, "pgcode", None)
        if "has already been removed" in msg or "requested WAL segment" in msg:
            raise PositionLost(f"the WAL for position {position} is gone at {self.url}: {msg}") from None
        if code == "42704" or ("replication slot" in msg and "does not exist" in msg):
            raise CdcConfigError(f"replication slot {self.slot!r} does not exist at {self.url}: {msg}") from None
        if code == "42501":
            raise CdcConfigError(f"not allowed to read slot {self.slot!r} at {self.url}: {msg}") from None
        raise Disconnected(f"replication connection to {self.url} lost: {msg}") from None


def _ddl_names(message_prefix: str) -> tuple[str, str, str]:
    """(function, drop event trigger, alter event trigger) names for ``message_prefix``."""
    h = hashlib.sha1(message_prefix.encode(), usedforsecurity=False).hexdigest()[:10]
    return f"cachesync_ddl_{h}", f"cachesync_ddl_drop_{h}", f"cachesync_ddl_alter_{h}"


def ddl_trigger_sql(message_prefix: str = "cachesync") -> list[str]:
    """The statements of :func:`install_ddl_triggers` (idempotent)."""
    fn, drop, alter = _ddl_names(message_prefix)
    prefix = "'" + message_prefix.replace("'", "''") + "'"
    body = (
        "DECLARE objs json; BEGIN "
        "IF TG_EVENT = 'sql_drop' THEN "
        "SELECT json_agg(json_build_object('op', 'drop', 'oid', objid::bigint, 'schema', schema_name, 'table', object_name)) "
        "INTO objs FROM pg_event_trigger_dropped_objects() "
        "WHERE object_type = 'table' AND original AND NOT is_temporary; "
        "ELSE "
        "SELECT json_agg(json_build_object('op', 'alter', 'oid', c.objid::bigint, 'schema', n.nspname, 'table', r.relname)) "
        "INTO objs FROM pg_event_trigger_ddl_commands() c JOIN pg_class r ON r.oid = c.objid "
        "JOIN pg_namespace n ON n.oid = r.relnamespace WHERE c.object_type = 'table'; "
        "END IF; "
        f"IF objs IS NOT NULL THEN PERFORM pg_logical_emit_message(true, {prefix}, "
        "json_build_object('ddl', objs)::text); END IF; END")
    return [
        f"CREATE OR REPLACE FUNCTION {fn}() RETURNS event_trigger LANGUAGE plpgsql AS $cs$ {body} $cs$",
        f"DROP EVENT TRIGGER IF EXISTS {drop}",
        f"CREATE EVENT TRIGGER {drop} ON sql_drop WHEN TAG IN ('DROP TABLE') EXECUTE FUNCTION {fn}()",
        f"DROP EVENT TRIGGER IF EXISTS {alter}",
        f"CREATE EVENT TRIGGER {alter} ON ddl_command_end WHEN TAG IN ('ALTER TABLE') EXECUTE FUNCTION {fn}()",
    ]


def install_ddl_triggers(db_url: str, message_prefix: str = "cachesync") -> None:
    """PostgreSQL: create (or replace) the event triggers that make ``DROP TABLE`` and ``ALTER TABLE ... RENAME``
    visible to ``cachesync cdc`` (logical decoding carries no DDL): each writes a transactional logical message
    ``{"ddl": [{"op", "oid", "schema", "table"}]}`` with ``message_prefix`` (the reader's ``--message-prefix``),
    and the reader invalidates every key of a dropped rule table, and of both names of a rename. Needs a
    superuser (event triggers are database-wide). Idempotent."""
    import psycopg

    if not isinstance(message_prefix, str) or not message_prefix or "\0" in message_prefix:
        raise CdcConfigError(f"message prefix {message_prefix!r} must be a non-empty string without NUL")
    try:
        with psycopg.connect(_dsn(db_url), autocommit=True) as conn:
            conn.execute("BEGIN")
            for stmt in ddl_trigger_sql(message_prefix):
                conn.execute(stmt)
            conn.execute("COMMIT")
    except psycopg.Error as e:
        raise CdcConfigError(f"cannot install the DDL event triggers in {redact_url(db_url)}: "
                             f"{str(e).strip()}") from None


def drop_ddl_triggers(db_url: str, message_prefix: str = "cachesync") -> None:
    """Drop what :func:`install_ddl_triggers` created (idempotent)."""
    import psycopg

    fn, drop, alter = _ddl_names(message_prefix)
    try:
        with psycopg.connect(_dsn(db_url), autocommit=True) as conn:
            for stmt in (f"DROP EVENT TRIGGER IF EXISTS {drop}", f"DROP EVENT TRIGGER IF EXISTS {alter}",
                         f"DROP FUNCTION IF EXISTS {fn}()"):
                conn.execute(stmt)
    except psycopg.Error as e:
        raise CdcConfigError(f"cannot drop the DDL event triggers in {redact_url(db_url)}: {str(e).strip()}") from None


def _newer(a: Any, b: Any) -> bool:
    try:
        return float(a) > float(b)
    except (TypeError, ValueError):
        return False
