"""The transactional outbox: record invalidations in the caller's own database transaction.

An application that changes rows also inserts one outbox row (the cache keys to invalidate, the committed
version, a not-before time) **in the same transaction**. If the transaction rolls back, nothing is recorded;
if it commits, the relay (:mod:`cachesync.outbox.relay`, ``cachesync relay``) applies the invalidation to Redis
and/or publishes it on a bus, at least once, surviving crashes of the application, the relay and Redis.

::

    ob = Outbox()                          # table "cachesync_outbox"; Outbox(rules=Rules.load("rules.toml"))
    ob.init(conn)                          # once (or: cachesync outbox init --db-url ...); commits
    with conn:                             # the application's transaction
        conn.execute("UPDATE users SET email=? WHERE id=?", ...)
        ob.record(conn, "user:1", "user_by_email:a@x", version=7, again_after=0.5)
        ob.record_change(conn, "users", old_row, new_row)   # keys from the rules (old AND new keys)
    conn.execute("UPDATE users SET email=? WHERE id=?", ...)
    ob.commit(conn, "user:1", version=8)   # record + COMMIT in one round trip (psycopg 3, PyMySQL multi-statements)
    ob.emit_commit(conn, "user:1", version=8)  # PostgreSQL: WAL message + COMMIT, no table (read by `cachesync cdc`)

Table columns: ``id`` (order), ``cache_keys`` (JSON list), ``key_version`` (NULL = unknown), ``run_at``
(not-before time in ms since the epoch by the *database* clock; 0 = now), ``attempts`` (failed deliveries),
``claimed_until``/``claimed_by`` (SQLite relay lease), ``last_error``, ``created_at`` (database clock, ms),
``traceparent`` (the writer's W3C trace context when it recorded inside a span; NULL otherwise; tables made before
this column keep working without it: ``ALTER TABLE ... ADD COLUMN traceparent`` to carry traces). On PostgreSQL a row trigger
sends ``NOTIFY <table>`` so that relays wake at once; its payload carries the id, keys and version of an
immediate row (up to :data:`NOTIFY_LIMIT` bytes), which the relay applies before claiming it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

from .. import core as P
from ..db import DIALECTS, Dialect, dialect_of
from .. import _validate
from ..errors import OutboxConfigError
from ..errors import OutboxError as OutboxError  # defined in errors.py, re-exported here
from ..core.keys import check_key
from ..core.options import CacheOptions
from ..core.rules import Rules
from .. import tracing

from .options import DEFAULT_TABLE as DEFAULT_TABLE  # defined there (RelayOptions.table's default)
from .options import RelayOptions, RelayOptionsKwargs

DEFAULT_MESSAGE_PREFIX = "cachesync"
"""Default prefix of the WAL messages of :meth:`Outbox.emit` (``cachesync cdc --message-prefix``)."""

PARKED = 1 << 62
"""``run_at`` of a row the relay could not use (bad keys); kept with ``last_error`` for an operator."""

NOTIFY_LIMIT = 7900
"""PostgreSQL: the largest NOTIFY payload (bytes) carrying rows for the relay's fast path (the server's limit is
8000); a larger row only wakes the relay, which claims it."""

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,54}")
_MAX_KEY_BYTES = CacheOptions().max_key_bytes


def check_table(table: object) -> str:
    """Validate an outbox table name (a plain SQL identifier of at most 55 characters)."""
    if not isinstance(table, str) or not _IDENT.fullmatch(table):
        raise OutboxError(f"outbox table name {table!r} must be a plain identifier (letters, digits, '_', "
                          "not starting with a digit, at most 55 characters)")
    return table


def now_ms_sql(d: Dialect) -> str:
    """SQL for "now" in ms since the epoch by the database clock (all outbox times use the database clock)."""
    return d.now_ms


def ddl(d: Dialect, table: str = DEFAULT_TABLE) -> list[str]:
    """The statements that create the outbox ``table`` (idempotent) for dialect ``d``."""
    t = check_table(table)
    now = now_ms_sql(d)
    # PostgreSQL and SQLite: a partial index: immediate rows (run_at = 0, the common case) cost the writer no
    # second index entry; MySQL has no partial indexes. SQLite: the rowid is the id (no AUTOINCREMENT: no
    # sqlite_sequence page to write per transaction; an id can be reused only after its row was deleted, and the
    # relay's deletes check claimed_by).
    index = "" if d.partial_index else f", KEY {t}_run_at (run_at)"
    out = [
        f"CREATE TABLE IF NOT EXISTS {t} (id {d.serial_key}, cache_keys {d.long_text} NOT NULL, "
        f"key_version {d.short_text} NULL, run_at {d.bigint} NOT NULL DEFAULT 0, "
        f"attempts {d.integer} NOT NULL DEFAULT 0, claimed_until {d.bigint} NOT NULL DEFAULT 0, "
        f"claimed_by {d.short_text} NULL, last_error TEXT NULL, "
        f"created_at {d.bigint} NOT NULL DEFAULT ({now}), traceparent {d.short_text} NULL{index}){d.table_options}",
    ]
    if d.partial_index:
        out.append(f"CREATE INDEX IF NOT EXISTS {t}_run_at ON {t} (run_at) WHERE run_at > 0")
    if d.notify:
        out += [
            # One NOTIFY per inserted row; payload (the relay's fast path): the JSON array [id, cache_keys text,
            # key_version] of an immediate row (run_at = 0). An empty payload only wakes the relay to claim: a
            # delayed row (the relay re-learns when the next one is due; PostgreSQL sends identical notifications
            # of one transaction once) or a row too large for a notification (NOTIFY_LIMIT). A row trigger costs
            # the writer no more than the former statement trigger with an empty payload; a statement trigger
            # with a transition table (one payload per statement) cost +6 % of a 1-UPDATE transaction.
            f"CREATE OR REPLACE FUNCTION {t}_notify() RETURNS trigger LANGUAGE plpgsql AS $$ "
            "DECLARE p text := ''; BEGIN "
            # the writer's traceparent as a 4th item (to_jsonb: NULL, not an error, on a table without the column)
            "IF NEW.run_at = 0 THEN p := json_build_array(NEW.id, NEW.cache_keys, NEW.key_version, "
            "to_jsonb(NEW)->>'traceparent')::text; "
            f"IF octet_length(p) > {NOTIFY_LIMIT} THEN p := ''; END IF; END IF; "
            f"PERFORM pg_notify('{t}', p); RETURN NULL; END $$",
            f"DROP TRIGGER IF EXISTS {t}_notify ON {t}",
            f"CREATE TRIGGER {t}_notify AFTER INSERT ON {t} FOR EACH ROW EXECUTE FUNCTION {t}_notify()",
        ]
    return out


def has_column(conn: Any, d: Dialect, table: str, column: str) -> bool:
    """Whether ``table`` has ``column`` (read on ``conn``, inside its current transaction; harmless there)."""
    cur = conn.cursor()
    try:
        cur.execute(d.columns_sql, (check_table(table),))
        return any(row[0] == column for row in cur.fetchall())
    finally:
        cur.close()


def dialect_of_connection(conn: Any) -> Dialect:
    """The :class:`Dialect` of a DB-API connection (sqlite3, psycopg 3, psycopg2, PyMySQL)."""
    mod = type(conn).__module__
    for d in DIALECTS:
        if mod.startswith(d.driver_modules):
            return d
    raise OutboxError(f"cannot tell the database of connection {type(conn).__qualname__} from module {mod!r}; "
                      "pass dialect= ('sqlite', 'postgresql' or 'mysql')")


def _check_delay(name: str, v: object, allow_none: bool) -> float | None:
    if v is None and allow_none:
        return None
    return float(_validate.non_negative(name, v, seconds=True, error=OutboxConfigError))


class Outbox:
    """Records invalidations in an outbox table. ``Outbox(table="cachesync_outbox", rules=None, dialect=None,
    max_key_bytes=1024, message_prefix="cachesync")``.

    ``message_prefix``: the prefix of the WAL messages written by :meth:`emit` / :meth:`emit_commit` (PostgreSQL,
    no table; must match ``cachesync cdc --message-prefix``).

    ``rules`` (a :class:`cachesync.rules.Rules`) is needed only by :meth:`record_change`. ``dialect`` (a
    :class:`cachesync.db.Dialect`, a name or a URL) is detected from each connection when ``None``.
    """

    def __init__(self, table: str = DEFAULT_TABLE, *, rules: Rules | None = None, dialect: Dialect | str | None = None,
                 max_key_bytes: int = _MAX_KEY_BYTES, message_prefix: str = DEFAULT_MESSAGE_PREFIX) -> None:
        self.table = check_table(table)
        if not isinstance(message_prefix, str) or not message_prefix or "\0" in message_prefix:
            raise OutboxError(f"message_prefix {message_prefix!r} must be a non-empty string without NUL")
        self.message_prefix = message_prefix
        if rules is not None and not isinstance(rules, Rules):
            raise OutboxError(f"rules must be a cachesync.rules.Rules, got {type(rules).__name__}")
        self.rules = rules
        if isinstance(dialect, str):
            dialect = dialect_of(dialect if "://" in dialect else dialect + "://x")
        self.dialect = dialect
        self.max_key_bytes = max_key_bytes
        self._tp_column: bool | None = None  # does the table have the traceparent column (read once, when tracing)

    def traceparent(self, conn: Any, dialect: Dialect | None = None) -> str | None:
        """The current span's W3C traceparent to store in a row, or None: no OpenTelemetry, no recording span, or
        a table without the ``traceparent`` column (asked once per :class:`Outbox`, on the DB-API ``conn``;
        ``dialect`` when ``conn`` is a pool's proxy, e.g. SQLAlchemy's or Django's)."""
        if not tracing.AVAILABLE:
            return None
        tp = tracing.current_traceparent()
        if tp is None:
            return None
        if self._tp_column is None:
            self._tp_column = has_column(conn, dialect or self._dialect(conn), self.table, "traceparent")
        return tp if self._tp_column else None

    def _dialect(self, conn: Any) -> Dialect:
        return self.dialect or dialect_of_connection(conn)

    def init(self, conn: Any, notify: bool | None = True) -> None:
        """Create the outbox table and its index if missing; commits ``conn``.

        PostgreSQL, ``notify`` (default True): create (or replace) the row trigger that sends ``NOTIFY <table>``
        for each row, which wakes listening relays at once and carries the fast path; ``False``: drop it (relays
        then find rows by polling, and the writer does not pay for the notification; see docs/outbox.md);
        ``None``: leave an existing table's trigger as it is, and create it with a new table (what the relay
        does when it starts). Ignored on other databases.
        """
        d = self._dialect(conn)
        cur = conn.cursor()
        try:
            stmts = ddl(d, self.table)
            if d.notify:  # the NOTIFY trigger: replaced by concurrent relays under a lock, or kept / dropped
                cur.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (self.table,))
                if notify is None:  # keep an existing table's trigger (or its absence) as it is
                    cur.execute("SELECT to_regclass(%s) IS NULL", (self.table,))
                    if not cur.fetchone()[0]:
                        stmts = stmts[:2]
                elif not notify:
                    stmts = stmts[:2] + [f"DROP TRIGGER IF EXISTS {self.table}_notify ON {self.table}",
                                         f"DROP FUNCTION IF EXISTS {self.table}_notify()"]
            for stmt in stmts:
                cur.execute(stmt)
            conn.commit()
            self._tp_column = None
        except BaseException:
            conn.rollback()
            raise
        finally:
            cur.close()

    def drop(self, conn: Any) -> None:
        """Drop the outbox table (and its trigger function); commits ``conn``. For tests and teardown."""
        d = self._dialect(conn)
        cur = conn.cursor()
        cur.execute(f"DROP TABLE IF EXISTS {self.table}")
        if d.notify:
            cur.execute(f"DROP FUNCTION IF EXISTS {self.table}_notify()")
        conn.commit()
        cur.close()

    def rows_for(self, keys: Sequence[str], version: Any = None, delay: float | None = 0.0,
                 again_after: float | None = None) -> list[tuple[str, str | None, float | None]]:
        """The outbox rows (keys JSON, version, delay in s or None) for one invalidation; validates the input."""
        ks = list(dict.fromkeys(keys))
        if not ks:
            raise OutboxError("record() needs at least one cache key")
        for k in ks:
            check_key(k, self.max_key_bytes)
        d0 = _check_delay("delay", delay, False)
        d1 = _check_delay("again_after", again_after, True)
        payload = json.dumps(ks, separators=(",", ":"))
        ver = P.encode_version(version) or None
        rows: list[tuple[str, str | None, float | None]] = [(payload, ver, d0 or None)]
        if d1 is not None:
            rows.append((payload, ver, (d0 or 0.0) + d1))
        return rows

    def insert_sql(self, d: Dialect, rows: Sequence[tuple[str, str | None, float | None]],
                   traceparent: str | None = None) -> tuple[str, list[Any]]:
        """One multi-row ``INSERT`` (SQL with ``?`` markers, parameters) for :meth:`rows_for` rows; with
        ``traceparent`` (see :meth:`traceparent`) also into the ``traceparent`` column."""
        values, params = [], []
        tp = ", ?" if traceparent else ""
        for payload, ver, delay in rows:
            if delay:
                values.append(f"(?, ?, {now_ms_sql(d)} + ?{tp})")
                params += [payload, ver, int(delay * 1000)]
            else:
                values.append(f"(?, ?, 0{tp})")
                params += [payload, ver]
            if traceparent:
                params.append(traceparent)
        cols = "cache_keys, key_version, run_at" + (", traceparent" if traceparent else "")
        return f"INSERT INTO {self.table} ({cols}) VALUES {', '.join(values)}", params

    def record(self, conn: Any, *keys: str, version: Any = None, delay: float = 0.0,
               again_after: float | None = None) -> None:
        """Record that ``keys`` must be invalidated when the caller's transaction on ``conn`` commits.

        Does not commit. ``version`` (default None): the committed row version, raises the keys' version
        floor. ``delay`` (default 0): not before this many seconds (database clock). ``again_after`` (default
        None): also record a second, durable invalidation that many seconds after the first (delayed double
        delete; it survives crashes of the application and the relay).
        """
        d = self._dialect(conn)
        sql, params = self.insert_sql(d, self.rows_for(keys, version, delay, again_after), self.traceparent(conn))
        cur = conn.cursor()
        try:
            cur.execute(d.sql(sql), params)
        finally:
            cur.close()

    def commit(self, conn: Any, *keys: str, version: Any = None, delay: float = 0.0,
               again_after: float | None = None) -> None:
        """Record that ``keys`` must be invalidated (as :meth:`record`) **and commit** the caller's transaction on
        ``conn``, in one round trip where the driver allows it (the outbox INSERT is then the transaction's last
        statement: call it instead of ``record(); conn.commit()``).

        * psycopg 3: one simple-query string ``INSERT ...; COMMIT``, values quoted by psycopg
          (:class:`psycopg.sql.Literal`); psycopg follows the transaction state the server reports, so the
          connection is idle afterwards. Refused inside a ``conn.transaction()`` block (psycopg forbids commits
          there).
        * PyMySQL: one ``INSERT ...; COMMIT`` (values escaped by PyMySQL) when the connection was opened with
          ``client_flag=pymysql.constants.CLIENT.MULTI_STATEMENTS``; otherwise :meth:`record` + ``commit()``
          (two round trips).
        * psycopg2: :meth:`record` + ``commit()``. psycopg2 does not follow the server's transaction state: after a
          COMMIT inside a statement it would still believe a transaction is open and run the next "transaction"
          without BEGIN, i.e. in autocommit.
        * sqlite3 (no network round trip) and other drivers: :meth:`record` + ``commit()``.

        Atomic: if the INSERT (or the COMMIT) fails, the transaction is rolled back — the caller's changes are
        not committed without their outbox row — and the driver's error is raised. Autocommit connections are
        refused with :class:`OutboxError` (the caller's statements were already committed one by one).
        """
        d = self._dialect(conn)
        sql, params = self.insert_sql(d, self.rows_for(keys, version, delay, again_after), self.traceparent(conn))
        mod = type(conn).__module__
        if _autocommit(conn, mod):
            raise OutboxError("Outbox.commit() needs a connection in a transaction, not in autocommit mode: the "
                              "caller's statements were already committed one by one, so the outbox row cannot be "
                              "atomic with them; turn autocommit off, or use record() inside an explicit "
                              "transaction")
        one_trip: str | None = None
        if mod.startswith("psycopg") and not mod.startswith("psycopg2"):
            if getattr(conn, "_num_transactions", 0):
                raise OutboxError("Outbox.commit() cannot run inside a psycopg conn.transaction() block (psycopg "
                                  "forbids commits there); use record() and let the block commit")
            from psycopg import sql as pgsql

            parts = sql.split("?")
            one_trip = parts[0] + "".join(pgsql.Literal(p).as_string(conn) + rest
                                          for p, rest in zip(params, parts[1:], strict=True)) + "; COMMIT"
        elif mod.startswith("pymysql"):
            from pymysql.constants import CLIENT

            if getattr(conn, "client_flag", 0) & CLIENT.MULTI_STATEMENTS:
                one_trip = conn.cursor().mogrify(d.sql(sql), params) + "; COMMIT"
        if one_trip is None:
            try:
                self.record(conn, *keys, version=version, delay=delay, again_after=again_after)
                conn.commit()
            except BaseException:
                _rollback_quietly(conn)
                raise
            return
        cur = conn.cursor()
        try:
            if mod.startswith("pymysql"):
                cur.execute(one_trip)
                while cur.nextset():  # the COMMIT's result (an error of a later statement is raised here)
                    pass
            else:
                cur.execute(one_trip, prepare=False)  # never prepared: two statements
        except BaseException:
            _rollback_quietly(conn)
            raise
        finally:
            cur.close()

    def message_payload(self, keys: Sequence[str], version: Any = None) -> str:
        """The JSON content ``{"keys": [...], "version": "7" | null}`` of one WAL message; validates the keys."""
        ks = list(dict.fromkeys(keys))
        if not ks:
            raise OutboxError("emit() needs at least one cache key")
        for k in ks:
            check_key(k, self.max_key_bytes)
        return json.dumps({"keys": ks, "version": P.encode_version(version) or None}, separators=(",", ":"))

    def _check_pg(self, conn: Any, what: str) -> str:
        mod = type(conn).__module__
        if not self._dialect(conn).wal_messages or not mod.startswith(("psycopg", "psycopg2")):
            raise OutboxError(f"Outbox.{what}() writes a PostgreSQL WAL message: it needs a psycopg 3 (or, for "
                              f"emit(), psycopg2) connection, not {type(conn).__qualname__} from {mod!r}; use "
                              "record()/commit() (the outbox table) on other databases")
        return mod

    def emit(self, conn: Any, *keys: str, version: Any = None) -> None:
        """PostgreSQL: record that ``keys`` must be invalidated when the caller's transaction on ``conn`` commits,
        as a transactional WAL message (``pg_logical_emit_message(true, message_prefix, json)``) instead of an
        outbox row. Does not commit. The message reaches the WAL only if the transaction commits; ``cachesync
        cdc`` (same ``--message-prefix``, PostgreSQL 14+) invalidates the keys with the transaction's row changes.
        No relay, no table. ``version`` (default None) as in :meth:`record`. psycopg 3 or psycopg2; in autocommit
        mode the message is committed on its own at once.
        """
        self._check_pg(conn, "emit")
        payload = self.message_payload(keys, version)
        cur = conn.cursor()
        try:
            cur.execute("SELECT pg_logical_emit_message(true, %s::text, %s::text)", (self.message_prefix, payload))
        finally:
            cur.close()

    def emit_commit(self, conn: Any, *keys: str, version: Any = None) -> None:
        """PostgreSQL + psycopg 3: :meth:`emit` **and commit** the caller's transaction in one round trip (one
        simple-query string ``SELECT pg_logical_emit_message(...); COMMIT``, values quoted with
        :class:`psycopg.sql.Literal`). Refuses autocommit connections and ``conn.transaction()`` blocks
        (:class:`OutboxError`); on any error the transaction is rolled back and the error re-raised.
        """
        mod = self._check_pg(conn, "emit_commit")
        if mod.startswith("psycopg2"):
            raise OutboxError("Outbox.emit_commit() needs psycopg 3 (psycopg2 does not follow a COMMIT sent inside "
                              "a statement); use emit() + conn.commit()")
        payload = self.message_payload(keys, version)
        if _autocommit(conn, mod):
            raise OutboxError("Outbox.emit_commit() needs a connection in a transaction, not in autocommit mode: "
                              "the caller's statements were already committed one by one, so the message cannot "
                              "be atomic with them")
        if getattr(conn, "_num_transactions", 0):
            raise OutboxError("Outbox.emit_commit() cannot run inside a psycopg conn.transaction() block (psycopg "
                              "forbids commits there); use emit() and let the block commit")
        from psycopg import sql as pgsql

        stmt = (f"SELECT pg_logical_emit_message(true, {pgsql.Literal(self.message_prefix).as_string(conn)}::text, "
                f"{pgsql.Literal(payload).as_string(conn)}::text); COMMIT")
        cur = conn.cursor()
        try:
            cur.execute(stmt, prepare=False)  # never prepared: two statements
        except BaseException:
            _rollback_quietly(conn)
            raise
        finally:
            cur.close()

    def keys_for_change(self, table: str, old: Mapping[str, Any] | None, new: Mapping[str, Any] | None) -> list[str]:
        """The keys a change of ``table`` affects under the rules (old and new keys when a key column changes)."""
        if self.rules is None:
            raise OutboxError("record_change() needs rules: Outbox(rules=Rules.load('rules.toml'))")
        return self.rules.keys_for(table, old, new)

    def record_change(self, conn: Any, table: str, old: Mapping[str, Any] | None = None,
                      new: Mapping[str, Any] | None = None, *, version: Any = None, delay: float = 0.0,
                      again_after: float | None = None) -> list[str]:
        """Record the invalidations of one row change (``old``/``new`` images; None for insert/delete) through the
        rules; returns the keys (``[]`` and nothing recorded for a table without a rule). ``version`` defaults to
        the rule's version column of the new (else old) image."""
        keys = self.keys_for_change(table, old, new)
        if not keys:
            return []
        if version is None and self.rules is not None:
            version = self.rules.version_for(table, new if new is not None else old)
        self.record(conn, *keys, version=version, delay=delay, again_after=again_after)
        return keys

    def _triggers(self, conn: Any, d: Dialect) -> tuple[bool | None, list[str]]:
        """(NOTIFY trigger present — PostgreSQL, else None; tables with capture triggers writing to this outbox)."""
        esc = self.table.replace("_", "\\_")
        names = _trigger_names(conn, d, esc + "\\_%")
        notify = any(n == f"{self.table}_notify" for n, _ in names) if d.notify else None
        suffixes = ("_cap",) if d.trigger_functions else ("_ins", "_upd", "_del")  # see triggers._names
        captured = sorted({tbl for n, tbl in names if n.endswith(suffixes) and tbl != self.table})
        return notify, captured

    def pending(self, conn: Any, include_parked: bool = False) -> int:
        """How many rows wait in the outbox (uses and ends a read transaction on ``conn``)."""
        cur = conn.cursor()
        try:
            where = "" if include_parked else f" WHERE run_at < {PARKED}"
            cur.execute(f"SELECT COUNT(*) FROM {self.table}{where}")
            n = int(cur.fetchone()[0])
            conn.commit()
            return n
        finally:
            cur.close()

    def status(self, conn: Any) -> dict[str, Any]:
        """Health of the outbox (uses and ends a read transaction on ``conn``): ``pending`` (rows not parked),
        ``due`` (of those, due now), ``delayed`` (not yet due), ``oldest_age_s`` (seconds since the oldest pending
        row was recorded, database clock; None if none, or if the table predates the ``created_at`` column),
        ``retrying`` (pending rows with ``attempts`` > 0), ``max_attempts``, ``parked`` (unusable rows, see
        ``last_error``), ``leased`` (SQLite: rows claimed by a relay right now), ``notify_trigger`` (PostgreSQL: whether
        the NOTIFY trigger is installed; None elsewhere) and ``capture_triggers`` (the tables whose capture triggers
        write to this outbox, :mod:`cachesync.outbox.triggers`)."""
        d = self._dialect(conn)
        now, t = now_ms_sql(d), self.table
        cur = conn.cursor()
        try:
            cur.execute(f"SELECT COUNT(*), SUM(CASE WHEN run_at <= {now} THEN 1 ELSE 0 END), "
                        f"SUM(CASE WHEN attempts > 0 THEN 1 ELSE 0 END), MAX(attempts), "
                        f"SUM(CASE WHEN claimed_until > {now} THEN 1 ELSE 0 END) FROM {t} WHERE run_at < {PARKED}")
            pending, due, retrying, max_att, leased = cur.fetchone()
            cur.execute(f"SELECT COUNT(*) FROM {t} WHERE run_at >= {PARKED}")
            parked = cur.fetchone()[0]
            conn.commit()
            age: float | None = None
            try:
                cur.execute(f"SELECT {now} - MIN(created_at) FROM {t} WHERE run_at < {PARKED}")
                v = cur.fetchone()[0]
                age = None if v is None else max(0.0, float(v) / 1000)
                conn.commit()
            except Exception:  # a table created before the created_at column
                conn.rollback()
            notify, captured = self._triggers(conn, d)
            return {"table": t, "pending": int(pending or 0), "due": int(due or 0),
                    "delayed": int(pending or 0) - int(due or 0), "oldest_age_s": age,
                    "retrying": int(retrying or 0), "max_attempts": int(max_att or 0), "parked": int(parked or 0),
                    "leased": int(leased or 0), "notify_trigger": notify, "capture_triggers": captured}
        finally:
            cur.close()


def _trigger_names(conn: Any, d: Dialect, like: str) -> list[tuple[str, str]]:
    """(trigger name, table) of the triggers whose name matches the SQL LIKE pattern ``like``."""
    cur = conn.cursor()
    try:
        cur.execute(d.triggers_sql, (like,))
        rows = [(str(a), str(b)) for a, b in cur.fetchall()]
        conn.commit()
        return rows
    finally:
        cur.close()


def _autocommit(conn: Any, mod: str) -> bool:
    """Whether a DB-API connection commits each statement by itself."""
    if mod.startswith("sqlite3"):
        return conn.isolation_level is None and not conn.in_transaction
    if mod.startswith("pymysql"):
        return bool(conn.get_autocommit())
    return bool(getattr(conn, "autocommit", False))


def _rollback_quietly(conn: Any) -> None:
    """Roll back after a failed :meth:`Outbox.commit` (keeping the original error if the rollback fails too)."""
    try:
        conn.rollback()
    except Exception:  # a broken connection: the server rolls the transaction back when it notices
        pass


_default = Outbox()


def record(conn: Any, *keys: str, version: Any = None, delay: float = 0.0, again_after: float | None = None) -> None:
    """:meth:`Outbox.record` on the default table ``cachesync_outbox``."""
    _default.record(conn, *keys, version=version, delay=delay, again_after=again_after)


def commit(conn: Any, *keys: str, version: Any = None, delay: float = 0.0, again_after: float | None = None) -> None:
    """:meth:`Outbox.commit` on the default table ``cachesync_outbox``: record and commit in one round trip."""
    _default.commit(conn, *keys, version=version, delay=delay, again_after=again_after)


def emit(conn: Any, *keys: str, version: Any = None) -> None:
    """:meth:`Outbox.emit` with the default prefix ``cachesync``: a WAL message, committed by the caller."""
    _default.emit(conn, *keys, version=version)


def emit_commit(conn: Any, *keys: str, version: Any = None) -> None:
    """:meth:`Outbox.emit_commit` with the default prefix ``cachesync``: WAL message + COMMIT in one round trip."""
    _default.emit_commit(conn, *keys, version=version)


__all__ = ["DEFAULT_MESSAGE_PREFIX", "DEFAULT_TABLE", "RelayOptions", "RelayOptionsKwargs", "emit", "emit_commit", "NOTIFY_LIMIT", "PARKED", "Outbox", "OutboxError", "check_table", "commit", "ddl",
           "dialect_of_connection", "now_ms_sql", "record"]
