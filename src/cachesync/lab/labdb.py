"""The lab's own table in the target database (created with a unique name, dropped at the end)."""

from __future__ import annotations

import threading
import uuid
from typing import Any

from ..db import Dialect, connect, dialect_of
from ..errors import CachesyncError
from .embedded import LabError


def open_connection(url: str) -> Any:
    """``db.connect(url)``; a driver's connection error becomes a :class:`LabError` naming the URL."""
    from .._driver import redact_url

    try:
        return connect(url)
    except CachesyncError:
        raise
    except Exception as e:
        raise LabError(f"cannot connect to database {redact_url(url)}: {type(e).__name__}: {e}".strip()) from e


class Session:
    """One actor's database connection; every method is one short transaction."""

    def __init__(self, lab_db: LabDB) -> None:
        self.db = lab_db
        self.conn = open_connection(lab_db.url)
        self.lock = threading.Lock()

    def _q(self, text: str) -> str:
        return self.db.dialect.sql(text.replace("{t}", self.db.table))

    def select(self, key: str) -> tuple[str | None, int | None]:
        with self.lock:
            cur = self.conn.cursor()
            try:
                cur.execute(self._q("SELECT val, version FROM {t} WHERE k = ?"), (key,))
                row = cur.fetchone()
            finally:
                cur.close()
                self.conn.commit()
        return (None, None) if row is None else (str(row[0]), int(row[1]))

    def insert(self, key: str, value: str) -> None:
        with self.lock:
            cur = self.conn.cursor()
            cur.execute(self._q("INSERT INTO {t} (k, val, version) VALUES (?, ?, 1)"), (key, value))
            cur.close()
            self.conn.commit()

    def update(self, key: str, value: str) -> int:
        """UPDATE the row and COMMIT; returns the new version."""
        with self.lock:
            cur = self.conn.cursor()
            try:
                cur.execute(self._q("UPDATE {t} SET val = ?, version = version + 1 WHERE k = ?"), (value, key))
                cur.execute(self._q("SELECT version FROM {t} WHERE k = ?"), (key,))
                row = cur.fetchone()
                self.conn.commit()
            except BaseException:
                self.conn.rollback()
                raise
            finally:
                cur.close()
        return int(row[0])

    def update_open(self, key: str, value: str) -> int:
        """UPDATE the row and return its new version, leaving the transaction open for the caller to commit
        (e.g. :meth:`cachesync.WritePath.write`); the caller holds :attr:`lock`."""
        cur = self.conn.cursor()
        try:
            cur.execute(self._q("UPDATE {t} SET val = ?, version = version + 1 WHERE k = ?"), (value, key))
            cur.execute(self._q("SELECT version FROM {t} WHERE k = ?"), (key,))
            return int(cur.fetchone()[0])
        finally:
            cur.close()

    def update_with_outbox(self, key: str, value: str, outbox: Any) -> int:
        """UPDATE the row and record its invalidation in ``outbox`` (a :class:`cachesync.outbox.Outbox`) in the
        same transaction; COMMIT. Returns the new version."""
        with self.lock:
            cur = self.conn.cursor()
            try:
                cur.execute(self._q("UPDATE {t} SET val = ?, version = version + 1 WHERE k = ?"), (value, key))
                cur.execute(self._q("SELECT version FROM {t} WHERE k = ?"), (key,))
                version = int(cur.fetchone()[0])
                outbox.record(self.conn, key, version=version)
                self.conn.commit()
            except BaseException:
                self.conn.rollback()
                raise
            finally:
                cur.close()
        return version

    def outbox_rows(self, outbox: Any) -> list[tuple[int, str]]:
        """(attempts, last_error) of each row still in ``outbox``."""
        with self.lock:
            cur = self.conn.cursor()
            try:
                cur.execute(f"SELECT attempts, last_error FROM {outbox.table} ORDER BY id")
                rows = [(int(a), str(e or "")) for a, e in cur.fetchall()]
            finally:
                cur.close()
                self.conn.commit()
        return rows

    def update_failing(self, key: str, value: str) -> str:
        """UPDATE the row, then a statement that fails (duplicate key); ROLLBACK. Returns the error's name."""
        with self.lock:
            cur = self.conn.cursor()
            try:
                cur.execute(self._q("UPDATE {t} SET val = ?, version = version + 1 WHERE k = ?"), (value, key))
                cur.execute(self._q("INSERT INTO {t} (k, val, version) VALUES (?, ?, 1)"), (key, value))
                self.conn.commit()
            except Exception as e:
                self.conn.rollback()
                return type(e).__name__
            finally:
                cur.close()
        raise LabError("the failing update unexpectedly committed")

    def close(self) -> None:
        try:
            self.conn.close()
        except Exception:
            pass


class LabDB:
    """The lab table ``cachesync_lab_<random>`` in the database at ``url``."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.dialect: Dialect = dialect_of(url)
        self.table = f"cachesync_lab_{uuid.uuid4().hex[:10]}"
        self._sessions: dict[str, Session] = {}
        self.created = False

    def create(self) -> None:
        s = self.session("_admin")
        with s.lock:
            cur = s.conn.cursor()
            cur.execute(f"CREATE TABLE {self.table} (k VARCHAR(100) PRIMARY KEY, val VARCHAR(200) NOT NULL, "
                        "version INTEGER NOT NULL)")
            cur.close()
            s.conn.commit()
        self.created = True

    def session(self, actor: str) -> Session:
        s = self._sessions.get(actor)
        if s is None:
            s = self._sessions[actor] = Session(self)
        return s

    def drop(self) -> None:
        for name in [n for n in self._sessions if n != "_admin"]:
            self._sessions.pop(name).close()
        if self.created:
            s = self.session("_admin")
            with s.lock:
                try:
                    s.conn.rollback()
                    cur = s.conn.cursor()
                    cur.execute(f"DROP TABLE {self.table}")
                    cur.close()
                    s.conn.commit()
                except Exception:
                    pass
            self.created = False
        for sess in self._sessions.values():
            sess.close()
        self._sessions.clear()
