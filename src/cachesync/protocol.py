"""The cachesync consistency protocol, with no I/O.

Theory of operation
===================

Every cache key is one Redis hash (see :mod:`cachesync.keys`) holding the
value, its version, a *lease* (token + deadline from the Redis clock), a
*version floor* and, after an invalidation, a *tombstone*. All state changes
are atomic Lua scripts (``cachesync/lua/*.lua``). The rules:

1. **Read (cache-aside with leases).** ``get.lua`` returns a hit, or, on a miss,
   grants the caller a lease (a random token stored in the hash). Only the lease
   holder loads from the database; other readers register as waiters and block
   on the key's wake list (``BLPOP``) until the holder fills, an invalidation
   arrives, or the lease deadline passes. A reader that has waited
   ``max_wait`` loads by itself and does not fill.
2. **Fill.** ``fill.lua`` stores the loaded value only if the caller *still*
   holds its lease and the value's version is not below the floor. An
   invalidation or a writer's ``set`` deletes the lease, so a reader that loaded
   a row before a write can never write it back after the write's invalidation:
   the stale write-back is refused, not merely unlikely.
3. **Invalidate.** ``invalidate.lua`` deletes (or, with ``serve_stale``,
   stale-marks) the value, voids the lease, raises the version floor to the
   committed version, leaves a tombstone for ``tombstone_ttl``, wakes waiters
   and announces the key on the namespace channel (for L1 caches).
4. **Set (writer).** ``set.lua`` stores a writer's new value, voids leases and,
   when a version is given, refuses to go backwards.
5. **Write strategies** are data (:data:`STRATEGIES`): which steps run before
   the database commit, after it, after a delay, and when the write fails.

The read and write paths are generators (like httpx's ``auth_flow``): they
*yield* three kinds of effect, :class:`Cmd` (one Redis command), :class:`Load`
(call the loader) and :class:`Schedule` (a delayed step), and receive their
results. Scripts (:func:`script`: EVALSHA with the NOSCRIPT fallback) and
waits (:func:`wait`: BLPOP) are sub-flows built from ``Cmd``.
:mod:`cachesync.sync` drives the flows with redis-py and :mod:`cachesync.aio`
with redis.asyncio; neither holds protocol logic. A driver reports an
unreachable Redis by throwing :class:`RedisDown` into the generator, NOSCRIPT
by throwing :class:`NoScript`, and a loader's exception by throwing it as is.
"""

from __future__ import annotations

import datetime as _dt
import decimal
import itertools
import os
import random
import re
import time
from collections.abc import Generator, Mapping, Sequence
from dataclasses import dataclass, field
import enum
from enum import Enum
import logging
from typing import Any, Final, Generic, TypeVar

from .errors import InvalidationError, SerializationError, UnknownStrategyError, UsageError
from .errors import CorruptEntryError, ValueTooLargeError
from .keys import channel, check_key, entry_key, group_by_slot, wake_key
from .options import CacheOptions, check_non_negative, check_positive
from .scripts import SCRIPTS

log = logging.getLogger("cachesync")


class NotFound(enum.Enum):
    """The type of :data:`NOT_FOUND` (usable in ``isinstance`` and ``Literal[NotFound.NOT_FOUND]``)."""

    NOT_FOUND = "NOT_FOUND"

    def __repr__(self) -> str:
        return "NOT_FOUND"

    def __bool__(self) -> bool:
        return False


NOT_FOUND: Final = NotFound.NOT_FOUND
"""Return this from a loader when the row does not exist; ``get`` returns it for a negative entry."""

MISSING: Any = object()


T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Versioned(Generic[T]):
    """A loader's (or writer's) value with its version: ``return Versioned(row, row.version)``.

    ``version`` is an int, float, Decimal, datetime or a numeric string
    (compared numerically in Redis, exact up to 2**53).
    """

    value: T
    version: Any


@dataclass(frozen=True, slots=True)
class Entry(Generic[T]):
    """What a read returns in full (``get_entry``)."""

    value: T | NotFound
    """The value, or ``NOT_FOUND``."""
    version: int | float | None = None
    stale: bool = False
    """True when a stale-marked value was served (``serve_stale``)."""
    source: str = "cache"
    """``"cache"``, ``"loader"`` (this call loaded it) or ``"fallback"`` (Redis was down)."""
    filled: bool = False
    """For ``source="loader"``: whether Redis accepted the write-back."""

    @property
    def found(self) -> bool:
        return self.value is not NOT_FOUND


# --------------------------------------------------------------------------- effects


@dataclass(frozen=True, slots=True)
class Cmd:
    """Run one plain Redis command (``args[0]`` is its name); send back its reply.

    ``route`` matters only on Redis Cluster, for a command without keys: a key (run it on the primary that owns
    the key's slot) or ``"*"`` (run it on every primary).
    """

    args: tuple[Any, ...]
    route: str | None = None


@dataclass(frozen=True, slots=True)
class Load:
    """Call the loader; send back its value (``keys is None``) or a mapping key -> value (batch).

    ``fallback`` loads are throttled to ``fallback_concurrency`` by the driver.
    """

    keys: list[str] | None = None
    fallback: bool = False


@dataclass(frozen=True, slots=True)
class Schedule:
    """Run ``flow_factory()``'s flow after ``delay`` seconds, in the background; retry it until it succeeds."""

    delay: float
    flow_factory: Any
    keys: list[str] = field(default_factory=list)


class NoScript(Exception):
    """Thrown into a flow by a driver when Redis answers NOSCRIPT (its script cache was flushed or restarted)."""


class CommandError(Exception):
    """Thrown into a flow by a driver when Redis answers an error reply other than NOSCRIPT (e.g. WRONGTYPE)."""


class RedisDown(Exception):
    """Thrown into a flow by a driver when Redis is unreachable."""

    def __init__(self, cause: BaseException) -> None:
        self.cause = cause
        super().__init__(str(cause))


Flow = Generator[Any, Any, Any]

HIT, LEASED, WAIT, MISS = 1, 2, 3, 0


# --------------------------------------------------------------------------- sub-flows


def script(name: str, keys: list[str], args: list[Any]) -> Flow:
    """Run Lua script ``name`` (``EVALSHA``; on NOSCRIPT, ``SCRIPT LOAD`` where the keys live, then again)."""
    s = SCRIPTS[name]
    cmd = ("EVALSHA", s.sha, len(keys), *keys, *args)
    try:
        return (yield Cmd(cmd))
    except NoScript:
        yield Cmd(("SCRIPT", "LOAD", s.source), route=keys[0] if keys else "*")
        return (yield Cmd(cmd))


def wait(ctx: Context, wake_keys: list[str], timeout: float) -> Flow:
    """Block on the wake lists (one ``BLPOP`` of at most 80 % of the socket timeout; callers loop for longer).

    Returns ``(seconds waited, popped item or None)``.
    """
    t0 = time.monotonic()
    timeout = min(timeout, max(0.01, ctx.o.socket_timeout * 0.8))
    popped = yield Cmd(("BLPOP", *wake_keys, f"{timeout:.3f}"))
    return time.monotonic() - t0, (popped[1] if popped else None)


# --------------------------------------------------------------------------- strategies


class Step(Enum):
    INVALIDATE = "invalidate"
    SET_VERSIONED = "set_versioned"
    SET_PLAIN = "set_plain"


@dataclass(frozen=True)
class Strategy:
    """A write strategy as data: the cache steps around the database write."""

    name: str
    before: tuple[Step, ...]
    """Steps run before the database write (when the ``write`` block is entered)."""
    after: tuple[Step, ...]
    """Steps run after the block exits normally (the commit happened inside it)."""
    delayed: tuple[Step, ...]
    """Steps run ``double_delete_delay`` seconds after the block exits."""
    on_error: tuple[Step, ...]
    """Steps run when the block raises (the write may or may not have committed)."""
    safe: bool
    summary: str


INV, SV, SP = Step.INVALIDATE, Step.SET_VERSIONED, Step.SET_PLAIN

STRATEGIES: dict[str, Strategy] = {
    s.name: s
    for s in (
        Strategy("db_then_invalidate", (), (INV,), (), (INV,), True,
                 "Update the database, then invalidate (default). With leases no reader can write back a value "
                 "it loaded before the commit. Safe for every key."),
        Strategy("db_then_set_versioned", (), (SV,), (), (INV,), True,
                 "Update the database, then store the new value guarded by its version (a write-heavy key stays "
                 "warm). Safe when every write supplies a monotonically increasing version."),
        Strategy("delayed_double_delete", (INV,), (), (INV,), (INV,), False,
                 "Delete, update the database, delete again after double_delete_delay. Narrows the "
                 "delete-then-update window; correct only if the delay exceeds every reader's load time."),
        Strategy("delete_then_db", (INV,), (), (), (), False,
                 "UNSAFE: delete, then update the database. A reader between the two re-caches the old row "
                 "until the TTL."),
        Strategy("cache_then_db", (SP,), (), (), (), False,
                 "UNSAFE: update the cache, then the database. Two writers can interleave; a failed database "
                 "write leaves a value that was never committed."),
        Strategy("db_then_cache", (), (SP,), (), (), False,
                 "UNSAFE: update the database, then the cache, without a version. Two writers' cache updates "
                 "can land in the opposite order to their commits."),
    )
}


def resolve_strategy(name: object) -> Strategy:
    """The :class:`Strategy` of a name, or :class:`UnknownStrategyError`."""
    if isinstance(name, Strategy):
        return name
    try:
        return STRATEGIES[name]  # type: ignore[index]
    except (KeyError, TypeError):
        raise UnknownStrategyError(name, STRATEGIES) from None


# --------------------------------------------------------------------------- context


_TOKENS = itertools.count(1)
_PREFIX = os.urandom(8).hex()


def _reseed_tokens() -> None:
    """A forked child draws a new random prefix: workers forked after ``import cachesync`` (gunicorn
    ``--preload``, uWSGI, Celery prefork, multiprocessing with fork) never share the parent's token sequence,
    so one worker's voided lease can never be filled through another worker's identical token."""
    global _TOKENS, _PREFIX
    _TOKENS = itertools.count(1)
    _PREFIX = os.urandom(8).hex()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reseed_tokens)


def new_token() -> str:
    """A lease token unique across processes, forked ones included (random per-process prefix + counter)."""
    return f"{_PREFIX}{next(_TOKENS):x}"


MAX_EXACT_VERSION = 2**53
"""Largest integer version the Lua scripts compare exactly (Lua numbers are doubles); larger ones are refused."""

_NUMERIC = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?")


def encode_version(v: Any) -> str:
    """A version as the decimal string the Lua scripts compare numerically ("" for None).

    Refused with :class:`UsageError` naming the value: bools, NaN and infinities (float, Decimal or string),
    integers beyond +-2**53 (they would compare inexactly in Redis), and anything not numeric.
    """
    if v is None:
        return ""
    if isinstance(v, bool):
        raise UsageError(f"version must be a number or datetime, not bool ({v!r})")
    if isinstance(v, int):
        if abs(v) > MAX_EXACT_VERSION:
            raise UsageError(f"version {v!r} is beyond +-2**53, which Redis cannot compare exactly")
        return str(v)
    if isinstance(v, float):
        if v != v or v in (float("inf"), float("-inf")):
            raise UsageError(f"version must be finite, got {v!r}")
        return repr(v)
    if isinstance(v, decimal.Decimal):
        if not v.is_finite():
            raise UsageError(f"version must be finite, got {v!r}")
        if abs(v) > MAX_EXACT_VERSION:
            raise UsageError(f"version {v!r} is beyond +-2**53, which Redis cannot compare exactly")
        return str(v)
    if isinstance(v, _dt.datetime):
        if v.tzinfo is None:
            v = v.replace(tzinfo=_dt.UTC)
        return str(int(v.timestamp() * 1_000_000))
    if isinstance(v, str):
        if not _NUMERIC.fullmatch(v):
            raise UsageError(f"version string must be a finite decimal number, got {v[:40]!r}")
        if abs(float(v)) > MAX_EXACT_VERSION:
            raise UsageError(f"version {v[:40]!r} is beyond +-2**53, which Redis cannot compare exactly")
        return v
    raise UsageError(f"version must be int, float, Decimal, datetime or a numeric string, not {type(v).__name__}")


CorruptEntry = CorruptEntryError
"""Raised inside a flow when a stored entry cannot be read (a foreign or damaged field); the flows repair it."""


def decode_version(b: bytes | str | None) -> int | float | None:
    """A stored version field as a number; :class:`CorruptEntry` when the field is not numeric."""
    if b is None:
        return None
    try:
        s = b.decode() if isinstance(b, bytes) else b
        try:
            return int(s)
        except ValueError:
            f = float(s)
            if f != f or f in (float("inf"), float("-inf")):
                raise ValueError(s) from None
            return f
    except (ValueError, UnicodeDecodeError):
        raise CorruptEntry(f"version field {b[:40]!r} is not a number") from None


class Context:
    """Everything a flow needs that is not I/O: options, key layout, serialization, randomness."""

    def __init__(self, options: CacheOptions, *, cluster: bool = False, rng: random.Random | None = None) -> None:
        self.o = options
        self.ns = options.namespace
        self.ser = options.serializer_obj
        self.cluster = cluster
        self.rng = rng or random.Random()
        self.lease_ms = int(options.lease_ttl * 1000)
        self.tomb_ms = int(options.tombstone_ttl * 1000)
        self.wake_ms = int(options.wake_ttl * 1000)
        self.mode = "L" if options.leases else "P"
        self.channel = channel(self.ns) if options.broadcast_invalidations else ""
        self._ekeys: dict[str, str] = {}
        self.stats: dict[str, int] = dict.fromkeys(
            ("hits", "misses", "negative_hits", "stale_served", "loads", "fills", "fills_refused", "waits",
             "fallback_loads", "invalidations", "redis_errors", "sets", "sets_refused", "corrupt_entries",
             "singleflight_joins", "singleflight_retries", "fills_refused_lease", "fills_refused_older",
             "values_too_large", "serialize_errors", "deserialize_errors", "invalidations_failed", "read_errors"), 0)
        self.traced = bool(options.tracing)  # invalidations carry the current span's traceparent (tracing=)
        self.corrupt_logged: set[str] = set()

    # keys
    def ekey(self, key: str) -> str:
        ek = self._ekeys.get(key)
        if ek is None:
            check_key(key, self.o.max_key_bytes)
            ek = entry_key(self.ns, key)
            if len(self._ekeys) > 100_000:
                self._ekeys.clear()
            self._ekeys[key] = ek
        return ek

    def ttl_ms(self, ttl: float | None, negative: bool = False) -> int:
        if ttl is None:
            base = self.o.negative_ttl if negative else self.o.default_ttl
        else:
            base = check_positive("ttl", ttl)
            if negative:
                base = min(base, self.o.negative_ttl)
        j = self.o.ttl_jitter
        if j:
            base *= 1.0 + self.rng.random() * j
        return max(1, int(base * 1000))

    # values
    def encode(self, key: str, value: Any) -> tuple[bytes, str, str]:
        """(payload, version, negative flag) for a loaded or written value."""
        version: Any = None
        if isinstance(value, Versioned):
            value, version = value.value, value.version
        if value is NOT_FOUND:
            return b"", encode_version(version), "1"
        try:
            payload = self.ser.dumps(value)
        except (TypeError, ValueError, OverflowError) as e:
            self.stats["serialize_errors"] += 1
            raise SerializationError(key, f"{type(value).__name__} value: {e}") from e
        except Exception as e:  # a third-party serializer's own error type
            self.stats["serialize_errors"] += 1
            raise SerializationError(key, f"{type(value).__name__} value: {type(e).__name__}: {e}") from e
        if len(payload) > self.o.max_value_bytes:
            self.stats["values_too_large"] += 1
            raise ValueTooLargeError(key, len(payload), self.o.max_value_bytes)
        return payload, encode_version(version), "0"

    def decode(self, key: str, payload: bytes, negative: bool) -> Any:
        """A stored payload's value; :class:`SerializationError` when it cannot be decoded."""
        if negative:
            return NOT_FOUND
        try:
            return self.ser.loads(payload)
        except Exception as e:
            self.stats["deserialize_errors"] += 1
            raise SerializationError(key, f"stored payload cannot be decoded with {self.ser.name}: {e}") from e

    def decode_stored(self, key: str, payload: bytes, negative: bool) -> Any:
        """Like :meth:`decode`, raising :class:`CorruptEntry` (which the read flows repair) instead."""
        if negative:
            return NOT_FOUND
        try:
            return self.ser.loads(payload)
        except Exception as e:
            self.stats["deserialize_errors"] += 1
            raise CorruptEntry(f"payload cannot be decoded with {self.ser.name}: {type(e).__name__}: {e}") from e

    @staticmethod
    def unwrap(value: Any) -> Any:
        return value.value if isinstance(value, Versioned) else value


@dataclass(slots=True)
class GetReply:
    code: int
    payload: bytes | None
    version: int | float | None
    flags: str
    wait_s: float = 0.0


def parse_get(reply: Sequence[Any]) -> list[GetReply]:
    """Parse ``get.lua``'s flat reply (4 items per key)."""
    out = []
    for i in range(0, len(reply), 4):
        code = int(reply[i])
        if code == HIT:
            f = reply[i + 3]
            out.append(GetReply(HIT, reply[i + 1], decode_version(reply[i + 2]),
                                f.decode() if isinstance(f, bytes) else (f or "")))
        elif code == WAIT:
            out.append(GetReply(WAIT, reply[i + 2], decode_version(reply[i + 3]), "", int(reply[i + 1]) / 1000.0))
        else:
            out.append(GetReply(code, reply[i + 2] if code == LEASED else None,
                                decode_version(reply[i + 3]) if code == LEASED else None, ""))
    return out


def parse_wake(item: bytes | None) -> GetReply | None:
    """A wake-up item carrying the value just stored (``F<neg><version>|<payload>``), as a hit; else None."""
    if not item or item[:1] != b"F":
        return None
    bar = item.find(b"|")
    if bar < 2:
        raise CorruptEntry(f"wake-up item {item[:40]!r} has no '|'")
    return GetReply(HIT, item[bar + 1:], decode_version(item[2:bar] or None), "n" if item[1:2] == b"1" else "")


def _interleave(ekeys: Sequence[str]) -> list[str]:
    ks: list[str] = []
    for ek in ekeys:
        ks.append(ek)
        ks.append(wake_key(ek))
    return ks


# --------------------------------------------------------------------------- key arguments


def key_list(keys: object, fn: str) -> list[str]:
    """An iterable of keys as a list; a single string (which would be read character by character) is refused."""
    if isinstance(keys, (str, bytes, bytearray, memoryview)):
        shown = keys[:40] if isinstance(keys, str) else bytes(keys[:40])
        raise UsageError(f"{fn}() takes an iterable of keys, not the single string {shown!r}: wrap it in a list")
    try:
        return list(keys)  # type: ignore[call-overload, no-any-return]
    except TypeError:
        raise UsageError(f"{fn}() takes an iterable of keys, got {type(keys).__name__}") from None


def star_keys(keys: Sequence[object], fn: str) -> None:
    """Keys given as ``fn(*keys)``: a list or tuple passed as one argument is refused with a clear message."""
    for k in keys:
        if isinstance(k, (list, tuple, set, frozenset, dict)):
            raise UsageError(f"{fn}() takes keys as separate arguments, got a {type(k).__name__}: "
                             f"call {fn}(*keys)")


# --------------------------------------------------------------------------- read flows


def _hit(ctx: Context, key: str, r: GetReply) -> Entry[Any]:
    """A hit's Entry; :class:`CorruptEntry` when its payload cannot be decoded."""
    neg = r.flags == "n"
    assert r.payload is not None
    value = ctx.decode_stored(key, r.payload, neg)
    st = ctx.stats
    if neg:
        st["negative_hits"] += 1
    else:
        st["hits"] += 1
    return Entry(value, r.version, r.flags == "s")


def _repair(ctx: Context, key: str, ek: str, problem: object) -> Flow:
    """A corrupted or foreign entry (undecodable value, non-numeric field, wrong Redis type) is deleted, counted
    and logged once per key; the read goes on as a miss (lease, load, fill). Deleting is always safe: a lease
    it removes can no longer fill, and the next fill replaces the entry."""
    ctx.stats["corrupt_entries"] += 1
    if key not in ctx.corrupt_logged:
        if len(ctx.corrupt_logged) < 10_000:
            ctx.corrupt_logged.add(key)
        log.warning("cachesync: namespace %r key %r: corrupted or foreign entry (%s); deleted, read as a miss",
                    ctx.ns, key, problem)
    try:
        yield Cmd(("DEL", ek))
    except (RedisDown, CommandError):
        pass


def _release(ctx: Context, keys: list[str], token: str) -> Flow:
    """Give up a lease (no-op if the token does not hold it): waiters here and in other processes retry at once."""
    try:
        yield from script("release", keys, [token, ctx.wake_ms])
    except (RedisDown, CommandError):
        pass


def get_flow(ctx: Context, key: str, ttl: float | None) -> Flow:
    """Read one key: hit, or lease + load + fill, or wait for the lease holder.

    Cancellation-safe: whatever is thrown into the flow while it may hold a lease (a loader's exception,
    ``asyncio.CancelledError``, ``KeyboardInterrupt``) releases the lease first, so that waiters retry at once.
    """
    ek = ctx.ekey(key)
    if ttl is not None:
        check_positive("ttl", ttl)
    # Fast path: one plain HMGET (cheaper than a script call) serves every fresh hit.
    try:
        f = yield Cmd(("HMGET", ek, "v", "ver", "n", "s"))
    except RedisDown as e:
        return (yield from _fallback_one(ctx, e))
    except CommandError as e:  # WRONGTYPE: a foreign key where the entry belongs
        yield from _repair(ctx, key, ek, e)
        f = (None, None, None, None)
    if f[0] is not None and f[3] is None:
        try:
            return _hit(ctx, key, GetReply(HIT, f[0], decode_version(f[1]), "n" if f[2] == b"1" else ""))
        except CorruptEntry as e:
            yield from _repair(ctx, key, ek, e)
            f = (None, None, None, None)
    keys = [ek, wake_key(ek)]
    token = new_token()
    args = [token, ctx.lease_ms, ctx.mode, ctx.wake_ms]
    waited = 0.0
    o = ctx.o
    repaired = 0
    while True:
        if ctx.mode == "P" and f[0] is None:
            reply = [MISS, None, None, None]  # plain cache-aside: a miss loads without a lease
        else:
            try:
                reply = yield from script("get", keys, args)
            except RedisDown as e:
                return (yield from _fallback_one(ctx, e))
            except GeneratorExit:
                raise
            except BaseException:  # cancelled while get.lua may have granted us the lease
                yield from _release(ctx, keys, token)
                raise
        try:
            r = parse_get(reply)[0]
            if r.code == HIT:
                if r.flags == "s":  # plain mode: a stale-marked value counts as a hit
                    ctx.stats["stale_served"] += 1
                return _hit(ctx, key, r)
            if r.code == WAIT and o.serve_stale and r.payload is not None:
                entry = Entry(ctx.decode_stored(key, r.payload, False), r.version, True)
                ctx.stats["stale_served"] += 1
                return entry
        except CorruptEntry as e:
            if r.code == LEASED or repaired > 2:  # pragma: no cover - get.lua only leases an entry it can read
                raise
            repaired += 1
            yield from _repair(ctx, key, ek, e)
            f = (None,)
            continue
        if r.code == WAIT:
            remaining = o.max_wait - waited
            if remaining <= 0:
                ctx.stats["loads"] += 1
                value = yield Load()
                return Entry(ctx.unwrap(value), source="loader")
            ctx.stats["waits"] += 1
            elapsed, item = yield from wait(ctx, [keys[1]], min(r.wait_s, remaining) + 0.001)
            waited += elapsed
            hit = None
            try:
                hit = parse_wake(item)
                if hit is not None:  # the lease holder's fill woke us with the value itself
                    return _hit(ctx, key, hit)
            except CorruptEntry:
                pass  # an unreadable wake-up item: read again
            f = (None,)
            continue
        # LEASED (we hold the lease) or MISS (plain mode)
        ctx.stats["misses"] += 1
        ctx.stats["loads"] += 1
        try:
            value = yield Load()
            payload, ver, neg = ctx.encode(key, value)
            ttl_ms = ctx.ttl_ms(ttl, neg == "1")
        except GeneratorExit:
            raise
        except BaseException:
            if r.code == LEASED:
                yield from _release(ctx, keys, token)
            raise
        try:
            codes = yield from script("fill", keys, [token if r.code == LEASED else "", ctx.wake_ms, payload, ver,
                                              ttl_ms, neg])
        except RedisDown:
            ctx.stats["redis_errors"] += 1
            return Entry(ctx.unwrap(value), decode_version(ver or None), source="loader")
        except GeneratorExit:
            raise
        except BaseException:  # cancelled while fill.lua ran: the lease may still be ours
            if r.code == LEASED:
                yield from _release(ctx, keys, token)
            raise
        ok = int(codes[0]) == 1
        ctx.stats["fills" if ok else "fills_refused"] += 1
        if not ok:
            ctx.stats["fills_refused_older" if int(codes[0]) == -1 else "fills_refused_lease"] += 1
        return Entry(ctx.unwrap(value), decode_version(ver or None), source="loader", filled=ok)


def follower_accepts(entry: Entry[Any]) -> bool:
    """Read-your-writes through singleflight: may a reader that joined another caller's flight take its result?

    Only a hit or a value whose fill Redis accepted. A fill is accepted only while its lease is intact, so no
    invalidation came between the leader's lease and its fill; a value loaded without an accepted fill (refused,
    uncached fallback, a waiter's own load) may predate a write whose invalidation returned before the follower's
    read began, so the follower reads again. Both drivers apply this rule.
    """
    return entry.source == "cache" or entry.filled


def _fallback_one(ctx: Context, e: RedisDown) -> Flow:
    ctx.stats["redis_errors"] += 1
    if ctx.o.on_redis_error == "fail":
        raise e.cause
    ctx.stats["fallback_loads"] += 1
    value = yield Load(fallback=True)
    return Entry(ctx.unwrap(value), source="fallback")


def _release_many(ctx: Context, eks: list[str], idxs: list[int], token: str) -> Flow:
    for group in _groups(ctx, [eks[i] for i in idxs]):
        yield from _release(ctx, _interleave([eks[idxs[j]] for j in group]), token)


def get_many_flow(ctx: Context, keys: Sequence[str], ttl: float | None) -> Flow:
    """Read a batch: one ``get.lua`` per slot group, one ``loader_many`` call for all leased keys, one fill."""
    ukeys = list(dict.fromkeys(keys))
    if ttl is not None:
        check_positive("ttl", ttl)
    eks = [ctx.ekey(k) for k in ukeys]
    token = new_token()
    args = [token, ctx.lease_ms, ctx.mode, ctx.wake_ms]
    result: dict[str, Entry[Any]] = {}
    pending = list(range(len(ukeys)))
    waited = 0.0
    o = ctx.o
    repairs = 0
    while pending:
        leased: list[int] = []
        plain: list[int] = []
        waiting: list[tuple[int, float]] = []
        corrupt: list[int] = []
        asked: list[int] = []
        try:
            for group in _groups(ctx, [eks[i] for i in pending]):
                idxs = [pending[j] for j in group]
                asked.extend(idxs)
                reply = yield from script("get", _interleave([eks[i] for i in idxs]), args)
                for i, r in zip(idxs, parse_get(reply), strict=True):
                    k = ukeys[i]
                    try:
                        if r.code == HIT:
                            result[k] = _hit(ctx, k, r)
                        elif r.code == WAIT:
                            if o.serve_stale and r.payload is not None:
                                result[k] = Entry(ctx.decode_stored(k, r.payload, False), r.version, True)
                                ctx.stats["stale_served"] += 1
                            else:
                                waiting.append((i, r.wait_s))
                        elif r.code == LEASED:
                            leased.append(i)
                        else:
                            plain.append(i)
                    except CorruptEntry as e:
                        corrupt.append(i)
                        yield from _repair(ctx, k, eks[i], e)
        except RedisDown as e:
            if leased:
                yield from _release_many(ctx, eks, leased, token)
            ctx.stats["redis_errors"] += 1
            if o.on_redis_error == "fail":
                raise e.cause from None
            missing = [ukeys[i] for i in pending if ukeys[i] not in result]
            ctx.stats["fallback_loads"] += 1
            values = yield Load(missing, fallback=True)
            for k in missing:
                result[k] = Entry(ctx.unwrap(values.get(k, NOT_FOUND)), source="fallback")
            break
        except GeneratorExit:
            raise
        except BaseException:  # cancelled: release whatever get.lua may have leased to us in this round
            yield from _release_many(ctx, eks, asked, token)
            raise
        mine = leased + plain
        if mine:
            ctx.stats["misses"] += len(mine)
            ctx.stats["loads"] += 1
            try:
                values = yield Load([ukeys[i] for i in mine])
                if not isinstance(values, Mapping):
                    raise UsageError(f"loader_many must return a mapping of key -> value, got {type(values).__name__}")
                enc = {i: ctx.encode(ukeys[i], values.get(ukeys[i], NOT_FOUND)) for i in mine}
                ttls = {i: ctx.ttl_ms(ttl, enc[i][2] == "1") for i in mine}
            except GeneratorExit:
                raise
            except BaseException:
                if leased:
                    yield from _release_many(ctx, eks, leased, token)
                raise
            for sub, tok in ((leased, token), (plain, "")):
                if not sub:
                    continue
                for group in _groups(ctx, [eks[i] for i in sub]):
                    idxs = [sub[j] for j in group]
                    fargs: list[Any] = [tok, ctx.wake_ms]
                    for i in idxs:
                        payload, ver, neg = enc[i]
                        fargs += [payload, ver, ttls[i], neg]
                    try:
                        codes = yield from script("fill", _interleave([eks[i] for i in idxs]), fargs)
                    except RedisDown:
                        ctx.stats["redis_errors"] += 1
                        codes = [0] * len(idxs)
                    except GeneratorExit:
                        raise
                    except BaseException:
                        if tok:
                            yield from _release_many(ctx, eks, sub, token)
                        raise
                    for i, c in zip(idxs, codes, strict=True):
                        ok = int(c) == 1
                        ctx.stats["fills" if ok else "fills_refused"] += 1
                        if not ok:
                            ctx.stats["fills_refused_older" if int(c) == -1 else "fills_refused_lease"] += 1
                        k = ukeys[i]
                        result[k] = Entry(ctx.unwrap(values.get(k, NOT_FOUND)), decode_version(enc[i][1] or None),
                                          source="loader", filled=ok)
        if corrupt and repairs < 3:  # repaired entries are read again at once (they now take a lease)
            repairs += 1
            pending = corrupt + [i for i, _ in waiting]
            if not waiting:
                continue
        elif corrupt:  # pragma: no cover - an entry that stays corrupt after three repairs
            raise CorruptEntry(f"entries of {[ukeys[i] for i in corrupt]!r} stay unreadable")
        if not waiting:
            break
        remaining = o.max_wait - waited
        if remaining <= 0:
            rest = [ukeys[i] for i, _ in waiting]
            ctx.stats["loads"] += 1
            values = yield Load(rest)
            for k in rest:
                result[k] = Entry(ctx.unwrap(values.get(k, NOT_FOUND)), source="loader")
            break
        ctx.stats["waits"] += 1
        first = _groups(ctx, [eks[i] for i, _ in waiting])[0]
        wks = [wake_key(eks[waiting[j][0]]) for j in first]
        elapsed, _ = yield from wait(ctx, wks, min(min(w for _, w in waiting), remaining) + 0.001)
        waited += elapsed
        pending = [i for i, _ in waiting] + (corrupt if corrupt and repairs <= 3 else [])
    return {k: result[k] for k in ukeys}


def _groups(ctx: Context, ekeys: list[str]) -> list[list[int]]:
    if ctx.cluster:
        return group_by_slot(ekeys)
    return [list(range(len(ekeys)))]


# --------------------------------------------------------------------------- write flows


def invalidate_flow(ctx: Context, keys: Sequence[str], version: Any = None) -> Flow:
    """Invalidate keys (one script per slot group). Raises :class:`InvalidationError` naming what is left."""
    star_keys(keys, "invalidate")
    ukeys = list(dict.fromkeys(keys))
    eks = [ctx.ekey(k) for k in ukeys]
    ver = encode_version(version)
    mode = "s" if ctx.o.serve_stale else "d"
    done: set[int] = set()
    had = 0
    args: list[Any] = [ctx.tomb_ms, ver, mode, ctx.wake_ms, ctx.channel]
    if ctx.traced and ctx.channel:  # the L1s that drop these keys record a span under the writer's
        from .tracing import current_traceparent

        args.append(current_traceparent() or "")
    for group in _groups(ctx, eks):
        try:
            had += int((yield from script("invalidate", _interleave([eks[i] for i in group]), args)))
        except RedisDown as e:
            ctx.stats["redis_errors"] += 1
            ctx.stats["invalidations_failed"] += len(ukeys) - len(done)
            raise InvalidationError([ukeys[i] for i in range(len(ukeys)) if i not in done], e.cause) from e.cause
        done.update(group)
    ctx.stats["invalidations"] += len(ukeys)
    return had


def set_flow(ctx: Context, key: str, value: Any, ttl: float | None, version: Any, guarded: bool) -> Flow:
    """A writer stores a value (voids leases; refuses an older version when ``guarded``)."""
    ek = ctx.ekey(key)
    if version is not None:
        value = Versioned(value, version)
    payload, ver, neg = ctx.encode(key, value)
    if not guarded:
        ver = ""
    try:
        r = yield from script("set", [ek, wake_key(ek)], [payload, ver, ctx.ttl_ms(ttl, neg == "1"), neg, ctx.wake_ms,
                                                       ctx.channel])
    except RedisDown as e:
        ctx.stats["redis_errors"] += 1
        ctx.stats["invalidations_failed"] += 1
        raise InvalidationError([key], e.cause) from e.cause
    ok = int(r) == 1
    ctx.stats["sets" if ok else "sets_refused"] += 1
    return ok


def steps_flow(ctx: Context, steps: Sequence[Step], keys: Sequence[str], value: Any, version: Any,
               ttl: float | None) -> Flow:
    """Run a strategy's steps for ``keys``."""
    for step in steps:
        if step is Step.INVALIDATE:
            yield from invalidate_flow(ctx, keys, version)
        else:
            if value is MISSING:
                raise UsageError(f"write strategy step {step.value} needs the new value: pass value= to write() or "
                                 "call set_value() inside the block")
            if step is Step.SET_VERSIONED and version is None:
                raise UsageError("strategy db_then_set_versioned needs version= (the row's new version)")
            for k in keys:
                yield from set_flow(ctx, k, value, ttl, version, step is Step.SET_VERSIONED)


class WritePlan:
    """The state of one ``cache.write(...)`` block, shared by the sync and async drivers."""

    def __init__(self, ctx: Context, keys: Sequence[str], strategy: str | None, value: Any, version: Any,
                 ttl: float | None, delay: float | None) -> None:
        star_keys(keys, "write")
        if not keys:
            raise UsageError("write() needs at least one cache key")
        self.ctx = ctx
        self.keys = [k for k in dict.fromkeys(keys)]
        for k in self.keys:
            ctx.ekey(k)
        self.strategy = resolve_strategy(strategy if strategy is not None else ctx.o.strategy)
        self.value = value
        self.version = version
        self.ttl = ttl
        self.delay = ctx.o.double_delete_delay if delay is None else check_non_negative("delay", delay)
        if SP in self.strategy.before and value is MISSING:
            raise UsageError(f"strategy {self.strategy.name} updates the cache before the database: pass value=")

    def set_value(self, value: Any, version: Any = None) -> None:
        """Give the new value (and version) for a strategy that stores it after the commit."""
        self.value = value
        if version is not None:
            self.version = version

    def before(self) -> Flow:
        return steps_flow(self.ctx, self.strategy.before, self.keys, self.value, self.version, self.ttl)

    def after(self, failed: bool) -> Flow:
        s = self.strategy
        steps = s.on_error if failed else s.after
        yield from steps_flow(self.ctx, steps, self.keys, self.value, self.version, self.ttl)
        if s.delayed and not failed:
            keys, version, ctx = self.keys, self.version, self.ctx
            yield Schedule(self.delay, lambda: steps_flow(ctx, s.delayed, keys, MISSING, version, None), keys)


def peek_flow(ctx: Context, key: str) -> Flow:
    """Read an entry's raw state without taking a lease (for audits and the lab)."""
    ek = ctx.ekey(key)
    reply = yield from script("peek", [ek], [])
    fields = dict(zip(reply[::2], reply[1::2], strict=True))
    if not fields:
        return None
    out: dict[str, Any] = {}
    for k, v in fields.items():
        name = k.decode() if isinstance(k, bytes) else k
        out[name] = v
    if "v" in out:
        out["value"] = ctx.decode(key, out["v"], out.get("n") in (b"1", "1"))
    return out


