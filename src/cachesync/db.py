"""Database URLs and DB-API connections for the three supported databases.

``sqlite:///path.db`` (or ``sqlite:///:memory:``), ``postgresql://user@host:port/db``
(psycopg 3), ``mysql://user:pass@host:port/db`` or ``mariadb://...`` (PyMySQL).
The small :class:`Dialect` interface holds what differs between them; the
outbox, the relay and the lab use it instead of branching on names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from ._driver import _split_userinfo, encode_userinfo, redact_url, scrub, scrub_exception
from .errors import DatabaseURLError as DatabaseURLError  # defined in errors.py, re-exported here


@dataclass(frozen=True)
class Dialect:
    name: str
    """``"sqlite"``, ``"postgresql"`` or ``"mysql"``."""
    placeholder: str
    """DB-API parameter marker: ``?`` or ``%s``."""
    skip_locked: bool
    """Supports ``SELECT ... FOR UPDATE SKIP LOCKED``."""
    driver: str
    """Python module used to connect."""

    def sql(self, text: str) -> str:
        """Rewrite ``?`` markers to this dialect's marker."""
        return text if self.placeholder == "?" else text.replace("?", self.placeholder)


SQLITE = Dialect("sqlite", "?", False, "sqlite3")
POSTGRESQL = Dialect("postgresql", "%s", True, "psycopg")
MYSQL = Dialect("mysql", "%s", True, "pymysql")

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
