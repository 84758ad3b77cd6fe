"""The L1's asyncio driver: a task runs :func:`cachesync.l1.subscription_flow` with redis.asyncio.

Only the I/O differs from :mod:`cachesync.l1_sync`; the store, its rules and the subscription flow are shared.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

import redis.asyncio as aredis
from redis.exceptions import RedisError

from .._driver import make_core, socket_probe, subscription_pool
from ..core.l1 import Close, Connect, L1Options, Read, Send, Sleep, SubscriptionLost, subscription_flow


class L1Async:
    """The L1 of a :class:`cachesync.AsyncCache` (``acache.l1``). The subscriber task starts with the first
    read (or :meth:`start`); until it is subscribed the L1 is bypassed."""

    def __init__(self, cache: Any, options: L1Options, url: str | None, *,
                 clock: Callable[[], float] | None = None) -> None:
        self.core = make_core(cache, options, clock)
        self._pool = subscription_pool(aredis.ConnectionPool, url, None if url else cache.redis,
                                       cache.options.connect_timeout, cache.options.namespace)
        self._conn: Any = None
        self._task: asyncio.Task[None] | None = None
        self._ready: asyncio.Event | None = None
        self._wake: asyncio.Event | None = None
        self.core.add_state_listener(self._on_state)

    def _on_state(self, up: bool) -> None:
        if self._ready is not None:
            if up:
                self._ready.set()
            else:
                self._ready.clear()

    def start(self) -> None:
        """Start the subscriber task on the running loop (idempotent)."""
        if self._task is None and not self.core.closed:
            self._ready = asyncio.Event()
            self._wake = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._run(), name=f"cachesync-l1-{self.core.ns}")

    async def load(self, key: str, ttl: float | None, fetch: Callable[[], Awaitable[Any]]) -> Any:
        """Read ``key`` with ``await fetch()`` and fill the L1 unless an invalidation raced with the read."""
        if self._task is None:
            self.start()
        core = self.core
        token = core.begin(key)
        entry = None
        try:
            entry = await fetch()
            return entry
        finally:
            core.finish(key, token, entry, ttl)

    async def get_many(self, keys: Any, ttl: float | None,
                       fetch_many: Callable[[list[str]], Awaitable[Any]]) -> dict[str, Any]:
        """See :meth:`cachesync.l1_sync.L1Sync.get_many`."""
        if self._task is None:
            self.start()
        core = self.core
        ukeys, hits, tokens = core.split(keys)
        if not tokens:
            return hits
        entries = None
        try:
            entries = await fetch_many(list(tokens))
        finally:
            core.finish_many(tokens, entries, ttl)
        assert entries is not None
        return {k: hits[k] if k in hits else entries[k] for k in ukeys}

    def invalidate_local(self, keys: Any) -> None:
        """Drop this process's copies at once (read-your-writes); peers hear it on the channel."""
        self.core.invalidate(keys)

    @property
    def stats(self) -> dict[str, Any]:
        """See :attr:`cachesync.l1.L1.stats`."""
        return self.core.stats

    async def wait_ready(self, timeout: float = 5.0) -> bool:
        """Wait until the subscription is up; False on timeout."""
        self.start()
        assert self._ready is not None
        try:
            await asyncio.wait_for(self._ready.wait(), timeout)
            return True
        except TimeoutError:
            return False

    def clear(self) -> None:
        """Flush this process's L1."""
        self.core.clear()

    async def aclose(self) -> None:
        """Stop the subscriber task and flush the L1."""
        self.core.close()
        if self._wake is not None:
            self._wake.set()
        try:
            if self._task is not None:
                self._task.cancel()
                try:
                    await self._task
                except asyncio.CancelledError:
                    me = asyncio.current_task()
                    if me is not None and me.cancelling():  # the caller's own cancellation: never swallowed
                        raise
                except Exception:  # noqa: S110 - the subscriber's end, whatever it was
                    pass
        finally:
            if self._conn is not None:
                with contextlib.suppress(Exception):
                    await self._conn.disconnect()
            await self._pool.disconnect()

    async def _run(self) -> None:
        """The subscriber task: restarted (after bypassing the L1) whenever it fails unexpectedly."""
        try:
            while not self.core.closed:
                try:
                    await self._run_once()
                    return
                except Exception as e:  # never "up" while deaf
                    self.core.subscriber_died(e)
                    if self._conn is not None:
                        conn, self._conn = self._conn, None
                        with contextlib.suppress(Exception):
                            await conn.disconnect()
                    await asyncio.sleep(0.2)
        except asyncio.CancelledError as e:
            if not self.core.closed:  # cancelled from outside (a shutdown cancelling every task): deaf, not "up"
                self.core.subscriber_died(e)
                self.core.set_probe(None)
                self._task = None  # the next read starts a new subscriber
                if self._conn is not None:
                    conn, self._conn = self._conn, None
                    with contextlib.suppress(BaseException):
                        await conn.disconnect(nowait=True)
            raise

    async def _run_once(self) -> None:
        flow = subscription_flow(self.core)
        send: Any = None
        throw: BaseException | None = None
        while True:
            try:
                eff = flow.send(send) if throw is None else flow.throw(throw)
            except StopIteration:
                return
            send, throw = None, None
            t = type(eff)
            try:
                if t is Read:
                    # every message read so far is applied; until this read returns, a lookup that finds data
                    # waiting on the socket bypasses the L1 (rule 5 of cachesync.l1)
                    self.core.caught_up()
                    send = await self._conn.read_response(timeout=eff.timeout, disconnect_on_error=False)
                elif t is Send:
                    await self._conn.send_command(*eff.args)
                elif t is Connect:
                    self._conn = self._pool.make_connection()
                    await self._conn.connect()
                    writer = getattr(self._conn, "_writer", None)
                    self.core.set_probe(socket_probe(writer.get_extra_info("socket") if writer else None,
                                                     getattr(self._conn, "_reader", None)))
                elif t is Close:
                    self.core.set_probe(None)
                    if self._conn is not None:
                        conn, self._conn = self._conn, None
                        with contextlib.suppress(Exception):
                            await conn.disconnect()
                elif t is Sleep:
                    assert self._wake is not None
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), eff.seconds)
            except (RedisError, OSError) as e:
                throw = SubscriptionLost(f"{type(e).__name__}: {e}")
