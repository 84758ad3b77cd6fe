"""Refresh-ahead for hot, configuration-like keys (the decision logic: no I/O).

The push-service incident: a process-local copy of a config plan was refreshed from the *cache* every
5 minutes; the config service deleted the cache entry before updating the database, a refresh landed in
that window, read a miss and the service ran with a null plan. Here a refresh never turns a miss into
"no value":

* a refresh is a full read-through (:func:`cachesync.protocol.get_flow`): on a Redis miss it loads from the
  database and fills Redis, with the usual lease protection;
* when the refresh fails (loader error, Redis down with ``on_redis_error="fail"``) the last good value is kept,
  with a warning in the log, for at most ``max_age`` seconds after it was fetched; after that the error is raised;
* refreshes happen *early* with probabilistic early expiration (XFetch, Vattani, Chierichetti and Lowenstein,
  "Optimal Probabilistic Cache Stampede Prevention", VLDB 2015): a reader refreshes when
  ``now - delta * beta * ln(rand()) >= expiry`` where ``delta`` is how long the last refresh took, so hot keys
  refresh before they expire and different processes do not refresh in synchronised waves;
* with the cache's L1 on, an invalidation of the key (or a lost subscription) makes the next read refresh
  at once; while the L1 subscription is down every read refreshes (falling back to the last good value).
  Between an invalidation and the next read the held value is served: refresh mode trades a bounded
  staleness for never being empty.

:class:`cachesync.RefreshAhead` (:mod:`cachesync._sync.refresh`) and :class:`cachesync.AsyncRefreshAhead`
(:mod:`cachesync._async.refresh`) drive the same :func:`refresh_flow`; their locks are given by the drivers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import random
import time
from collections.abc import Callable, Generator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .. import core as P
from ..errors import ConfigError
from .. import _validate
from .options import check_positive

if TYPE_CHECKING:
    from .l1 import L1

log = logging.getLogger("cachesync.refresh")



@dataclass
class RefreshOptions:
    """Options of one refresh-ahead key. Durations are in seconds."""

    ttl: float = 60.0
    """A held value *expires* this long after the read that fetched it began; XFetch refreshes it earlier."""
    beta: float = 1.0
    """XFetch's beta: above 1 refreshes earlier, below 1 later (0 refreshes only at expiry)."""
    max_age: float = 3600.0
    """While refreshes fail, the last good value is served for at most this long after it was fetched."""
    cache_ttl: float | None = None
    """The Redis TTL of the value when a refresh fills it (``None``: the cache's ``default_ttl``)."""

    def __new__(cls, *args: Any, **kw: Any) -> RefreshOptions:
        # an unknown keyword is a ConfigError naming it (the generated __init__ would raise a bare TypeError)
        known = {f.name for f in dataclasses.fields(cls)}
        for k in kw:
            if k not in known:
                raise ConfigError(f"refresh.{k}", f"unknown refresh-ahead option; known: {', '.join(sorted(known))}")
        return super().__new__(cls)

    def __post_init__(self) -> None:
        check_positive("refresh.ttl", self.ttl)
        check_positive("refresh.max_age", self.max_age)
        _validate.non_negative("refresh.beta", self.beta)
        if self.cache_ttl is not None:
            check_positive("refresh.cache_ttl", self.cache_ttl)


def xfetch_due(now: float, expiry: float, delta: float, beta: float, rand: float) -> bool:
    """XFetch: refresh early when ``now - delta * beta * ln(rand) >= expiry`` (``rand`` in (0, 1])."""
    return now - delta * beta * math.log(rand) >= expiry


class RefreshState:
    """What a process holds for one refresh-ahead key, and the decisions about it (no I/O). Thread-safe with the
    ``lock`` the driver gives (a ``threading.Lock``; default: none, for one thread)."""

    def __init__(self, key: str, options: RefreshOptions, *, clock: Callable[[], float] = time.monotonic,
                 rand: Callable[[], float] = random.random,
                 lock: AbstractContextManager[Any] | None = None) -> None:
        self.key = key
        self.o = options
        self.clock = clock
        self.rand = rand
        self.entry: P.Entry[Any] | None = None
        self.fetched_at = 0.0
        self.expiry = 0.0
        self.delta = 0.0
        self.due = False
        self.always = False  # the L1 subscription is down: every read refreshes
        self.inv = 0
        self.refreshing = False
        self._lock: AbstractContextManager[Any] = lock if lock is not None else contextlib.nullcontext()
        self.refreshes = self.early_refreshes = self.failures = self.served_last_good = 0

    def begin(self, force: bool = False) -> tuple[int, float] | None:
        """``None``: serve :attr:`entry`; otherwise refresh now (the token is for :meth:`success`).
        ``force`` (the background refresher): refresh unless a refresh is already running."""
        with self._lock:
            now = self.clock()
            if self.entry is not None:
                if self.refreshing and now - self.fetched_at <= self.o.max_age:
                    # someone else in this process is refreshing: serve what we hold -- but no longer than a
                    # failing refresh would (a hung refresh must not serve a value forever)
                    return None
                if not (force or self.due or self.always or now >= self.expiry):
                    if not xfetch_due(now, self.expiry, self.delta, self.o.beta, 1.0 - self.rand()):
                        return None
                    self.early_refreshes += 1
            self.refreshing = True
            return (self.inv, now)

    def success(self, token: tuple[int, float], entry: P.Entry[Any]) -> None:
        inv0, t0 = token
        with self._lock:
            now = self.clock()
            self.entry = entry
            self.fetched_at = t0
            self.expiry = t0 + self.o.ttl
            self.delta = max(0.0, now - t0)
            self.due = self.inv != inv0  # invalidated while we read: the value may predate it
            self.refreshing = False
            self.refreshes += 1

    def failure(self, exc: BaseException) -> P.Entry[Any]:
        """The last good entry if it is young enough (logged), else re-raise ``exc``."""
        with self._lock:
            self.refreshing = False
            self.failures += 1
            entry = self.entry
            age = self.clock() - self.fetched_at
        if entry is None or age > self.o.max_age:
            raise exc
        self.served_last_good += 1
        log.warning("cachesync refresh-ahead: refreshing %r failed (%s: %s); serving the last good value "
                    "(%.1fs old, max_age %.1fs)", self.key, type(exc).__name__, exc, age, self.o.max_age)
        return entry

    def on_invalidate(self, keys: list[str] | None) -> None:
        """L1 listener: the key was invalidated (or the L1 flushed): refresh on the next read."""
        if keys is None or self.key in keys:
            with self._lock:
                self.inv += 1
                self.due = True

    def on_subscription(self, up: bool) -> None:
        """L1 state listener: while the subscription is down, refresh on every read."""
        self.always = not up

    @property
    def stats(self) -> dict[str, int]:
        """``refreshes``, ``early_refreshes`` (XFetch), ``failures``, ``served_last_good``."""
        return {"refreshes": self.refreshes, "early_refreshes": self.early_refreshes, "failures": self.failures,
                "served_last_good": self.served_last_good}


def refresh_flow(ctx: P.Context, st: RefreshState, force: bool = False) -> P.Flow[P.Entry[Any]]:
    """Serve the held value, or refresh it by reading through (Redis, then the loader) first."""
    token = st.begin(force)
    if token is None:
        assert st.entry is not None
        return st.entry
    try:
        entry = yield from P.get_flow(ctx, st.key, st.o.cache_ttl)
    except P.RedisDown as e:  # only with on_redis_error="fail"
        return st.failure(e.cause)
    except Exception as e:
        return st.failure(e)
    except BaseException:
        st.refreshing = False
        raise
    st.success(token, entry)
    return entry


def attach(st: RefreshState, l1: L1 | None) -> None:
    """Make ``st`` refresh at once after an invalidation of its key or a lost L1 subscription (``l1``: the
    cache's L1 state, or None without an L1)."""
    if l1 is not None:
        l1.add_listener(st.on_invalidate, weak=True)  # held weakly: a handle the application drops is not kept
        l1.add_state_listener(st.on_subscription, weak=True)
        st.always = not l1.enabled


# --------------------------------------------------------------------------- background refresher

LEAD = math.log(20.0)
"""The background refresher refreshes ``delta * beta * LEAD`` before expiry: XFetch's 95th-percentile lead."""


@dataclass(frozen=True, slots=True)
class RefreshNow:
    """Refresh this handle now (``handle.refresh()``); send back True on success, False on failure."""

    handle: Any


@dataclass(frozen=True, slots=True)
class WaitFor:
    """Wait ``seconds``, or less if woken (an invalidation of a registered key, a new key, close)."""

    seconds: float


class BackgroundCore:
    """What the background refresher decides, with no I/O: which registered keys to refresh, and when to
    wake. Both :class:`Refresher` (a thread) and :class:`AsyncRefresher` (a task) run :func:`background_flow`.

    A key is refreshed when it holds no value, when it was invalidated (L1 on), and ``delta * beta * LEAD``
    seconds before it expires. A failed refresh is retried after ``retry_interval`` (the reader-side
    :meth:`RefreshState.failure` keeps serving the last good value meanwhile). The loop wakes at the
    earliest due time, at most ``max_interval`` later, or at once when ``wake()`` is called."""

    def __init__(self, *, max_interval: float = 1.0, retry_interval: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        check_positive("refresher.max_interval", max_interval)
        check_positive("refresher.retry_interval", retry_interval)
        self.max_interval = max_interval
        self.retry_interval = retry_interval
        self.clock = clock
        self.handles: list[Any] = []
        self._retry_at: dict[int, float] = {}
        self.closed = False
        self.wake: Callable[[], None] = lambda: None
        self.refreshes = self.failures = 0

    def add(self, handle: Any) -> None:
        self.handles.append(handle)
        self.wake()

    def remove(self, handle: Any) -> None:
        if handle in self.handles:
            self.handles.remove(handle)

    def on_invalidate(self, keys: list[str] | None) -> None:
        """L1 listener: wake at once if a registered key was invalidated (or the L1 flushed)."""
        if keys is None or any(h.state.key in keys for h in self.handles):
            self.wake()

    def due_at(self, handle: Any) -> float:
        st: RefreshState = handle.state
        retry = self._retry_at.get(id(handle), -math.inf)
        if st.entry is None or st.due:
            return retry
        return max(retry, st.expiry - st.delta * st.o.beta * LEAD)

    def done(self, handle: Any, ok: bool) -> None:
        if ok:
            self.refreshes += 1
            self._retry_at.pop(id(handle), None)
        else:
            self.failures += 1
            self._retry_at[id(handle)] = self.clock() + self.retry_interval

    def skipped(self, handle: Any) -> None:
        """``handle`` was not refreshed (a reader's refresh of it is running): look again after
        ``retry_interval`` rather than at once (a hot loop while that refresh runs)."""
        self._retry_at[id(handle)] = self.clock() + self.retry_interval

    def close(self) -> None:
        self.closed = True
        self.wake()


def background_flow(core: BackgroundCore) -> Generator[Any, Any, None]:
    """The background refresher's loop (shared by the thread and the task)."""
    while not core.closed:
        now = core.clock()
        for h in list(core.handles):
            if core.closed:
                return
            if core.due_at(h) <= now:
                st: RefreshState = h.state
                failures, refreshes = st.failures, st.refreshes
                ok = yield RefreshNow(h)
                if ok and st.failures == failures and st.refreshes == refreshes:
                    core.skipped(h)  # another refresh of the key is running: it served the held value
                else:
                    # a failed refresh that served the last good value returns normally: still a failure
                    core.done(h, bool(ok) and st.failures == failures)
        now = core.clock()
        nxt = min((core.due_at(h) for h in core.handles), default=math.inf)
        yield WaitFor(max(0.0, min(core.max_interval, nxt - now)))


def watch(core: BackgroundCore, l1: L1 | None) -> None:
    """Wake the background refresher when the L1 hears an invalidation."""
    if l1 is not None:
        l1.add_listener(core.on_invalidate, weak=True)
