"""The production write path: record in the outbox, commit, invalidate at once; a failed invalidation is not an error.

Theory of operation. A write has two jobs for the cache: readers must see it *at once* (read-your-writes), and
its invalidation must be delivered *even if the process dies or Redis is down* right after the commit. No single
step does both:

* invalidating in the request after the commit gives read-your-writes but is lost if the process dies or
  Redis is unreachable at that moment;
* the transactional outbox (or capture triggers, or CDC) is durable but the relay runs a little later, so the
  first read after the write can still see the old value (measured: up to 17 stale first reads in 200 rounds).

:class:`WritePath` (sync) and :class:`AsyncWritePath` do both, in this order::

    wp = cachesync.WritePath(cache, outbox=Outbox())          # or outbox="triggers" / "cdc" / "orm"
    with wp.write(conn, "user:1", "user_by_email:a@x", version=7):
        conn.execute("UPDATE users SET email=%s, version=7 WHERE id=1", ...)
    # 1. the outbox row is inserted in the same transaction, 2. the transaction commits,
    # 3. the keys are invalidated in Redis (and the L1) before the block returns

If step 3 fails (Redis down, timeout), the commit stands, the outbox row is still there and the relay delivers
it later: by default (``on_invalidation_error="log"``) the failure is logged at WARNING with the keys and the
Redis URL without its password, counted in :attr:`WritePath.failed_invalidations`, and *not* raised, so a request
whose commit succeeded does not answer 500. ``"raise"`` re-raises the :class:`~cachesync.InvalidationError` (the
commit has happened all the same). If the block raises, the transaction is rolled back and nothing is recorded
or invalidated.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from typing import TYPE_CHECKING, Any, Literal

from .errors import CacheUnavailableError, ConfigError, InvalidationError
from .outbox import Outbox

if TYPE_CHECKING:
    from ._async.cache import AsyncCache
    from ._sync.cache import Cache

log = logging.getLogger("cachesync.writepath")

Durable = Literal["triggers", "cdc", "orm"]
"""``outbox=`` values for a write path whose durable record is made by the database itself (capture triggers,
CDC) or by :class:`cachesync.outbox.sqlalchemy.OutboxSync` on the ORM session."""

ORM_RECORDED = "cachesync_recorded"
"""``Session.info`` key under which :class:`~cachesync.outbox.sqlalchemy.OutboxSync` lists the ``(keys, version)``
it recorded in the session's current transaction (read by the write path to invalidate them after the commit)."""


class PendingWrite:
    """The object a write block receives: ``add(*keys, version=None)`` adds keys to record and invalidate."""

    def __init__(self, keys: Sequence[str], version: Any) -> None:
        self.groups: list[tuple[list[str], Any]] = [(list(keys), version)] if keys else []
        self.invalidated = False
        """True when the in-request invalidation after the commit succeeded."""

    def add(self, *keys: str, version: Any = None) -> None:
        """Add ``keys`` (with their own committed ``version``) to this write."""
        if keys:
            self.groups.append((list(keys), version))


def _check(outbox: object, on_invalidation_error: object) -> None:
    if not (isinstance(outbox, Outbox) or outbox in ("triggers", "cdc", "orm")):
        raise ConfigError("outbox", f"{outbox!r} must be a cachesync.outbox.Outbox, or 'triggers', 'cdc' or 'orm' "
                          "(the durable record is made by capture triggers, CDC or OutboxSync); a write path without "
                          "a durable record would lose the invalidation when Redis is down")
    if on_invalidation_error not in ("log", "raise"):
        raise ConfigError("on_invalidation_error", f"{on_invalidation_error!r} must be 'log' or 'raise'")


def _is_sa_session(conn: Any) -> bool:
    return any(c.__module__.startswith("sqlalchemy") and c.__name__ == "Session" for c in type(conn).__mro__)


def _is_sa(conn: Any) -> bool:
    return type(conn).__module__.startswith("sqlalchemy")


class _Base:
    def __init__(self, outbox: Outbox | Durable, on_invalidation_error: Literal["log", "raise"]) -> None:
        _check(outbox, on_invalidation_error)
        self.outbox = outbox
        self.on_invalidation_error = on_invalidation_error
        self.failed_invalidations = 0
        """How many in-request invalidations failed after a commit (left to the outbox / triggers / CDC)."""

    def _failed(self, url: str, keys: list[str], e: Exception) -> None:
        self.failed_invalidations += 1
        if self.on_invalidation_error == "raise":
            raise e
        log.warning("cachesync: invalidation after a successful commit failed; left to the %s, which delivers it "
                    "later: keys %r, Redis %s: %s: %s",
                    "outbox relay" if isinstance(self.outbox, Outbox) else self.outbox, keys, url,
                    type(e).__name__, e)

    def _record_sync(self, conn: Any, w: PendingWrite) -> None:
        """Insert the outbox rows of ``w`` through ``conn`` (a DB-API or SQLAlchemy sync connection/session)."""
        if not isinstance(self.outbox, Outbox):
            return
        for keys, version in w.groups:
            if _is_sa(conn):
                from .outbox.sqlalchemy import record

                record(conn, *keys, version=version, outbox=self.outbox)
            else:
                self.outbox.record(conn, *keys, version=version)


class WritePath(_Base):
    """The recommended write path for :class:`cachesync.Cache`: outbox row in the transaction, commit, invalidate.

    ``WritePath(cache, outbox, on_invalidation_error="log")``. ``outbox``: an :class:`~cachesync.outbox.Outbox`
    (rows inserted by the write path), or ``"triggers"`` / ``"cdc"`` / ``"orm"`` when capture triggers, CDC or
    :class:`~cachesync.outbox.sqlalchemy.OutboxSync` make the durable record. ``on_invalidation_error``
    (default ``"log"``): what a failed invalidation after a successful commit does, ``"log"`` (WARNING, left to
    the outbox) or ``"raise"``.
    """

    def __init__(self, cache: Cache, outbox: Outbox | Durable, *,
                 on_invalidation_error: Literal["log", "raise"] = "log") -> None:
        super().__init__(outbox, on_invalidation_error)
        self.cache = cache

    @contextmanager
    def write(self, conn: Any, *keys: str, version: Any = None) -> Iterator[PendingWrite]:
        """``with wp.write(conn, *keys, version=None) as w:`` run the statements; the block's end records the outbox
        row(s) in ``conn``'s transaction, commits ``conn`` and invalidates (:meth:`invalidate_committed`).

        ``conn``: a DB-API connection (sqlite3, psycopg, psycopg2, PyMySQL) or a SQLAlchemy ``Connection`` /
        ``Session``. With an ORM ``Session`` and :class:`OutboxSync` installed, the keys it recorded at flush
        are invalidated too. On an exception the transaction is rolled back and the exception propagates.
        """
        w = PendingWrite(keys, version)
        session = _is_sa_session(conn)
        if session:
            conn.info.pop(ORM_RECORDED, None)
        try:
            yield w
            if session:
                conn.flush()
                w.groups += conn.info.pop(ORM_RECORDED, [])
            self._record_sync(conn, w)
            conn.commit()
        except BaseException:
            try:
                conn.rollback()
            finally:
                if session:
                    conn.info.pop(ORM_RECORDED, None)
            raise
        w.invalidated = self.invalidate_committed(w.groups)

    def invalidate_committed(self, groups: Sequence[tuple[Sequence[str], Any]]) -> bool:
        """Invalidate ``[(keys, version), ...]`` of a write *that has committed* (for code that commits itself,
        e.g. in ``transaction.on_commit``). Returns True on success; a failure follows ``on_invalidation_error``."""
        ok = True
        for keys, version in groups:
            if not keys:
                continue
            try:
                self.cache.invalidate(*keys, version=version)
            except (InvalidationError, CacheUnavailableError) as e:
                ok = False
                self._failed(self.cache.url, list(keys), e)
        return ok


class AsyncWritePath(_Base):
    """:class:`WritePath` for :class:`cachesync.AsyncCache`: ``async with wp.write(conn, *keys, version=None)``.

    ``conn``: a SQLAlchemy ``AsyncSession`` / ``AsyncConnection`` or a psycopg 3 ``AsyncConnection``.
    """

    def __init__(self, cache: AsyncCache, outbox: Outbox | Durable, *,
                 on_invalidation_error: Literal["log", "raise"] = "log") -> None:
        super().__init__(outbox, on_invalidation_error)
        self.cache = cache

    async def _record(self, conn: Any, w: PendingWrite) -> None:
        if not isinstance(self.outbox, Outbox) or not w.groups:
            return
        if _is_sa(conn):  # AsyncSession / AsyncConnection: run the sync recorder on the greenlet-backed sync object
            await conn.run_sync(lambda sync_conn: self._record_sync(sync_conn, w))
            return
        from .outbox import dialect_of_connection

        d = self.outbox.dialect or dialect_of_connection(conn)
        for keys, version in w.groups:
            sql, params = self.outbox.insert_sql(d, self.outbox.rows_for(keys, version))
            await conn.execute(d.sql(sql), params)

    @asynccontextmanager
    async def write(self, conn: Any, *keys: str, version: Any = None) -> AsyncIterator[PendingWrite]:
        """See :meth:`WritePath.write`."""
        w = PendingWrite(keys, version)
        session = _is_sa(conn) and hasattr(conn, "sync_session")
        if session:
            conn.info.pop(ORM_RECORDED, None)
        try:
            yield w
            if session:
                await conn.flush()
                w.groups += conn.info.pop(ORM_RECORDED, [])
            await self._record(conn, w)
            await conn.commit()
        except BaseException:
            try:
                await conn.rollback()
            finally:
                if session:
                    conn.info.pop(ORM_RECORDED, None)
            raise
        w.invalidated = await self.invalidate_committed(w.groups)

    async def invalidate_committed(self, groups: Sequence[tuple[Sequence[str], Any]]) -> bool:
        """See :meth:`WritePath.invalidate_committed`."""
        ok = True
        for keys, version in groups:
            if not keys:
                continue
            try:
                await self.cache.invalidate(*keys, version=version)
            except (InvalidationError, CacheUnavailableError) as e:
                ok = False
                self._failed(self.cache.url, list(keys), e)
        return ok


__all__ = ["ORM_RECORDED", "AsyncWritePath", "Durable", "PendingWrite", "WritePath"]
