"""``Context``: one cache's options, key layout, serialization, randomness and counters; reply parsing."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
import logging
from typing import Any

from ..errors import SerializationError
from ..errors import ValueTooLargeError
from .keys import channel, check_key, entry_key, group_by_slot, wake_key
from .options import CacheOptions, check_positive
from .effects import HIT, LEASED, WAIT
from .values import CorruptEntry, decode_version, encode_version, NOT_FOUND, Versioned

log = logging.getLogger("cachesync")
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
        self.traceparent: Callable[[], str | None] = lambda: None
        """The current span's W3C traceparent; the driver sets it when ``tracing=True`` (core imports no tracer)."""
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

    def decode_stored(self, key: str, payload: bytes, negative: bool, count: bool = True) -> Any:
        """Like :meth:`decode`, raising :class:`CorruptEntry` (which the read flows repair) instead; ``count``:
        count the failure in ``deserialize_errors`` (False when the read flow will judge the same payload again)."""
        if negative:
            return NOT_FOUND
        try:
            return self.ser.loads(payload)
        except Exception as e:
            if count:
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
    """``[ek1, wake_key(ek1), ek2, wake_key(ek2), ...]`` (built by slices: a batch of 500 keys at a time)."""
    ks: list[str] = [""] * (2 * len(ekeys))
    ks[0::2] = ekeys
    ks[1::2] = [wake_key(ek) for ek in ekeys]
    return ks


def _groups(ctx: Context, ekeys: list[str]) -> list[list[int]]:
    if ctx.cluster:
        return group_by_slot(ekeys)
    return [list(range(len(ekeys)))]
