"""The in-process L1 cache in front of Redis, with no I/O (drivers: :mod:`l1_sync`, :mod:`l1_async`).

Theory of operation
===================

An L1 copy may be served only while three things hold; each rule below closes one way it could be wrong.

1. **Every invalidation reaches us.** Each invalidation and each writer ``set`` (``invalidate.lua``,
   ``set.lua``) PUBLISHes the entry keys on ``cs:{ns}:inv``; fills never publish. A driver keeps one
   dedicated RESP2 connection SUBSCRIBEd to that channel (:func:`subscription_flow`) and hands every
   message to :meth:`L1.on_message`, which drops the local copies.
2. **No fill can outlive an invalidation it raced with (the fill race).** Before a read goes to Redis,
   :meth:`L1.begin` records the current invalidation sequence number and marks the key "in flight".
   Every invalidation bumps the sequence and, for in-flight keys, remembers the sequence of the key's
   last invalidation; a flush (subscription lost, :meth:`L1.clear`) sets a flush sequence. :meth:`L1.finish`
   drops the fill if the key was invalidated, or the L1 flushed, since :meth:`begin`. An invalidation that
   happens after the Redis read either arrives before the fill (the fill is dropped) or after it (the copy
   is evicted): the pub/sub connection delivers it either way, as long as rule 3 holds.
3. **The subscription is healthy.** Until the SUBSCRIBE is confirmed the L1 is *bypassed* (no hits, no
   fills). When the connection drops or a PING on it goes unanswered for ``ping_interval`` seconds, the L1
   is flushed and bypassed until the subscription is back (counted in ``subscription_losses``, logged).
5. **A starved subscriber does not let copies go stale.** Busy reader threads can keep the subscriber thread
   from the GIL for many switch intervals (and busy coroutines keep the subscriber task from the event loop
   for as long as they do not await). At most every ``lag_check_interval`` a lookup checks, with one
   non-blocking ``select`` on the subscription's socket, whether data has arrived that the subscriber has not
   read; the subscriber itself marks the L1 "behind" from the moment it reads data until it has applied it
   and found its connection empty. While behind, lookups bypass the L1 (they read Redis, which also hands
   the GIL or the loop to the subscriber); ``lag_bypasses`` counts them.
6. **Nothing is served past** ``max_staleness``: an entry's age is counted from *before* the Redis read
   that produced it, so even an invalidation lost while the subscription looked healthy (a failover to a
   replica that never saw the PUBLISH, say) is bounded.

Only values Redis agreed with are filled: hits that are not stale, and loads whose write-back Redis
accepted (a refused fill means an invalidation voided the lease). Fallback loads (Redis down) are not filled.

Why pub/sub and not ``CLIENT TRACKING ... BCAST PREFIX``: tracking announces *every* modification of a key,
including our own fills (``fill.lua`` writes the hash), so every miss in one process would evict the key from
every other process's L1; it also needs RESP3 or a REDIRECT connection (redis-py 8 switched the default
protocol, which broke a peer's invalidation), and redis-py's own client-side cache needs Redis >= 7.4.
The namespace channel carries exactly the invalidations and writer sets, and costs one PUBLISH per write.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import contextlib
import weakref
import time
from collections import OrderedDict
from collections.abc import Callable, Generator, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError
from .keys import channel, user_key
from .. import _validate
from .options import check_positive

log = logging.getLogger("cachesync.l1")

Clock = Callable[[], float]


@dataclass
class L1Options:
    """Options of the in-process L1 (``Cache(..., l1=L1Options(...))``, ``l1=True`` for the defaults,
    or ``l1={"max_entries": ...}``). Durations are in seconds."""

    max_entries: int = 10_000
    """Most entries kept; the least recently used entry is evicted first."""
    max_bytes: int = 64 * 1024 * 1024
    """Most bytes kept, counted as the serialized size of each value plus its key (an estimate of the cost)."""
    ttl: float = 10.0
    """Lifetime of an L1 copy; a read's own ``ttl`` (the Redis TTL) lowers it for that entry."""
    max_staleness: float = 30.0
    """Hard upper bound on the age of a served L1 copy, counted from before the Redis read that produced it.
    Holds even if an invalidation message is lost while the subscription looks healthy."""
    ping_interval: float = 1.0
    """When the subscription has been silent this long, PING it; no answer within another interval counts as a
    lost subscription (the L1 is flushed and bypassed until it is back)."""
    reconnect_max_delay: float = 2.0
    """Longest pause between attempts to resubscribe (the pause doubles from 0.05 s up to this)."""
    cache_negative: bool = True
    """Keep ``NOT_FOUND`` results in the L1 too (for at most ``min(ttl, negative_ttl)``)."""
    lag_check_interval: float = 0.001
    """How often (at most; counted in lookups' own clock readings) a lookup checks, with one non-blocking
    ``select`` on the subscription's socket, whether an invalidation has arrived that the subscriber has not
    applied yet (its thread starved of the GIL by busy readers, say); while one has, lookups bypass the L1.
    An invalidation that has reached this process is therefore served around for at most about this long."""

    def __post_init__(self) -> None:
        for name in ("max_entries", "max_bytes"):
            _validate.positive(f"l1.{name}", getattr(self, name), integer=True)
        for name in ("ttl", "max_staleness", "ping_interval", "reconnect_max_delay", "lag_check_interval"):
            check_positive(f"l1.{name}", getattr(self, name))
        _validate.boolean("l1.cache_negative", self.cache_negative)

    @classmethod
    def build(cls, value: object) -> L1Options | None:
        """``None``/``False`` -> no L1; ``True`` -> defaults; a mapping -> those fields; an ``L1Options`` as is."""
        if value is None or value is False:
            return None
        if value is True:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, Mapping):
            known = {f.name for f in dataclasses.fields(cls)}
            for k in value:
                if k not in known:
                    raise ConfigError(f"l1.{k}", f"unknown L1 option; known: {', '.join(sorted(known))}")
            return cls(**value)
        raise ConfigError("l1", f"must be True, False, None, a mapping or L1Options, got {type(value).__name__}")


class _Slot:
    __slots__ = ("entry", "expires", "size")

    def __init__(self, entry: Any, expires: float, size: int) -> None:
        self.entry = entry
        self.expires = expires
        self.size = size


Token = tuple[int, float]
"""What :meth:`L1.begin` hands out: (invalidation sequence, clock) before the Redis read."""

Listener = Callable[[list[str] | None], None]
"""Called with the invalidated keys, or ``None`` for a flush."""


def _live(fns: list[Any]) -> list[Any]:
    """The listeners to call: weakly held ones (``weakref.WeakMethod``) dereferenced, dead ones removed from
    ``fns`` (in place: the registration list)."""
    out = []
    dead = []
    for f in list(fns):
        if type(f) is weakref.WeakMethod:
            g = f()
            if g is None:
                dead.append(f)
                continue
            f = g
        out.append(f)
    for f in dead:  # one at a time (atomic): a listener added meanwhile is never lost
        with contextlib.suppress(ValueError):
            fns.remove(f)
    return out


class L1:
    """The L1 store and its rules (no I/O). ``clock`` is injectable for tests; ``lock_factory`` makes the lock
    that guards the store: the drivers pass ``threading.Lock`` (thread-safe), the default is no lock (one thread)."""

    def __init__(self, options: L1Options, namespace: str, *, size_of: Callable[[str, Any], int] | None = None,
                 negative_ttl: float = float("inf"), clock: Clock = time.monotonic,
                 lock_factory: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext
                 ) -> None:
        self._lock_factory = lock_factory
        self.span: Callable[..., contextlib.AbstractContextManager[Any]] | None = None
        """Opens a span under a writer's traceparent: set by the driver with ``tracing=True`` (core has no tracer)."""
        self.options = options
        self.ns = namespace
        self.channel = channel(namespace)
        self._clock = clock
        self._size_of = size_of or (lambda k, v: len(k) + 64)
        self._negative_ttl = negative_ttl
        self._data: OrderedDict[str, _Slot] = OrderedDict()
        self._lock = self._lock_factory()
        self._seq = 0
        self._flush_seq = 0
        self._inflight: dict[str, int] = {}
        self._inv_seq: dict[str, int] = {}
        self._listeners: list[Listener] = []
        self._state_listeners: list[Callable[[bool], None]] = []
        self.enabled = False
        self.closed = False
        self.state = "connecting"
        self.bytes = 0
        self.hits = self.misses = self.bypassed = self.fills = self.fills_dropped = 0
        self.invalidations = self.messages = self.evictions = self.expirations = self.flushes = 0
        self.subscription_losses = self.subscribes = self.malformed_messages = self.subscriber_deaths = 0
        self.listener_errors = 0
        self.lag_bypasses = 0
        self.last_loss_reason = ""
        # the subscriber-lag check (rule 5): see lookup, behind, caught_up, set_probe
        self._check_at = 0.0  # clock reading from which the next lookup checks; 0 while behind
        self._behind = False
        self._caught_up_gen = 0
        self._probe: Callable[[], bool] | None = None
        self.traced = False  # the cache's tracing=: record cachesync.l1.drop spans under the writer's traceparent
        self._bypass_total = 0.0  # seconds bypassed (not enabled, not closed), wall clock of time.monotonic
        self._bypass_since: float | None = time.monotonic()  # bypassed until the first SUBSCRIBE is confirmed
        _ALL.add(self)

    # ---------------------------------------------------------------- reads

    def lookup(self, key: str) -> Any:
        """The cached :class:`~cachesync.Entry` of ``key`` (``source="l1"``), or ``None``."""
        s = self._data.get(key)
        if s is None:
            return None
        now = self._clock()
        if now >= s.expires or now >= self._check_at:
            return self._lookup_checked(key, s, now)
        self.hits += 1
        try:
            self._data.move_to_end(key)
        except KeyError:  # invalidated by the subscriber meanwhile: serving it is ordered before that
            pass
        return s.entry

    def _lookup_checked(self, key: str, s: _Slot, now: float) -> Any:
        """:meth:`lookup` when the entry expired or the subscriber-lag check is due (rule 5)."""
        if now >= s.expires:
            with self._lock:
                if self._data.get(key) is s:
                    del self._data[key]
                    self.bytes -= s.size
                    self.expirations += 1
            return None
        if not self._behind:
            gen = self._caught_up_gen
            probe = self._probe
            try:
                pending = probe is not None and probe()
            except Exception:  # the socket is being replaced: count it as behind
                pending = True
            if pending and gen == self._caught_up_gen:  # (not if the subscriber caught up meanwhile)
                self._behind = True
            elif not pending:
                self._check_at = now + self.options.lag_check_interval
        if self._behind:
            self._check_at = 0.0
            self.lag_bypasses += 1
            return None
        self.hits += 1
        try:
            self._data.move_to_end(key)
        except KeyError:  # invalidated by the subscriber meanwhile: serving it is ordered before that
            pass
        return s.entry

    # ---------------------------------------------------------------- subscriber lag (rule 5)

    def set_probe(self, probe: Callable[[], bool] | None) -> None:
        """The driver's check "has data arrived on the subscription that the subscriber has not read?" (a
        non-blocking ``select`` on its socket), or None while there is no connection."""
        self._probe = probe
        self._check_at = 0.0

    def behind(self) -> None:
        """The subscriber has data to apply: lookups bypass the L1 until :meth:`caught_up`."""
        self._behind = True
        self._check_at = 0.0

    def caught_up(self) -> None:
        """The subscriber has applied everything that reached its connection (it is about to wait for more)."""
        self._caught_up_gen += 1
        self._behind = False
        self._check_at = 0.0

    def begin(self, key: str) -> Token | None:
        """Call before reading ``key`` from Redis; ``None`` means the L1 is bypassed (do not fill)."""
        with self._lock:
            if not self.enabled:
                self.bypassed += 1
                return None
            self.misses += 1
            self._inflight[key] = self._inflight.get(key, 0) + 1
            return (self._seq, self._clock())

    def finish(self, key: str, token: Token | None, entry: Any, ttl: float | None = None) -> bool:
        """Call after the read (``entry=None`` if it failed). Fills the L1 unless the fill raced with an
        invalidation or flush, or the entry is not one Redis agreed with. Returns whether it filled."""
        if token is None:
            return False
        seq0, t0 = token
        # Sized before the lock, then one locked section for the checks and the insert: the key stays in flight
        # until then, so an invalidation applied at any point before the insert marks it and drops the fill.
        # (The key used to leave the in-flight set before the sizing and be inserted after it: an invalidation
        # applied in between left no mark and the old value was filled after it.)
        size = -1
        if entry is not None and _cacheable(entry) and (entry.found or self.options.cache_negative):
            try:
                size = self._size_of(key, entry.value)
            except Exception:  # a value the serializer cannot size: do not keep it
                size = -1
        with self._lock:
            n = self._inflight.get(key, 1) - 1
            if n > 0:
                self._inflight[key] = n
                inv = self._inv_seq.get(key, 0)
            else:
                self._inflight.pop(key, None)
                inv = self._inv_seq.pop(key, 0)
            if entry is None or not _cacheable(entry):
                return False
            if inv > seq0 or self._flush_seq > seq0 or not self.enabled:
                self.fills_dropped += 1
                return False
            if size < 0 or size > self.options.max_bytes:
                return False
            negative = not entry.found
            life = min(self.options.ttl, self.options.max_staleness)
            if ttl is not None:
                life = min(life, ttl)
            if negative:
                life = min(life, self._negative_ttl)
            slot = _Slot(dataclasses.replace(entry, source="l1", filled=False), t0 + life, size)
            old = self._data.pop(key, None)
            if old is not None:
                self.bytes -= old.size
            self._data[key] = slot
            self.bytes += size
            self.fills += 1
            o = self.options
            while len(self._data) > o.max_entries or self.bytes > o.max_bytes:
                _, ev = self._data.popitem(last=False)
                self.bytes -= ev.size
                self.evictions += 1
        return True

    # ---------------------------------------------------------------- batches (get_many)

    def split(self, keys: Iterable[str]) -> tuple[list[str], dict[str, Any], dict[str, Token | None]]:
        """For a batch read: (the distinct keys in order, their L1 hits, a :meth:`begin` token per other key).
        Read the other keys from Redis, then call :meth:`finish_many`."""
        ukeys = list(dict.fromkeys(keys))
        hits: dict[str, Any] = {}
        tokens: dict[str, Token | None] = {}
        for k in ukeys:
            e = self.lookup(k)
            if e is not None:
                hits[k] = e
            else:
                tokens[k] = self.begin(k)
        return ukeys, hits, tokens

    def finish_many(self, tokens: Mapping[str, Token | None], entries: Mapping[str, Any] | None,
                    ttl: float | None = None) -> None:
        """:meth:`finish` for every key of a batch (``entries=None`` if the read failed): each key is filled
        unless it was invalidated or the L1 flushed since its own :meth:`begin` (the same per-key check)."""
        for k, tok in tokens.items():
            self.finish(k, tok, None if entries is None else entries.get(k), ttl)

    # ---------------------------------------------------------------- invalidation

    def invalidate(self, keys: Iterable[str]) -> None:
        """Drop the L1 copies of ``keys`` (user keys) and void their in-flight fills."""
        ks = list(keys)
        with self._lock:
            self._seq += 1
            seq = self._seq
            for k in ks:
                s = self._data.pop(k, None)
                if s is not None:
                    self.bytes -= s.size
                if k in self._inflight:
                    self._inv_seq[k] = seq
            self.invalidations += len(ks)
        self._notify(ks)

    def on_message(self, data: bytes | str) -> None:
        """A message from the namespace channel: entry keys joined by newlines.

        Never raises: a message that cannot be read (non-UTF-8 bytes, an entry key with no closing brace, any
        other surprise) is counted in ``malformed_messages``, logged (the first, then every 1000th) and answered
        by flushing the whole L1, since the keys it meant cannot be known."""
        self.messages += 1
        try:
            text = data.decode("utf-8", "surrogatepass") if isinstance(data, bytes) else data
            prefix = f"cs:{self.ns}:"
            lines = text.split("\n")
            keys = [user_key(self.ns, ek) for ek in lines if ek.startswith(prefix)]
            tp = lines[-1][3:] if self.traced and lines[-1].startswith("tp=") else None
        except Exception as e:
            self.malformed_messages += 1
            if self.malformed_messages % 1000 == 1:
                log.error("cachesync L1 (namespace %s): unreadable invalidation message (%s: %s; %d so far); "
                          "L1 flushed", self.ns, type(e).__name__, e, self.malformed_messages)
            self.clear("malformed message")
            return
        span = self.span
        if tp is not None and span is not None:  # the writer's trace: this process's drop as a child span of it
            with span("cachesync.l1.drop", {"cachesync.namespace": self.ns, "cachesync.keys": len(keys)}, tp):
                self.invalidate(keys)
            return
        self.invalidate(keys)

    def clear(self, reason: str = "clear") -> None:
        """Flush every L1 copy and void every in-flight fill."""
        with self._lock:
            self._seq += 1
            self._flush_seq = self._seq
            self._data.clear()
            self.bytes = 0
            self.flushes += 1
        self._notify(None)

    def _notify(self, keys: list[str] | None) -> None:
        """Tell the listeners (after the L1 already dropped the keys): one that raises is counted in
        ``listener_errors`` and logged (the first, then every 1000th), never passed on. Raised from the subscriber,
        it used to end the subscription (the L1 bypassed), and raised again from the flush that followed it, the
        subscriber thread itself: the L1 stayed off for the process's life."""
        for fn in _live(self._listeners):
            try:
                fn(keys)
            except Exception as e:
                self.listener_errors += 1
                if self.listener_errors % 1000 == 1:
                    log.error("cachesync L1 (namespace %s): an invalidation listener raised (%s: %s; %d so far); "
                              "the L1 itself dropped the keys", self.ns, type(e).__name__, e, self.listener_errors)

    def add_listener(self, fn: Listener, *, weak: bool = False) -> None:
        """Call ``fn(keys)`` after each invalidation and ``fn(None)`` after each flush (refresh-ahead uses it). An
        exception ``fn`` raises is counted in ``stats["listener_errors"]`` and logged, never passed on. ``weak``:
        ``fn`` is a bound method held weakly; it is dropped once its object is gone (a refresh-ahead handle the
        application let go of)."""
        _live(self._listeners)  # dropped handles' listeners go first (the list stays as long as the live ones)
        self._listeners.append(weakref.WeakMethod(fn) if weak else fn)  # type: ignore[arg-type]

    def add_state_listener(self, fn: Callable[[bool], None], *, weak: bool = False) -> None:
        """Call ``fn(enabled)`` whenever the subscription comes up (True) or is lost (False); ``weak`` as in
        :meth:`add_listener`."""
        _live(self._state_listeners)
        self._state_listeners.append(weakref.WeakMethod(fn) if weak else fn)  # type: ignore[arg-type]

    # ---------------------------------------------------------------- subscription state

    # Both transitions publish ``state`` and the counters *last*: whoever sees them change (a test polling
    # ``stats``, an operator) also sees the flush and the log record. (Publishing them before the flush and the
    # WARNING made tests/test_l1.py's subscription tests flaky: a poll on ``subscribes`` could return before
    # "is back" was logged, a poll on ``state == "down"`` before the flush.) ``enabled`` itself is cleared
    # first on a loss: no hit may be served from that instant on.

    def on_subscribed(self) -> None:
        """The SUBSCRIBE is confirmed: from now on every invalidation reaches :meth:`on_message`."""
        self.clear("subscribed")
        self.caught_up()  # the L1 is empty: nothing it holds can be behind (the probe still sees new data)
        if self.closed:  # close() came first (the flow ends next): never "up" with no subscriber left
            return
        if self.subscribes > 0:
            log.warning("cachesync L1 (namespace %s): invalidation subscription is back; L1 enabled again", self.ns)
        with self._lock:
            if self.closed:
                return
            self.enabled = True
            self.state = "up"
            self.subscribes += 1
            self._end_bypass()
        for fn in _live(self._state_listeners):
            fn(True)

    def on_subscription_lost(self, reason: str) -> None:
        """The subscription dropped (or was never made): flush, and bypass until :meth:`on_subscribed`."""
        with self._lock:
            was = self.enabled
            self.enabled = False
        self.clear("subscription lost")
        if was and not self.closed:
            log.warning("cachesync L1 (namespace %s): invalidation subscription lost (%s); L1 flushed and bypassed "
                        "until resubscribed", self.ns, reason)
        with self._lock:
            self.state = "closed" if self.closed else "down"
            self.last_loss_reason = reason
            if self.closed:
                self._end_bypass()
            elif self._bypass_since is None:
                self._bypass_since = time.monotonic()
            if was:
                self.subscription_losses += 1
        for fn in _live(self._state_listeners):
            fn(False)

    def subscriber_died(self, e: BaseException) -> None:
        """The subscriber thread/task ended on an unexpected error: bypass (never "up" while deaf) until the
        driver's restarted subscription confirms again."""
        self.subscriber_deaths += 1
        log.error("cachesync L1 (namespace %s): subscriber died (%s: %s); L1 flushed and bypassed, restarting it",
                  self.ns, type(e).__name__, e)
        self.on_subscription_lost(f"subscriber died: {type(e).__name__}")

    def forked(self) -> None:
        """In a child forked from the process that built this L1: its subscriber does not exist here, so the L1
        is flushed and bypassed for good in the child (reads go to Redis)."""
        self.enabled = False
        self.closed = True
        self.state = "closed"
        self.last_loss_reason = "forked: no subscriber in this process; build a new cache in the child"
        self._probe = None  # the parent's socket
        self._lock = self._lock_factory()
        self._data.clear()
        self.bytes = 0
        self._seq += 1
        self._flush_seq = self._seq

    def close(self) -> None:
        """Stop for good: the subscription flow ends, the L1 is flushed and bypassed."""
        self.closed = True
        with self._lock:
            self.enabled = False
            self.state = "closed"
            self._end_bypass()
        self.clear("closed")

    def _end_bypass(self) -> None:
        if self._bypass_since is not None:
            self._bypass_total += time.monotonic() - self._bypass_since
            self._bypass_since = None

    @property
    def bypass_seconds(self) -> float:
        """Seconds this L1 was bypassed so far (before the first subscription and while it was down; not after
        :meth:`close`)."""
        since = self._bypass_since
        return self._bypass_total + (0.0 if since is None else max(0.0, time.monotonic() - since))

    @property
    def stats(self) -> dict[str, Any]:
        """Counters and state: ``state`` ("connecting", "up", "down", "closed"), ``enabled``, ``entries``, ``bytes``,
        ``hits``, ``misses``, ``bypassed`` (reads while the subscription was down), ``fills``, ``fills_dropped``
        (the fill race), ``invalidations``, ``messages``, ``evictions``, ``expirations``, ``flushes``,
        ``subscription_losses``, ``subscribes``, ``lag_bypasses`` (lookups that bypassed because an invalidation
        had arrived and was not applied yet), ``last_loss_reason``, ``bypass_seconds`` (time bypassed so far),
        ``malformed_messages``, ``subscriber_deaths``, ``listener_errors`` (listeners that raised)."""
        return {
            "state": self.state, "enabled": self.enabled, "entries": len(self._data), "bytes": self.bytes,
            "hits": self.hits, "misses": self.misses, "bypassed": self.bypassed, "fills": self.fills,
            "fills_dropped": self.fills_dropped, "invalidations": self.invalidations, "messages": self.messages,
            "malformed_messages": self.malformed_messages, "subscriber_deaths": self.subscriber_deaths,
            "listener_errors": self.listener_errors,
            "evictions": self.evictions, "expirations": self.expirations, "flushes": self.flushes,
            "subscription_losses": self.subscription_losses, "subscribes": self.subscribes,
            "lag_bypasses": self.lag_bypasses, "last_loss_reason": self.last_loss_reason,
            "bypass_seconds": self.bypass_seconds,
        }

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, key: object) -> bool:
        return key in self._data


def _cacheable(entry: Any) -> bool:
    if entry.stale:
        return False
    if entry.source == "cache":
        return True
    return entry.source == "loader" and bool(entry.filled)


# --------------------------------------------------------------------------- the subscription, as a flow


@dataclass(frozen=True, slots=True)
class Connect:
    """Open a fresh connection (RESP2) for the subscription."""


@dataclass(frozen=True, slots=True)
class Send:
    """Send one command on the subscription connection."""

    args: tuple[Any, ...]


@dataclass(frozen=True, slots=True)
class Read:
    """Read one reply; send back ``None`` if nothing arrived within ``timeout`` seconds."""

    timeout: float


@dataclass(frozen=True, slots=True)
class Close:
    """Close the subscription connection (ignore errors)."""


@dataclass(frozen=True, slots=True)
class Sleep:
    """Pause ``seconds`` (return early when the L1 is closed)."""

    seconds: float


_ALL: weakref.WeakSet[L1] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for core in list(_ALL):
        core.forked()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class SubscriptionLost(Exception):
    """Thrown into :func:`subscription_flow` by a driver when the connection fails."""


SubFlow = Generator[Any, Any, None]


def _kind(reply: Any) -> bytes:
    if isinstance(reply, (list, tuple)) and reply:
        k = reply[0]
        return k if isinstance(k, bytes) else str(k).encode()
    return b""


def subscription_flow(l1: L1) -> SubFlow:
    """Keep ``l1`` subscribed to its namespace channel; both drivers run this same flow."""
    o = l1.options
    chan = l1.channel
    backoff = 0.05
    while not l1.closed:
        try:
            yield Connect()
            yield Send(("SUBSCRIBE", chan))
            while True:
                r = yield Read(max(o.ping_interval * 2, 1.0))
                if r is None:
                    raise SubscriptionLost("no SUBSCRIBE confirmation")
                if _kind(r) == b"subscribe":
                    break
            l1.on_subscribed()
            backoff = 0.05
            ping_out = False
            while not l1.closed:
                r = yield Read(o.ping_interval)
                if r is None:
                    if ping_out:
                        raise SubscriptionLost(f"no PING reply within {o.ping_interval}s")
                    yield Send(("PING",))
                    ping_out = True
                    continue
                kind = _kind(r)
                if kind == b"message":
                    l1.on_message(r[2])
                elif kind == b"pong":
                    ping_out = False
        except SubscriptionLost as e:
            l1.on_subscription_lost(str(e) or type(e).__name__)
        yield Close()
        if l1.closed:
            return
        yield Sleep(backoff)
        backoff = min(backoff * 2, o.reconnect_max_delay)
    yield Close()
