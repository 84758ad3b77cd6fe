"""The synchronous refresh-ahead driver: :class:`RefreshAhead` and :class:`Refresher` run the
flows of :mod:`cachesync.core.refresh` on a :class:`cachesync.Cache`."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .. import core as P
from ..core.refresh import (RefreshNow, RefreshOptions, RefreshState, attach, background_flow, BackgroundCore,
                            log, refresh_flow, watch)

if TYPE_CHECKING:
    from .cache import Cache


class RefreshAhead:
    """A refresh-ahead key on a :class:`cachesync.Cache`: ``plan = RefreshAhead(cache, "push:plan", load_plan)``,
    then ``plan.get()`` on every use. ``options`` is a :class:`RefreshOptions` (or pass its fields as keywords);
    ``clock`` and ``rand`` are injectable for tests."""

    def __init__(self, cache: Cache, key: str, loader: Callable[[], Any], options: RefreshOptions | None = None, *,
                 clock: Callable[[], float] = time.monotonic, rand: Callable[[], float] = random.random,
                 **kw: Any) -> None:
        self.cache = cache
        self.loader = loader
        self.state = RefreshState(key, options or RefreshOptions(**kw), clock=clock, rand=rand,
                                  lock=threading.Lock())
        cache.ctx.ekey(key)
        attach(self.state, None if cache.l1 is None else cache.l1.core)

    def get_entry(self) -> P.Entry[Any]:
        """The held entry, refreshed first when it is due (see the module docstring)."""
        return self.cache.run(refresh_flow(self.cache.ctx, self.state), self.loader)

    def get(self) -> Any:
        """The value (never "no value" because of a cache miss)."""
        return self.get_entry().value

    def refresh(self) -> P.Entry[Any]:
        """Refresh now (unless a refresh is running); what a :class:`Refresher` calls."""
        return self.cache.run(refresh_flow(self.cache.ctx, self.state, True), self.loader)


class Refresher:
    """Refreshes registered :class:`RefreshAhead` keys of a :class:`cachesync.Cache` in a daemon thread, so
    readers never wait for a refresh: ``r = Refresher(cache); r.add(RefreshAhead(cache, "push:plan", load))``;
    ``r.close()`` (or ``with Refresher(cache) as r:``) stops it. ``max_interval`` (1.0 s): longest sleep between
    checks; ``retry_interval`` (1.0 s): pause after a failed refresh of a key."""

    def __init__(self, cache: Cache, *, max_interval: float = 1.0, retry_interval: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.core = BackgroundCore(max_interval=max_interval, retry_interval=retry_interval, clock=clock)
        self._wake = threading.Event()
        self.core.wake = self._wake.set
        watch(self.core, None if cache.l1 is None else cache.l1.core)
        self._thread = threading.Thread(target=self._run, name="cachesync-refresher", daemon=True)
        self._thread.start()

    def add(self, handle: RefreshAhead) -> RefreshAhead:
        """Keep ``handle`` refreshed in the background; returns it."""
        self.core.add(handle)
        return handle

    def remove(self, handle: RefreshAhead) -> None:
        self.core.remove(handle)

    @property
    def stats(self) -> dict[str, int]:
        """``refreshes`` and ``failures`` done by this refresher."""
        return {"refreshes": self.core.refreshes, "failures": self.core.failures}

    def close(self) -> None:
        """Stop the thread (waits for a refresh in progress)."""
        self.core.close()
        if self._thread is not threading.current_thread():
            self._thread.join()

    def __enter__(self) -> Refresher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _run(self) -> None:
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
                    eff.handle.refresh()
                    send = True
                except Exception as e:
                    send = False
                    log.warning("cachesync refresher: refreshing %r failed: %s: %s", eff.handle.state.key,
                                type(e).__name__, e)
            else:
                self._wake.wait(eff.seconds)
                self._wake.clear()
