"""Hit path: Cache.get on a hit vs raw redis-py GET of the same payload, same run, sync and async.

    .venv/bin/python bench/bench_hit.py [--redis-url URL] [--n 2000] [--rounds 15]

Without --redis-url a private redis-server is started (quiet machine, no other clients).
Prints medians and ratios (lower is better); target: Cache.get / raw GET <= 1.3.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time

import redis
import redis.asyncio as aredis

import cachesync

from _util import env_line, interleaved, private_redis

PAYLOAD = {"id": 12345, "name": "Alice Example", "email": "alice@example.com", "plan": "pro",
           "tags": ["a", "b", "c"], "score": 98.5}


def run_sync(url: str, n: int, rounds: int) -> dict[str, float]:
    raw = redis.Redis.from_url(url)
    raw.set("raw:user", json.dumps(PAYLOAD, separators=(",", ":")))
    cache = cachesync.Cache(url, namespace="bench")
    cache.get("user", lambda: PAYLOAD)
    bounded = cachesync.Cache(url, namespace="bench", max_connections=64)  # redis-py's BlockingConnectionPool
    blocking_raw = redis.Redis.from_pool(redis.BlockingConnectionPool.from_url(url, max_connections=64, timeout=5))
    dec = json.JSONDecoder()

    def raw_get() -> object:
        return raw.get("raw:user")

    def raw_get_json() -> object:
        return dec.decode(raw.get("raw:user").decode())  # type: ignore[union-attr]

    def cs_get() -> object:
        return cache.get("user", lambda: PAYLOAD)

    def raw_evalsha() -> object:
        return raw.execute_command("EVALSHA", cachesync.scripts.SCRIPTS["get"].sha, 2, "cs:bench:{user}",
                                   "cs:bench:{user}:w", "t", 5000, "L", 10000)

    def raw_hmget() -> object:
        return raw.execute_command("HMGET", "cs:bench:{user}", "v", "ver", "n", "s")

    out = interleaved({"raw GET": raw_get, "raw GET+json": raw_get_json, "raw HMGET (fast path)": raw_hmget,
                       "raw EVALSHA get.lua": raw_evalsha, "raw GET, blocking pool": lambda: blocking_raw.get("raw:user"),
                       "Cache.get": cs_get, "Cache.get, max_connections=64": lambda: bounded.get("user", lambda: PAYLOAD)},
                      n, rounds)
    bounded.close()
    blocking_raw.close()
    cache.close()
    raw.close()
    return out


async def run_async(url: str, n: int, rounds: int) -> dict[str, float]:
    raw = aredis.Redis.from_url(url)
    await raw.set("raw:user", json.dumps(PAYLOAD, separators=(",", ":")))
    cache = cachesync.AsyncCache(url, namespace="bench")
    await cache.get("user", lambda: PAYLOAD)
    dec = json.JSONDecoder()
    samples: dict[str, list[float]] = {"raw GET": [], "raw GET+json": [], "AsyncCache.get": []}

    async def loop(name: str) -> None:
        t0 = time.perf_counter()
        if name == "raw GET":
            for _ in range(n):
                await raw.get("raw:user")
        elif name == "raw GET+json":
            for _ in range(n):
                dec.decode((await raw.get("raw:user")).decode())
        else:
            for _ in range(n):
                await cache.get("user", lambda: PAYLOAD)
        samples[name].append((time.perf_counter() - t0) / n)

    for _ in range(rounds):
        for name in samples:
            await loop(name)
    await cache.aclose()
    await raw.aclose()
    return {k: statistics.median(v) for k, v in samples.items()}


def report(title: str, res: dict[str, float], base: str, ours: str) -> None:
    print(f"\n{title}")
    for k, v in res.items():
        print(f"  {k:<30} {v * 1e6:8.1f} µs   x{v / res[base]:.2f} of {base}")
    print(f"  => {ours} / {base} = x{res[ours] / res[base]:.2f}  (target <= 1.30)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--redis-url")
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=15)
    a = ap.parse_args()
    print("bench_hit:", env_line())

    def go(url: str) -> None:
        s = run_sync(url, a.n, a.rounds)
        report("sync (redis-py)", s, "raw GET", "Cache.get")
        print(f"  => Cache.get / raw GET+json = x{s['Cache.get'] / s['raw GET+json']:.2f}")
        r = asyncio.run(run_async(url, a.n, a.rounds))
        report("asyncio (redis.asyncio)", r, "raw GET", "AsyncCache.get")
        print(f"  => AsyncCache.get / raw GET+json = x{r['AsyncCache.get'] / r['raw GET+json']:.2f}")

    if a.redis_url:
        go(a.redis_url)
    else:
        with private_redis() as url:
            go(url)


if __name__ == "__main__":
    main()
