"""A Bloom filter in Redis that guards the database against ids that do not exist (cache penetration).

Beside negative caching (``negative_ttl``): a negative entry helps when the *same* missing id is asked for
again; a Bloom filter also stops a flood of *different* made-up ids, none of which would ever be cached,
before they reach the database (or even create negative entries). It never says "absent" for an id that was
added (no false negatives); it says "maybe" for a fraction ``fp_rate`` of absent ids (those go to the loader
as usual).

Sizing (Bloom 1970; e.g. Broder & Mitzenmacher 2004): for ``n`` expected items and false-positive rate ``p``,
``m = -n ln p / (ln 2)^2`` bits and ``k = (m / n) ln 2`` hash functions. The ``k`` bit offsets of an id come
from double hashing (Kirsch & Mitzenmacher 2006) of a BLAKE2b digest, computed in Python; the bits live in
one Redis string shared by every process, set and tested by ``bloom_add.lua`` / ``bloom_check.lua``.

The filter exists only once :meth:`BloomFilter.rebuild` has built it from the database (so it is never
partial); until then every id is "maybe". Writers call :meth:`BloomFilter.add` before committing a new row
(after the commit, a guarded read between the row's invalidation and the add caches a negative entry).
A rebuild builds a new bit string and swaps it in with ``RENAME``; every id added since the previous swap is
ORed into it (also kept in ``<filter>:adds``), so ids read from the table before the rebuild started, and rows
committed after that read, are all in the new filter.
:class:`BloomFilter` (sync) and :class:`AsyncBloomFilter` drive the same flows. Redis Cluster: all keys of one
filter share a hash tag.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Iterable
from typing import Any

from .. import core as P
from ..errors import ConfigError
from .. import _validate
from .options import check_positive

log = logging.getLogger("cachesync.bloom")


def bloom_size(expected_items: int, fp_rate: float) -> tuple[int, int]:
    """``(m bits, k hashes)`` for ``expected_items`` and false-positive rate ``fp_rate``."""
    _validate.positive("bloom.expected_items", expected_items, integer=True)
    _validate.between("bloom.fp_rate", fp_rate, 0, 1, low_open=True, high_open=True)
    m = max(8, math.ceil(-expected_items * math.log(fp_rate) / (math.log(2) ** 2)))
    k = max(1, round(m / expected_items * math.log(2)))
    return m, k


def _id_bytes(item: object) -> bytes:
    if isinstance(item, bytes):
        return item
    return str(item).encode("utf-8", "surrogatepass")


class BloomCore:
    """Sizing, key names and bit offsets of one filter (no I/O)."""

    def __init__(self, namespace: str, name: str, expected_items: int, fp_rate: float,
                 rebuild_timeout: float = 600.0) -> None:
        if not isinstance(name, str) or not name or "{" in name or "}" in name:
            raise ConfigError("bloom.name", f"must be a non-empty string without braces, got {name!r}")
        self.m, self.k = bloom_size(expected_items, fp_rate)
        self.rebuild_ms = int(check_positive("bloom.rebuild_timeout", rebuild_timeout) * 1000)
        base = f"cs:{namespace}:{{bloom:{name}}}"
        self.key = f"{base}:m{self.m}k{self.k}"  # a process sized differently uses a different filter
        self.marker = self.key + ":rebuilding"
        self.adds = self.key + ":adds"  # every id added since the last swap (kept by the next rebuild)

    def offsets(self, item: object) -> list[int]:
        d = hashlib.blake2b(_id_bytes(item), digest_size=16).digest()
        h1 = int.from_bytes(d[:8], "little")
        h2 = int.from_bytes(d[8:], "little") | 1
        m = self.m
        return [(h1 + i * h2) % m for i in range(self.k)]

    def bits(self, items: Iterable[object]) -> bytes:
        """The whole filter for ``items`` as Redis stores it (offset 0 = the high bit of the first byte)."""
        buf = bytearray((self.m + 7) // 8)
        n = 0
        for item in items:
            n += 1
            for o in self.offsets(item):
                buf[o >> 3] |= 0x80 >> (o & 7)
        self.last_rebuild_items = n
        return bytes(buf)


def add_flow(core: BloomCore, items: Iterable[object]) -> P.Flow[bool]:
    offs = [o for it in items for o in core.offsets(it)]
    if not offs:
        return False
    try:
        return bool(int((yield from P.script("bloom_add", [core.key, core.marker, core.adds], offs))))
    except P.RedisDown as e:
        raise e.cause from None


def check_flow(core: BloomCore, items: list[object]) -> P.Flow[list[bool]]:
    args: list[Any] = [core.k]
    for it in items:
        args += core.offsets(it)
    try:
        reply = yield from P.script("bloom_check", [core.key], args)
    except P.RedisDown:
        log.warning("cachesync bloom: Redis unreachable; treating ids as maybe present")
        return [True] * len(items)
    if not isinstance(reply, list):  # -1: no filter yet
        return [True] * len(items)
    return [bool(int(x)) for x in reply]


def rebuild_flow(core: BloomCore, items: Iterable[object]) -> P.Flow[bool]:
    token = P.new_token()
    building, scratch = f"{core.key}:b:{token}", f"{core.key}:s:{token}"
    keys = [core.key, building, core.marker, scratch, core.adds]
    try:
        yield from P.script("bloom_rebuild", keys, ["begin", core.rebuild_ms])
        bits = core.bits(items)
        ok = int((yield from P.script("bloom_rebuild", keys, ["swap", bits])))
    except P.RedisDown as e:
        raise e.cause from None
    if not ok:
        log.warning("cachesync bloom: rebuild of %s was superseded or took longer than rebuild_timeout", core.key)
    return bool(ok)
