"""Apply many invalidations to Redis in one pipelined round trip (shared by the relay and the workers)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .. import protocol as P
from ..errors import InvalidationError, UsageError
from ..keys import entry_key, user_key
from ..scripts import SCRIPTS
from ..sync import Cache
from ..tracing import current_traceparent

CHUNK = 500
"""Keys per invalidate.lua call inside the pipeline."""


def _group(items: Iterable[tuple[Sequence[str], Any]]) -> dict[str, list[str]]:
    """Encoded version -> unique keys ("" = no version). Keys with the same version share one script call."""
    out: dict[str, dict[str, None]] = {}
    for keys, version in items:
        d = out.setdefault(P.encode_version(version), {})
        for k in keys:
            d[k] = None
    return {v: list(ks) for v, ks in out.items()}


def apply_invalidations(cache: Cache, items: Iterable[tuple[Sequence[str], Any]]) -> int:
    """Invalidate every ``(keys, version)`` pair of ``items`` exactly as :meth:`Cache.invalidate` does.

    On a single Redis all calls go in one pipeline (``invalidate.lua`` once per version and 500 keys); on a
    cluster each group goes through :meth:`Cache.invalidate`. Idempotent. Returns how many keys held a value.
    Raises :class:`InvalidationError` naming the keys when Redis cannot be reached (nothing is acknowledged;
    some keys may already be invalidated, which is harmless).
    """
    groups = _group(items)
    allkeys = [k for ks in groups.values() for k in ks]
    if not allkeys:
        return 0
    ctx = cache.ctx
    if ctx.cluster:
        return sum(cache.invalidate(*ks, version=(v or None)) for v, ks in groups.items())
    eks = {k: ctx.ekey(k) for k in allkeys}
    mode = "s" if ctx.o.serve_stale else "d"
    script = SCRIPTS["invalidate"]
    calls = []
    tp = (current_traceparent() or "") if ctx.channel else ""  # the current span (a relay delivery), to the L1s
    for ver, ks in groups.items():
        for i in range(0, len(ks), CHUNK):
            chunk = P._interleave([eks[k] for k in ks[i:i + CHUNK]])
            calls.append((chunk, [ctx.tomb_ms, ver, mode, ctx.wake_ms, ctx.channel, *([tp] if tp else [])]))
    try:
        for _ in range(2):
            pipe = cache.redis.pipeline(transaction=False)
            for keys, args in calls:
                pipe.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)
            res = pipe.execute(raise_on_error=False)
            if any(isinstance(r, NoScriptError) for r in res):
                cache.redis.execute_command("SCRIPT", "LOAD", script.source)
                continue
            for r in res:
                if isinstance(r, Exception):
                    raise r
            ctx.stats["invalidations"] += len(allkeys)
            return sum(int(r) for r in res)
        raise InvalidationError(allkeys, RuntimeError("invalidate.lua could not be loaded"))
    except (RedisConnectionError, RedisTimeoutError) as e:
        ctx.stats["redis_errors"] += 1
        ctx.stats["invalidations_failed"] += len(allkeys)
        raise InvalidationError(allkeys, e) from e


def iter_prefix_keys(cache: Cache, prefixes: Sequence[str]) -> Iterator[str]:
    """Every key of ``cache``'s namespace that starts with one of ``prefixes``, each once (SCAN of the entry
    hashes; ``""`` matches every key). Raises :class:`InvalidationError` when Redis cannot be reached."""
    ns = cache.ctx.ns
    if isinstance(prefixes, str):
        raise UsageError(f"prefixes must be a list of key prefixes, not the string {prefixes!r}")
    ens = _glob_escape(ns)
    pats: set[str] = set()
    for p in dict.fromkeys(prefixes):
        esc = _glob_escape(p)
        if "{" not in p and "}" not in p:
            pats.add(f"cs:{ens}:{{{esc}*")  # plain keys (no brace), including those that start with '#'
        pats.add(f"cs:{ens}:{{#{'?' * 16}}}{esc}*")  # keys with a brace: digest hash tag, then the key
    seen: set[str] = set()
    try:
        for pat in sorted(pats):
            for raw in cache.redis.scan_iter(match=pat, count=1000):
                try:
                    rk = raw.decode() if isinstance(raw, bytes) else str(raw)
                except UnicodeDecodeError:  # not a cachesync key (those are UTF-8)
                    continue
                k = user_key(ns, rk)
                if entry_key(ns, k) == rk and k not in seen and any(k.startswith(p) for p in prefixes):
                    seen.add(k)  # not a wake list; SCAN may return a key twice
                    yield k
    except (RedisConnectionError, RedisTimeoutError) as e:
        raise InvalidationError([f"{p}*" for p in prefixes], e) from e


def _glob_escape(s: str) -> str:
    """``s`` as a literal in a Redis SCAN MATCH pattern (``* ? [ ] \\`` escaped)."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in s)


def prefix_keys(cache: Cache, prefixes: Sequence[str]) -> list[str]:
    """:func:`iter_prefix_keys` as a list."""
    return list(iter_prefix_keys(cache, prefixes))
