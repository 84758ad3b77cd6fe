"""Database URLs and DB-API connections for the three supported databases.

``sqlite:///path.db`` (or ``sqlite:///:memory:``), ``postgresql://user@host:port/db``
(psycopg 3), ``mysql://user:pass@host:port/db`` or ``mariadb://...`` (PyMySQL).
The :class:`Dialect` objects (:data:`SQLITE`, :data:`POSTGRESQL`, :data:`MYSQL`) hold what differs between
them, as data and small methods over that data; the outbox, the capture triggers, the relay, the lab and the
integrations use them instead of branching on names. docs/testing.md lists every field and what still
branches; :class:`cachesync.testing.DialectConformance` checks a dialect.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from ._driver import _split_userinfo, encode_userinfo, redact_url, scrub, scrub_exception
from .errors import DatabaseURLError as DatabaseURLError  # defined in errors.py, re-exported here


@dataclass(frozen=True)
class Dialect:
    """What differs between the supported databases, as data (and small methods over that data).

    The first four fields are the original positional ones; every other field has the SQLite value as its default
    (SQLite is the dialect with the fewest features). :class:`cachesync.testing.DialectConformance` checks that a
    dialect provides all of them, and runs the SQL ones against a live database.
    """

    name: str
    """``"sqlite"``, ``"postgresql"`` or ``"mysql"``."""
    placeholder: str
    """DB-API parameter marker: ``?`` or ``%s``."""
    skip_locked: bool
    """Supports ``SELECT ... FOR UPDATE SKIP LOCKED``."""
    driver: str
    """Python module used to connect."""
    driver_modules: tuple[str, ...] = ("sqlite3",)
    """Prefixes of the modules of DB-API connections of this database (``Outbox`` tells the dialect of a
    connection by them)."""
    for_update: bool = False
    """Supports row locks (``SELECT ... FOR UPDATE``)."""
    notify: bool = False
    """Supports ``LISTEN``/``NOTIFY`` (the outbox's NOTIFY trigger, the relay's wake-ups)."""
    wal_messages: bool = False
    """Supports transactional WAL messages (``pg_logical_emit_message``: ``Outbox.emit``, trigger target
    ``"wal"``)."""
    wal_position_sql: str | None = None
    """Query of the server's current log position in bytes (the CDC lag in bytes); ``None``: not exported."""
    now_ms: str = "CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER)"
    """SQL expression: now, in ms since the epoch, by the database clock."""
    ident_quote: str = '"'
    """The character that quotes an identifier."""
    backslash_escapes: bool = False
    """String literals treat ``\\`` as an escape character (MySQL's default), so :meth:`literal` doubles it."""
    text_cast: str = "TEXT"
    """The type of ``CAST(x AS ...)`` to text."""
    concat_function: str | None = None
    """The function that concatenates strings; ``None``: the ``||`` operator."""
    json_array_function: str = "json_array"
    """The function that builds a JSON array from its arguments."""
    epoch_us: str | None = None
    """SQL template (``{}``: a timestamp expression) of its epoch microseconds as text; ``None``: no timestamp
    types (capture triggers refuse timestamp version columns)."""
    serial_key: str = "INTEGER PRIMARY KEY"
    """DDL of an auto-assigned integer primary key (SQLite: the rowid)."""
    bigint: str = "INTEGER"
    """DDL type of a 64-bit integer."""
    integer: str = "INTEGER"
    """DDL type of a (32-bit or wider) integer."""
    long_text: str = "TEXT"
    """DDL type of a text of any length."""
    short_text: str = "TEXT"
    """DDL type of a short text (at most 64 characters)."""
    partial_index: bool = True
    """Supports ``CREATE INDEX ... WHERE`` (else an index is declared inside ``CREATE TABLE``)."""
    table_options: str = ""
    """Suffix of ``CREATE TABLE`` statements (e.g. the storage engine)."""
    trigger_functions: bool = False
    """Triggers execute a stored function (one per table, for every event); ``False``: one trigger per event,
    with its statement inline (the body written with :meth:`trigger_body`)."""
    trigger_body_template: str = "BEGIN {}; END"
    """How a trigger's single statement (``{}``) is written when :attr:`trigger_functions` is ``False``."""
    triggers_sql: str = ("SELECT name, tbl_name FROM sqlite_master WHERE type = 'trigger' AND name LIKE ? "
                         "ESCAPE '\\'")
    """Query of (trigger name, table) of the triggers whose name matches one ``LIKE`` parameter (``\\``
    escapes)."""
    columns_sql: str = "SELECT name, type FROM pragma_table_info(?)"
    """Query of (column name, SQL type) of the table named by one parameter."""

    def sql(self, text: str) -> str:
        """Rewrite ``?`` markers to this dialect's marker."""
        return text if self.placeholder == "?" else text.replace("?", self.placeholder)

    def ident(self, name: str) -> str:
        """A quoted identifier (``name`` must not contain the quote character; callers validate names)."""
        return f"{self.ident_quote}{name}{self.ident_quote}"

    def literal(self, text: str) -> str:
        """A SQL string literal of ``text``."""
        if self.backslash_escapes:
            text = text.replace("\\", "\\\\")
        return "'" + text.replace("'", "''") + "'"

    def cast_text(self, expr: str) -> str:
        """SQL: ``expr`` cast to text."""
        return f"CAST({expr} AS {self.text_cast})"

    def concat(self, parts: Sequence[str]) -> str:
        """SQL: the concatenation of the text expressions ``parts`` (at least one)."""
        if len(parts) == 1:
            return parts[0]
        if self.concat_function is not None:
            return f"{self.concat_function}({', '.join(parts)})"
        return " || ".join(parts)

    def json_array(self, exprs: Sequence[str]) -> str:
        """SQL: a JSON array of ``exprs``."""
        return f"{self.json_array_function}({', '.join(exprs)})"

    def trigger_body(self, statement: str) -> str:
        """A trigger's inline body running ``statement``."""
        return self.trigger_body_template.format(statement)


SQLITE = Dialect("sqlite", "?", False, "sqlite3")
POSTGRESQL = Dialect(
    "postgresql", "%s", True, "psycopg", driver_modules=("psycopg", "psycopg2"), for_update=True, notify=True,
    wal_messages=True, wal_position_sql="SELECT pg_current_wal_lsn() - '0/0'::pg_lsn",
    now_ms="(extract(epoch from statement_timestamp()) * 1000)::bigint",
    json_array_function="json_build_array",
    epoch_us="CAST(CAST(extract(epoch from {}) * 1000000 AS BIGINT) AS TEXT)",
    serial_key="BIGSERIAL PRIMARY KEY", bigint="BIGINT", trigger_functions=True,
    triggers_sql="SELECT t.tgname, c.relname FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid "
                 "WHERE NOT t.tgisinternal AND t.tgname LIKE %s",
    columns_sql="SELECT a.attname, format_type(a.atttypid, a.atttypmod) FROM pg_attribute a "
                "WHERE a.attrelid = to_regclass(%s) AND a.attnum > 0 AND NOT a.attisdropped")
MYSQL = Dialect(
    "mysql", "%s", True, "pymysql", driver_modules=("pymysql", "MySQLdb", "mysql"), for_update=True,
    now_ms="CAST(UNIX_TIMESTAMP(NOW(3)) * 1000 AS SIGNED)",
    ident_quote="`", backslash_escapes=True, text_cast="CHAR", concat_function="CONCAT",
    json_array_function="JSON_ARRAY",
    epoch_us="CAST(TIMESTAMPDIFF(MICROSECOND, '1970-01-01 00:00:00', {}) AS CHAR)",
    serial_key="BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY", bigint="BIGINT", integer="INT",
    long_text="LONGTEXT", short_text="VARCHAR(64)", partial_index=False, table_options=" ENGINE=InnoDB",
    trigger_body_template="{}",
    triggers_sql="SELECT TRIGGER_NAME, EVENT_OBJECT_TABLE FROM information_schema.TRIGGERS "
                 "WHERE TRIGGER_SCHEMA = DATABASE() AND TRIGGER_NAME LIKE %s",
    columns_sql="SELECT COLUMN_NAME, DATA_TYPE FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = DATABASE() "
                "AND TABLE_NAME = %s")

DIALECTS: tuple[Dialect, ...] = (SQLITE, POSTGRESQL, MYSQL)
"""Every supported dialect."""

_SCHEMES = {"sqlite": SQLITE, "postgresql": POSTGRESQL, "postgres": POSTGRESQL, "mysql": MYSQL,
            "mariadb": MYSQL, "mysql+pymysql": MYSQL, "postgresql+psycopg": POSTGRESQL}


def dialect_of(url: str) -> Dialect:
    """The :class:`Dialect` of a database URL, or :class:`DatabaseURLError` naming the scheme."""
    if not isinstance(url, str) or "://" not in url:
        raise DatabaseURLError(f"database URL {url!r} must look like sqlite:///file.db, postgresql://host/db "
                               "or mysql://user@host/db")
    scheme = url.split("://", 1)[0].lower()
    try:
        return _SCHEMES[scheme]
    except KeyError:
        raise DatabaseURLError(f"database URL {redact_url(url)!r}: unknown scheme {scheme!r}; use sqlite://, "
                               "postgresql:// or mysql:// (mariadb://)") from None


def connect(url: str, **kwargs: Any) -> Any:
    """A new DB-API connection for ``url`` (autocommit off). Raises :class:`DatabaseURLError` with a clear
    message for a bad URL or a missing driver; connection errors of the driver propagate, as the driver's own
    exception type, with every secret of ``url`` scrubbed from their message (drivers echo tokens of the URL)."""
    d = dialect_of(url)
    try:
        return _connect(d, url, **kwargs)
    except DatabaseURLError:
        raise
    except Exception as e:
        raise scrub_exception(e, url).with_traceback(None) from None


def _connect(d: Dialect, url: str, **kwargs: Any) -> Any:
    if d is SQLITE:
        import sqlite3

        path = url.split("://", 1)[1]
        path = path[1:] if path.startswith("/") else path
        if not path:
            raise DatabaseURLError(f"database URL {redact_url(url)!r}: sqlite needs a path (sqlite:///file.db)")
        conn = sqlite3.connect(path, timeout=kwargs.pop("timeout", 30.0), check_same_thread=False, **kwargs)
        conn.execute("PRAGMA journal_mode=WAL") if path != ":memory:" else None
        return conn
    if d is POSTGRESQL:
        try:
            import psycopg
        except ImportError:
            raise DatabaseURLError("postgresql:// needs psycopg: pip install 'cachesync[postgres]'") from None
        clean = encode_userinfo("postgresql://" + url.split("://", 1)[1])
        return psycopg.connect(clean, **kwargs)
    try:
        import pymysql
    except ImportError:
        raise DatabaseURLError("mysql:// needs PyMySQL: pip install 'cachesync[mysql]'") from None
    # the userinfo is split off by hand: a password may hold unencoded "/", "#", "?" or "@"
    parts = _split_userinfo(url)
    user, password, rest = "root", "", url.split("://", 1)[1]
    if parts is not None:
        u, _, pw = parts[1].partition(":")
        user, password, rest = unquote(u) or "root", unquote(pw), parts[2]
    p = urlsplit("mysql://" + rest)
    try:
        port = p.port or 3306
    except ValueError as e:
        raise DatabaseURLError(f"database URL {redact_url(url)!r}: {scrub(e, url)}") from None
    q = {k: v[-1] for k, v in parse_qs(p.query).items()}
    db = p.path.lstrip("/")
    if not db:
        raise DatabaseURLError(f"database URL {redact_url(url)!r}: name the database (mysql://user@host/db)")
    return pymysql.connect(host=p.hostname or "127.0.0.1", port=port, user=user, password=password, database=db,
                           autocommit=False, charset=q.get("charset", "utf8mb4"), **kwargs)
