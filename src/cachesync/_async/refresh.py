"""The asyncio refresh-ahead driver: :class:`AsyncRefreshAhead` and :class:`AsyncRefresher` run the
flows of :mod:`cachesync.core.refresh` on an :class:`cachesync.AsyncCache`."""

from __future__ import annotations

import asyncio
import contextlib
import random
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .. import core as P
from ..core.refresh import (RefreshNow, RefreshOptions, RefreshState, attach, background_flow, BackgroundCore,
                            log, refresh_flow, watch)

if TYPE_CHECKING:
    from .cache import AsyncCache


class AsyncRefreshAhead:
    """:class:`RefreshAhead` for a :class:`cachesync.AsyncCache`; the loader may be a coroutine function."""

    def __init__(self, cache: AsyncCache, key: str, loader: Callable[[], Any], options: RefreshOptions | None = None, *,
                 clock: Callable[[], float] = time.monotonic, rand: Callable[[], float] = random.random,
                 **kw: Any) -> None:
        self.cache = cache
        self.loader = loader
        self.state = RefreshState(key, options or RefreshOptions(**kw), clock=clock, rand=rand,
                                  lock=threading.Lock())
        cache.ctx.ekey(key)
        attach(self.state, None if cache.l1 is None else cache.l1.core)

    async def get_entry(self) -> P.Entry[Any]:
        """See :meth:`RefreshAhead.get_entry`."""
        if self.cache.l1 is not None:
            self.cache.l1.start()
        return await self.cache.run(refresh_flow(self.cache.ctx, self.state), self.loader)

    async def get(self) -> Any:
        """See :meth:`RefreshAhead.get`."""
        return (await self.get_entry()).value

    async def refresh(self) -> P.Entry[Any]:
        """See :meth:`RefreshAhead.refresh`."""
        return await self.cache.run(refresh_flow(self.cache.ctx, self.state, True), self.loader)


class AsyncRefresher:
    """:class:`Refresher` for :class:`AsyncRefreshAhead` keys of a :class:`cachesync.AsyncCache`: a task on the
    running loop (created by the constructor, so build it inside the loop); ``await r.aclose()`` stops it."""

    def __init__(self, cache: AsyncCache, *, max_interval: float = 1.0, retry_interval: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.core = BackgroundCore(max_interval=max_interval, retry_interval=retry_interval, clock=clock)
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        def wake() -> None:  # L1 listeners may run in another thread
            self._loop.call_soon_threadsafe(self._wake.set)

        self.core.wake = wake
        watch(self.core, None if cache.l1 is None else cache.l1.core)
        self._task = self._loop.create_task(self._run(), name="cachesync-refresher")

    def add(self, handle: AsyncRefreshAhead) -> AsyncRefreshAhead:
        """See :meth:`Refresher.add`."""
        self.core.add(handle)
        return handle

    def remove(self, handle: AsyncRefreshAhead) -> None:
        self.core.remove(handle)

    @property
    def stats(self) -> dict[str, int]:
        """See :attr:`Refresher.stats`."""
        return {"refreshes": self.core.refreshes, "failures": self.core.failures}

    async def aclose(self) -> None:
        """Stop the task (waits for a refresh in progress)."""
        self.core.close()
        await self._task

    async def __aenter__(self) -> AsyncRefresher:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def _run(self) -> None:
        flow = background_flow(self.core)
        send: Any = None
        while True:
            try:
                eff = flow.send(send)
            except StopIteration:
                return
            send = None
            if type(eff) is RefreshNow:
                try:
                    await eff.handle.refresh()
                    send = True
                except Exception as e:
                    send = False
                    log.warning("cachesync refresher: refreshing %r failed: %s: %s", eff.handle.state.key,
                                type(e).__name__, e)
            else:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), eff.seconds)
                self._wake.clear()
