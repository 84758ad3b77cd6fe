"""The outbox relay: claims outbox rows in batches, applies them to Redis and/or publishes them on a bus,
then deletes them.

Crash safety: a row is deleted only in the transaction that claimed it (PostgreSQL, MariaDB/MySQL:
``SELECT ... FOR UPDATE SKIP LOCKED``, so several relays share the work) or, on SQLite, after a lease claim
(``claimed_until``/``claimed_by``; a dead relay's rows come back when its lease expires) — and only after
the invalidations were applied to Redis or acknowledged by the bus. A relay killed at any point leaves the
rows in the table; the next relay applies them again (invalidation is idempotent).

When Redis or the bus is unreachable the rows stay (``attempts`` + 1, ``last_error``), the relay backs off
exponentially up to ``max_backoff`` and resumes. On PostgreSQL the relay ``LISTEN``\\ s on the channel named
after the table (the outbox trigger ``NOTIFY``\\ s on insert) and also polls every ``poll_interval`` seconds,
because notifications sent while it was disconnected are lost. Rows with a future ``run_at`` (delayed
deletes) are claimed when due; the relay sleeps until the earliest one.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .._driver import redact_url
from ..bus import Bus, BusUnavailableError, Invalidation
from ..bus.apply import apply_invalidations
from ..db import POSTGRESQL, SQLITE, connect, dialect_of
from ..errors import InvalidationError, UsageError
from ..keys import check_key
from ..sync import Cache
from . import DEFAULT_TABLE, PARKED, Outbox, OutboxError, check_table, now_ms_sql
from ._fault import point

log = logging.getLogger("cachesync.relay")

_DELIVERY_ERRORS = (InvalidationError, BusUnavailableError)


@dataclass
class Row:
    """A claimed outbox row."""

    id: int
    keys: list[str]
    version: str | None
    attempts: int


class Relay:
    """Moves outbox rows to Redis (and/or a bus). ``Relay(db_url, cache=None, *, bus=None, apply=None,
    table="cachesync_outbox", batch_size=500, poll_interval=None, listen=True, lease=30.0, max_backoff=5.0,
    init=True, on_error=None, on_batch=None)``.

    ``cache``: the :class:`cachesync.Cache` to invalidate in (needed unless only publishing). ``bus``: publish
    every row on this bus. ``apply`` (default: True without a bus, False with one): also invalidate in
    ``cache``. ``poll_interval`` (default 1.0 s when listening on PostgreSQL, else 0.05 s). ``listen``
    (default True): use LISTEN/NOTIFY on PostgreSQL. ``lease`` (SQLite, default 30 s): how long a claim keeps
    rows from other relays. ``max_backoff`` (default 5 s): longest wait between retries while Redis/the bus
    is down. ``init`` (default True): create the table on start. ``on_error(exc)``/``on_batch(n)``: hooks
    called after a failed delivery / a completed batch (tests, metrics).
    """

    def __init__(self, db_url: str, cache: Cache | None = None, *, bus: Bus | None = None, apply: bool | None = None,
                 table: str = DEFAULT_TABLE, batch_size: int = 500, poll_interval: float | None = None,
                 listen: bool = True, lease: float = 30.0, max_backoff: float = 5.0, init: bool = True,
                 on_error: Callable[[BaseException], None] | None = None,
                 on_batch: Callable[[int], None] | None = None) -> None:
        self.dialect = dialect_of(db_url)
        self.db_url = db_url
        self.table = check_table(table)
        self.apply = (bus is None) if apply is None else apply
        if self.apply and cache is None:
            raise OutboxError("the relay needs a cache (redis_url) to apply invalidations, or a bus to publish to")
        if not self.apply and bus is None:
            raise OutboxError("the relay with apply=False needs a bus")
        for name, v in (("batch_size", batch_size), ("lease", lease), ("max_backoff", max_backoff)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
                raise OutboxError(f"{name} must be > 0, got {v!r}")
        self.cache, self.bus = cache, bus
        self.batch_size = int(batch_size)
        self.listen = listen and self.dialect is POSTGRESQL
        if poll_interval is None:
            poll_interval = 1.0 if self.listen else 0.05
        if isinstance(poll_interval, bool) or not isinstance(poll_interval, (int, float)) or poll_interval <= 0:
            raise OutboxError(f"poll_interval must be > 0 seconds, got {poll_interval!r}")
        self.poll_interval = float(poll_interval)
        self.lease_ms = int(lease * 1000)
        self.max_backoff = float(max_backoff)
        self.on_error, self.on_batch = on_error, on_batch
        self.relay_id = f"{socket.gethostname()[:40]}:{os.getpid()}:{id(self) & 0xffff:x}"
        self.outbox = Outbox(self.table, dialect=self.dialect)
        self.stats = {"batches": 0, "rows": 0, "keys": 0, "errors": 0, "parked": 0}
        self._conn: Any = None
        self._lconn: Any = None
        self._init = init
        self._now = now_ms_sql(self.dialect)

    # ------------------------------------------------------------------ connections

    def _db(self) -> Any:
        if self._conn is None:
            self._conn = connect(self.db_url)
            if self._init:
                self.outbox.init(self._conn)
                self._init = False
            if self.dialect.name == "mysql":
                cur = self._conn.cursor()
                cur.execute("SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED")  # no gap locks on inserts
                cur.close()
        return self._conn

    def _listener(self) -> Any:
        if self._lconn is None:
            import psycopg

            self._lconn = psycopg.connect("postgresql://" + self.db_url.split("://", 1)[1], autocommit=True)
            self._lconn.execute(f'LISTEN "{self.table}"')
        return self._lconn

    def _reset(self) -> None:
        for c in (self._conn, self._lconn):
            if c is not None:
                try:
                    c.close()
                except Exception:
                    pass
        self._conn = self._lconn = None

    def close(self) -> None:
        """Close the database connections (not the cache or the bus)."""
        self._reset()

    # ------------------------------------------------------------------ one batch

    def _parse(self, raw: list[tuple[Any, ...]]) -> tuple[list[Row], list[tuple[int, str]]]:
        good, bad = [], []
        for rid, keys, ver, attempts in raw:
            try:
                ks = json.loads(keys)
                if not isinstance(ks, list) or not ks:
                    raise ValueError("cache_keys is not a non-empty JSON list")
                for k in ks:
                    check_key(k, 1 << 20)
                good.append(Row(int(rid), ks, ver, int(attempts)))
            except (ValueError, UsageError) as e:
                bad.append((int(rid), f"{type(e).__name__}: {e}"))
        return good, bad

    def _deliver(self, rows: list[Row]) -> None:
        if self.apply:
            assert self.cache is not None
            apply_invalidations(self.cache, [(r.keys, r.version) for r in rows])
        if self.bus is not None:
            self.bus.publish([Invalidation(tuple(r.keys), r.version) for r in rows])

    def _ids(self, ids: list[int]) -> str:
        return ",".join(str(int(i)) for i in ids)

    def run_once(self) -> int:
        """Claim, deliver and delete one batch. Returns how many rows were completed (0: nothing due).

        Raises :class:`InvalidationError`/:class:`BusUnavailableError` after recording the failed attempt.
        """
        return self._once_lease() if self.dialect is SQLITE else self._once_locked()

    def _once_locked(self) -> int:
        conn = self._db()
        cur = conn.cursor()
        try:
            cur.execute(f"SELECT id, cache_keys, key_version, attempts FROM {self.table} WHERE run_at <= {self._now} "
                        f"ORDER BY id LIMIT {self.batch_size} FOR UPDATE SKIP LOCKED")
            raw = cur.fetchall()
            if not raw:
                conn.commit()
                return 0
            point("claimed")
            rows, bad = self._parse(raw)
            try:
                self._deliver(rows)
            except _DELIVERY_ERRORS as e:
                conn.rollback()
                self._failed(cur, [r.id for r in rows], e)
                conn.commit()
                raise
            point("applied")
            if rows:
                cur.execute(f"DELETE FROM {self.table} WHERE id IN ({self._ids([r.id for r in rows])})")
            self._park(cur, bad)
            point("deleted")
            conn.commit()
            point("committed")
            self._done(rows)
            return len(rows) + len(bad)
        except BaseException:
            try:
                conn.rollback()
            except Exception:
                pass
            raise
        finally:
            cur.close()

    def _once_lease(self) -> int:
        conn = self._db()
        cur = conn.cursor()
        try:
            cur.execute(f"UPDATE {self.table} SET claimed_until = {self._now} + {self.lease_ms}, claimed_by = ? "
                        f"WHERE id IN (SELECT id FROM {self.table} WHERE run_at <= {self._now} AND claimed_until <= "
                        f"{self._now} ORDER BY id LIMIT {self.batch_size}) "
                        "RETURNING id, cache_keys, key_version, attempts", (self.relay_id,))
            raw = sorted(cur.fetchall())
            conn.commit()
            if not raw:
                return 0
            point("claimed")
            rows, bad = self._parse(raw)
            try:
                self._deliver(rows)
            except _DELIVERY_ERRORS as e:
                self._failed(cur, [r.id for r in rows], e, release=True)
                conn.commit()
                raise
            point("applied")
            if rows:
                cur.execute(f"DELETE FROM {self.table} WHERE claimed_by = ? AND id IN "
                            f"({self._ids([r.id for r in rows])})", (self.relay_id,))
            self._park(cur, bad)
            point("deleted")
            conn.commit()
            point("committed")
            self._done(rows)
            return len(rows) + len(bad)
        except BaseException:
            try:
                conn.rollback()
            except Exception:
                pass
            raise
        finally:
            cur.close()

    def _failed(self, cur: Any, ids: list[int], e: BaseException, release: bool = False) -> None:
        self.stats["errors"] += 1
        if not ids:
            return
        extra = ", claimed_until = 0" if release else ""
        cur.execute(self.dialect.sql(f"UPDATE {self.table} SET attempts = attempts + 1, last_error = ?{extra} "
                                     f"WHERE id IN ({self._ids(ids)})"), (str(e)[:2000],))

    def _park(self, cur: Any, bad: list[tuple[int, str]]) -> None:
        for rid, err in bad:
            log.error("cachesync relay: outbox row %d of %s is unusable, parked: %s", rid, self.table, err)
            cur.execute(self.dialect.sql(f"UPDATE {self.table} SET run_at = {PARKED}, last_error = ? WHERE id = ?"),
                        (err[:2000], rid))
        self.stats["parked"] += len(bad)

    def _done(self, rows: list[Row]) -> None:
        self.stats["batches"] += 1
        self.stats["rows"] += len(rows)
        self.stats["keys"] += sum(len(r.keys) for r in rows)
        if self.on_batch is not None:
            self.on_batch(len(rows))

    # ------------------------------------------------------------------ loop

    def _next_due(self) -> float:
        """Seconds until the earliest delayed row is due (capped at ``poll_interval``)."""
        conn = self._db()
        cur = conn.cursor()
        try:
            cur.execute(f"SELECT MIN(run_at) - {self._now} FROM {self.table} WHERE run_at > 0 AND run_at < {PARKED}")
            v = cur.fetchone()[0]
            conn.commit()
        finally:
            cur.close()
        if v is None:
            return self.poll_interval
        return max(0.0, min(self.poll_interval, float(v) / 1000))

    def _wait(self, seconds: float, stop: threading.Event) -> None:
        if seconds <= 0:
            return
        if not self.listen:
            stop.wait(seconds)
            return
        lconn = self._listener()
        for _ in lconn.notifies(timeout=seconds, stop_after=1):
            pass

    def drain(self) -> int:
        """Deliver every row that is due now, then return how many (raises if Redis/the bus is down)."""
        total = 0
        while True:
            n = self.run_once()
            total += n
            if n == 0:
                return total

    def run(self, stop: threading.Event | None = None) -> None:
        """Relay until ``stop`` is set (or forever). Errors of Redis, the bus or the database are logged and
        retried with exponential backoff; nothing is lost."""
        stop = stop or threading.Event()
        backoff = 0.0
        while not stop.is_set():
            try:
                if self.listen:
                    self._listener()  # LISTEN before claiming, so that no NOTIFY falls in between
                n = self.run_once()
                backoff = 0.0
                if n >= self.batch_size:
                    continue
                self._wait(self._next_due(), stop)
            except _DELIVERY_ERRORS as e:
                backoff = min(self.max_backoff, backoff * 2 if backoff else 0.05)
                log.warning("cachesync relay: delivery failed, retrying in %.2fs: %s", backoff, e)
                if self.on_error is not None:
                    self.on_error(e)
                stop.wait(backoff)
            except UsageError:
                raise
            except Exception as e:  # database errors: reconnect
                backoff = min(self.max_backoff, backoff * 2 if backoff else 0.05)
                log.warning("cachesync relay: database %s: %s: %s; reconnecting in %.2fs", redact_url(self.db_url),
                            type(e).__name__, e, backoff)
                self.stats["errors"] += 1
                if self.on_error is not None:
                    self.on_error(e)
                self._reset()
                stop.wait(backoff)
        self.close()


def wait_empty(db_url: str, table: str = DEFAULT_TABLE, timeout: float = 30.0) -> bool:
    """Wait until the outbox holds no due or delayed row (parked rows excepted); True if it emptied."""
    ob = Outbox(table, dialect=dialect_of(db_url))
    conn = connect(db_url)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ob.pending(conn) == 0:
                return True
            time.sleep(0.02)
        return False
    finally:
        conn.close()
