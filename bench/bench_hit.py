"""Read path on a Redis hit: each goal of issue 15 as one ratio against its raw baseline, in one run.

    .venv/bin/python bench/bench_hit.py [--redis-url URL] [--n 2000] [--rounds 9] [--busy 0] [--only NAME]

Without --redis-url a private redis-server is started (no other clients). ``--busy N`` runs N CPU-burning
processes during the run (the machine "under load"); the load average is printed either way.

Each round alternates short stretches of ours and of the baseline (CHUNKS of each); the ratio is taken per round
and printed as median [min-max] over the rounds (lower is better). Goals:

  sync 1 thread   Cache.get hit            <= x1.10 of redis-py GET + json.loads
  sync 8 threads  one Cache, 8 threads     <= x1.15 of one redis-py client shared by 8 threads, GET + json.loads
  async seq       AsyncCache.get hit       <= x1.05 of redis.asyncio GET + json.loads
  async 100 tasks                          <= x1.05 of the same with 100 concurrent tasks
  get_many(100)   sync and async           <= x1.30 of MGET of 100 keys + json.loads of each value
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import statistics
import threading
import time
from collections.abc import Callable
from typing import Any

import redis
import redis.asyncio as aredis

import cachesync

from _util import env_line, private_redis

PAYLOAD = {"id": 12345, "name": "Alice Example", "email": "alice@example.com", "plan": "pro",
           "tags": ["a", "b", "c"], "score": 98.5}
NS = f"bench-hit-{os.getpid()}"
KEYS = [f"item:{i}" for i in range(100)]
dec = json.JSONDecoder()


def loads(b: bytes) -> object:
    return dec.decode(b.decode())


def _burn() -> None:  # pragma: no cover - a load generator
    while True:
        pass


def timed(fn: Callable[[], object], n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n


def threaded(fn: Callable[[str], object], n: int, threads: int) -> float:
    """Seconds per op of ``threads`` threads each calling ``fn(own key)`` ``n`` times (wall / total ops). Each
    thread reads its own key: concurrent reads of one key would share one Redis read (singleflight)."""
    barrier = threading.Barrier(threads + 1)

    def work(k: str) -> None:
        barrier.wait()
        for _ in range(n):
            fn(k)

    ts = [threading.Thread(target=work, args=(KEYS[i],)) for i in range(threads)]
    for t in ts:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in ts:
        t.join()
    return (time.perf_counter() - t0) / (n * threads)


class Goals:
    def __init__(self) -> None:
        self.rows: list[tuple[str, str, float | None, list[float], list[float], list[float]]] = []

    def add(self, name: str, base: str, goal: float | None, ours: list[float], raw: list[float]) -> None:
        ratios = [o / r for o, r in zip(ours, raw, strict=True)]
        self.rows.append((name, base, goal, ratios, ours, raw))
        self.print_row(self.rows[-1])

    @staticmethod
    def print_row(row: tuple[str, str, float | None, list[float], list[float], list[float]]) -> None:
        name, base, goal, ratios, ours, raw = row
        med = statistics.median(ratios)
        verdict = "extra line, no goal" if goal is None else f"goal <= x{goal:.2f}: {'met' if med <= goal else 'MISSED'}"
        print(f"  {name:<34} x{med:.3f} [x{min(ratios):.3f}-x{max(ratios):.3f}] of {base}   {verdict}   (ours {statistics.median(ours) * 1e6:.1f} µs, "
              f"base {statistics.median(raw) * 1e6:.1f} µs, {len(ratios)} rounds)", flush=True)

    def summary(self) -> None:
        print(f"\n## Summary (load average after the run: {os.getloadavg()[0]:.2f})")
        for row in self.rows:
            self.print_row(row)


CHUNKS = 10


def pair(ours: Callable[[int], float], base: Callable[[int], float], n: int,
         rounds: int) -> tuple[list[float], list[float]]:
    """Per round: ``CHUNKS`` short stretches of ours and of the baseline, alternating (so that a burst of load
    from other processes hits both alike); the round's figure for each is the mean over its stretches."""
    o: list[float] = []
    b: list[float] = []
    m = max(1, n // CHUNKS)
    for _ in range(rounds):
        so = sb = 0.0
        for c in range(CHUNKS):
            if c % 2:
                so += ours(m)
                sb += base(m)
            else:
                sb += base(m)
                so += ours(m)
        o.append(so / CHUNKS)
        b.append(sb / CHUNKS)
    return o, b


def run_sync(url: str, a: argparse.Namespace, goals: Goals) -> None:
    raw = redis.Redis.from_url(url)
    raw.mset({f"raw:{k}": json.dumps(PAYLOAD, separators=(",", ":")) for k in KEYS})
    cache = cachesync.Cache(url, namespace=NS)
    cache.get_many(KEYS, lambda ks: dict.fromkeys(ks, PAYLOAD))
    assert cache.get_entry("item:0", lambda: PAYLOAD).source == "cache"
    ld = lambda: PAYLOAD  # noqa: E731
    rk = [f"raw:{k}" for k in KEYS]

    def raw_get() -> object:
        return loads(raw.get("raw:item:0"))  # type: ignore[arg-type]

    def cs_get() -> object:
        return cache.get("item:0", ld)

    def raw_get_k(k: str) -> object:
        return loads(raw.get("raw:" + k))  # type: ignore[arg-type]

    def cs_get_k(k: str) -> object:
        return cache.get(k, ld)

    def raw_many() -> object:
        return {k: loads(v) for k, v in zip(KEYS, raw.mget(rk), strict=True)}

    def cs_many() -> object:
        return cache.get_many(KEYS, lambda ks: dict.fromkeys(ks, PAYLOAD))

    from cachesync.protocol import _interleave
    from cachesync.scripts import SCRIPTS

    il = _interleave([cache.ctx.ekey(k) for k in KEYS])
    sha = SCRIPTS["get"].sha

    def raw_evalsha_many() -> object:  # the floor of this layout: get.lua for 100 keys, sent raw, + json.loads
        rep = raw.execute_command("EVALSHA", sha, len(il), *il, "t", 5000, "L", 10000)
        return {k: loads(rep[4 * j + 1]) for j, k in enumerate(KEYS)}

    # Extra lines (no goal): what the kept connections bring and what is left of our own cost. ``old`` is the cache
    # with kept_connections=False (redis-py's execute_command: a pool checkout and check-in per command); ``held``
    # is the floor of the kept path: one connection held, send_command + read_response + json.loads, no cachesync.
    old = cachesync.Cache(url, namespace=NS, kept_connections=False)
    held_conn = raw.connection_pool.get_connection()

    def old_get() -> object:
        return old.get("item:0", ld)

    def held_get() -> object:
        held_conn.send_command("GET", "raw:item:0")
        return loads(held_conn.read_response())

    n = a.n
    print("\n## sync (redis-py)")
    if a.only in (None, "sync1"):
        goals.add("sync Cache.get hit, 1 thread", "GET+json.loads", 1.10,
                  *pair(lambda m: timed(cs_get, m), lambda m: timed(raw_get, m), n, a.rounds))
        goals.add("sync, kept_connections=False", "GET+json.loads", None,
                  *pair(lambda m: timed(old_get, m), lambda m: timed(raw_get, m), n, a.rounds))
        goals.add("sync Cache.get vs a held connection", "held conn GET+json.loads", None,
                  *pair(lambda m: timed(cs_get, m), lambda m: timed(held_get, m), n, a.rounds))
    if a.only in (None, "sync8"):
        goals.add("sync Cache.get hit, 8 threads", "GET+json.loads, 8 thr", 1.15,
                  *pair(lambda m: threaded(cs_get_k, m, 8), lambda m: threaded(raw_get_k, m, 8), n // 2, a.rounds))
    if a.only in (None, "many"):
        goals.add("sync get_many(100) hits", "MGET(100)+json.loads", 1.30,
                  *pair(lambda m: timed(cs_many, m), lambda m: timed(raw_many, m), n // 10, a.rounds))
        o, r = pair(lambda m: timed(cs_many, m), lambda m: timed(raw_evalsha_many, m), n // 10, a.rounds)
        rs = sorted(x / y for x, y in zip(o, r, strict=True))
        print(f"    (not a goal) sync get_many(100) x{statistics.median(rs):.3f} [x{rs[0]:.3f}-x{rs[-1]:.3f}] of the "
              f"script path: raw EVALSHA get.lua for the 100 keys + json.loads per value (what a batch cost before the MGET fast path)")
    if a.only == "pools":  # the pool choice, for the record (not a goal)
        for mc in (None, 16, 64):
            c = cachesync.Cache(url, namespace=NS, max_connections=mc)
            b = cachesync.Cache(url, namespace=NS)
            o, r = pair(lambda m, c=c: threaded(lambda k: c.get(k, ld), m, 8),  # type: ignore[misc]
                        lambda m, b=b: threaded(lambda k: b.get(k, ld), m, 8), n // 2, a.rounds)  # type: ignore[misc]
            ratios = sorted(x / y for x, y in zip(o, r, strict=True))
            print(f"  8 threads, max_connections={mc}: x{statistics.median(ratios):.3f} "
                  f"[x{ratios[0]:.3f}-x{ratios[-1]:.3f}] of the default pool")
            c.close()
            b.close()
    raw.connection_pool.release(held_conn)
    old.close()
    cache.close()
    raw.close()


async def run_async(url: str, a: argparse.Namespace, goals: Goals) -> None:
    # The baseline is redis.asyncio as a user gets it: redis-py 8 bounds each command by socket_timeout=5 s (a
    # timer per read). AsyncCache bounds its commands too (socket_timeout, one watchdog task). The extra lines
    # compare with a raw client that has no bound at all (socket_timeout=None: a hung Redis hangs it forever).
    raw = aredis.Redis.from_url(url)
    unbounded = aredis.Redis.from_url(url, socket_timeout=None)
    cache = cachesync.AsyncCache(url, namespace=NS)
    old = cachesync.AsyncCache(url, namespace=NS, kept_connections=False)  # an extra line: no kept connections
    await cache.get_many(KEYS, lambda ks: dict.fromkeys(ks, PAYLOAD))
    ld = lambda: PAYLOAD  # noqa: E731
    rk = [f"raw:{k}" for k in KEYS]
    n = a.n

    async def seq(which: str, count: int, k: str = "item:0") -> float:
        t0 = time.perf_counter()
        rk0 = "raw:" + k
        if which == "raw":
            for _ in range(count):
                loads(await raw.get(rk0))  # type: ignore[arg-type]
        elif which == "unbounded":
            for _ in range(count):
                loads(await unbounded.get(rk0))  # type: ignore[arg-type]
        elif which == "ours":
            for _ in range(count):
                await cache.get(k, ld)
        elif which == "old":
            for _ in range(count):
                await old.get(k, ld)
        elif which == "raw_many":
            for _ in range(count):
                {k: loads(v) for k, v in zip(KEYS, await raw.mget(rk), strict=True)}
        else:
            for _ in range(count):
                await cache.get_many(KEYS, lambda ks: dict.fromkeys(ks, PAYLOAD))
        return (time.perf_counter() - t0) / count

    async def conc(which: str, tasks: int, count: int) -> float:
        t0 = time.perf_counter()
        await asyncio.gather(*(seq(which, count, KEYS[i]) for i in range(tasks)))  # own key per task
        return (time.perf_counter() - t0) / (tasks * count)

    async def apair(ours: Callable[[int], Any], base: Callable[[int], Any], count: int) -> tuple[list[float], list[float]]:
        o: list[float] = []
        b: list[float] = []
        m = max(1, count // CHUNKS)
        for _ in range(a.rounds):
            so = sb = 0.0
            for c in range(CHUNKS):
                if c % 2:
                    so += await ours(m)
                    sb += await base(m)
                else:
                    sb += await base(m)
                    so += await ours(m)
            o.append(so / CHUNKS)
            b.append(sb / CHUNKS)
        return o, b

    await conc("raw", 100, 5)  # open the pools' connections
    await conc("unbounded", 100, 5)
    await conc("ours", 100, 5)
    print("\n## asyncio (redis.asyncio)")
    if a.only in (None, "async1"):
        goals.add("async AsyncCache.get hit, sequential", "GET+json.loads", 1.05,
                  *(await apair(lambda m: seq("ours", m), lambda m: seq("raw", m), n)))
        goals.add("async, kept_connections=False", "GET+json.loads", None,
                  *(await apair(lambda m: seq("old", m), lambda m: seq("raw", m), n)))
    if a.only in (None, "async100"):
        goals.add("async AsyncCache.get hit, 100 tasks", "GET+json.loads, 100 tasks", 1.05,
                  *(await apair(lambda m: conc("ours", 100, m), lambda m: conc("raw", 100, m), max(CHUNKS, n // 20))))
        goals.add("async 100 tasks, unbounded raw", "GET+json.loads, socket_timeout=None", None,
                  *(await apair(lambda m: conc("ours", 100, m), lambda m: conc("unbounded", 100, m),
                                max(CHUNKS, n // 20))))
    if a.only in (None, "many"):
        goals.add("async get_many(100) hits", "MGET(100)+json.loads", 1.30,
                  *(await apair(lambda m: seq("ours_many", m), lambda m: seq("raw_many", m), n // 10)))
    await cache.aclose()
    await old.aclose()
    await raw.aclose()
    await unbounded.aclose()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--redis-url")
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--busy", type=int, default=0, help="CPU-burning processes to run meanwhile")
    ap.add_argument("--only", choices=["sync1", "sync8", "many", "async1", "async100", "pools"])
    a = ap.parse_args()
    burners = [multiprocessing.Process(target=_burn, daemon=True) for _ in range(a.busy)]
    for p in burners:
        p.start()
    print(f"bench_hit: {env_line()}; busy processes {a.busy}; load average {os.getloadavg()[0]:.2f}")
    goals = Goals()

    def go(url: str) -> None:
        run_sync(url, a, goals)
        asyncio.run(run_async(url, a, goals))
        c = redis.Redis.from_url(url)
        for k in c.scan_iter(f"cs:{NS}:*", count=1000):
            c.delete(k)
        c.delete(*(f"raw:{k}" for k in KEYS))
        c.close()

    try:
        if a.redis_url:
            go(a.redis_url)
        else:
            with private_redis() as url:
                go(url)
        goals.summary()
    finally:
        for p in burners:
            p.terminate()


if __name__ == "__main__":
    main()
