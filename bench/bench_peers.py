"""cachesync beside its peers (cashews, aiocache, dogpile.cache, cachetools) on the same workloads, in one run.

    pip install -e '.[bench]'          # the peers: an optional extra, never a runtime dependency
    .venv/bin/python bench/bench_peers.py [--redis-url redis://127.0.0.1:6379/15] [--only hits|stampede|coherence]
                                          [--repeat 1] [--quick]

Workloads (each library with its documented defaults except the serializer, JSON everywhere it can be chosen;
every key under a unique prefix of this run, deleted at the end; never FLUSHDB):

* hit: one cached 60-byte JSON value read in a loop; sync against raw redis-py ``GET`` + ``json.loads``, async
  against ``redis.asyncio`` ``GET`` + ``json.loads``. Medians of interleaved rounds.
* batch hit: 100 cached keys read in one call, against raw ``MGET`` + ``json.loads`` per value.
* stampede (on a private redis-server: 1000 connections open at once, which the shared server under load refuses
  in time): 1000 requests for one missing key from 4 processes (asyncio tasks), loader sleeping 50 ms: loader
  calls, commands sent per request (counted in the clients: a script call is one) and the slowest request against
  the shared-future floor (same processes and tasks awaiting one ``asyncio.Future``, no Redis).
* L1 hit: cachesync's L1, cashews' client-side cache (``client_side=True``) and ``cachetools.TTLCache[key]``.
* L1 coherence: this process holds the value in its L1, another process writes a new value through the same
  library; after the write returned (signalled over a pipe) this process reads until it sees the new value:
  rounds with a stale read, stale reads in total and the longest time to the new value (capped at 200 ms).
The ratios are against the raw client measured in the same run; the machine's load is printed (other work on the
machine slows every line alike, which is why only the ratios are quoted).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Callable
from typing import Any

import cachetools
import redis
import redis.asyncio as aredis

import cachesync

from _util import env_line, pct, per_op, private_redis

VALUE = {"id": 1, "name": "Alice", "email": "alice@example.com", "plan": "pro"}
TAG = "peers" + uuid.uuid4().hex[:8]


def load() -> str:
    return "{:.2f} {:.2f} {:.2f}".format(*os.getloadavg())


def dogpile_region(url: str, prefix: str) -> Any:
    from dogpile.cache import make_region

    return make_region(key_mangler=lambda k: prefix + k).configure(
        "dogpile.cache.redis", arguments={"url": url, "redis_expiration_time": 300})


def aiocache_cache(url: str, ns: str) -> Any:
    from aiocache import RedisCache
    from aiocache.serializers import JsonSerializer

    u = redis.connection.parse_url(url)
    return RedisCache(endpoint=u.get("host", "127.0.0.1"), port=u.get("port", 6379), db=u.get("db", 0),
                      namespace=ns, serializer=JsonSerializer())


def cashews_cache(url: str, **kw: Any) -> Any:
    from cashews import Cache

    c = Cache()
    c.setup(url, **kw)
    return c


# ---------------------------------------------------------------------------------------------- hit, batch hit


def sync_hits(url: str, n: int, rounds: int) -> dict[str, float]:
    r = redis.Redis.from_url(url)
    raw_key = f"{TAG}:raw:1"
    r.set(raw_key, json.dumps(VALUE), ex=300)
    cs = cachesync.Cache(url, namespace=TAG + "s")
    cs.get("u:1", lambda: VALUE)
    region = dogpile_region(url, f"{TAG}:dp:")
    region.set("u:1", VALUE)
    keys = [f"u:{i}" for i in range(100)]
    raw_keys = [f"{TAG}:raw:{k}" for k in keys]
    r.mset({k: json.dumps(VALUE) for k in raw_keys})
    cs.get_many(keys, lambda ks: {k: VALUE for k in ks})
    region.set_multi({k: VALUE for k in keys})
    assert cs.get("u:1", lambda: None) == VALUE and region.get("u:1") == VALUE
    res = interleaved({
        "hit: raw redis-py GET+json": lambda: json.loads(r.get(raw_key)),
        "hit: cachesync Cache.get": lambda: cs.get("u:1", lambda: VALUE),
        "hit: dogpile region.get": lambda: region.get("u:1"),
    }, n, rounds)
    res.update(interleaved({
        "batch: raw MGET+json": lambda: [json.loads(v) for v in r.mget(raw_keys)],
        "batch: cachesync get_many": lambda: cs.get_many(keys, lambda ks: {k: VALUE for k in ks}),
        "batch: dogpile get_multi": lambda: region.get_multi(keys),
    }, max(1, n // 20), rounds))
    # L1 hit, sync
    l1 = cachesync.Cache(url, namespace=TAG + "l", l1=True)
    assert l1.l1 is not None and l1.l1.wait_ready(5)
    l1.get("u:1", lambda: VALUE)
    l1.get("u:1", lambda: VALUE)
    assert l1.get_entry("u:1", lambda: VALUE).source == "l1"
    ttl: cachetools.TTLCache[str, Any] = cachetools.TTLCache(maxsize=10_000, ttl=60)
    ttl["u:1"] = VALUE
    res.update(interleaved({
        "L1: cachetools TTLCache[key]": lambda: ttl["u:1"],
        "L1: cachesync Cache.get (l1=True)": lambda: l1.get("u:1", lambda: VALUE),
    }, n * 20, rounds))
    r.delete(raw_key, *raw_keys)
    for c in (cs, l1):
        c.redis.delete(*[c.ctx.ekey(k) for k in keys])
        c.close()
    r.delete(*[f"{TAG}:dp:{k}" for k in keys])
    r.close()
    return res


def interleaved(cases: dict[str, Callable[[], Any]], n: int, rounds: int) -> dict[str, float]:
    """Median seconds per call of each case; rounds interleaved, the order rotated each round."""
    samples: dict[str, list[float]] = {k: [] for k in cases}
    order = list(cases)
    for _ in range(rounds):
        order = order[1:] + order[:1]
        for k in order:
            samples[k].append(per_op(cases[k], n))
    return {k: statistics.median(v) for k, v in samples.items()}


async def _ainterleaved(cases: dict[str, Callable[[], Any]], n: int, rounds: int) -> dict[str, float]:
    samples: dict[str, list[float]] = {k: [] for k in cases}
    order = list(cases)
    for _ in range(rounds):
        order = order[1:] + order[:1]  # rotate: no case always runs first in a round
        for k in order:
            fn = cases[k]
            t0 = time.perf_counter()
            for _ in range(n):
                await fn()
            samples[k].append((time.perf_counter() - t0) / n)
    return {k: statistics.median(v) for k, v in samples.items()}


async def async_hits(url: str, n: int, rounds: int) -> dict[str, float]:
    r = aredis.Redis.from_url(url)
    raw_key = f"{TAG}:araw:1"
    await r.set(raw_key, json.dumps(VALUE), ex=300)
    keys = [f"u:{i}" for i in range(100)]
    raw_keys = [f"{TAG}:araw:{k}" for k in keys]
    await r.mset({k: json.dumps(VALUE) for k in raw_keys})
    cs = cachesync.AsyncCache(url, namespace=TAG + "a")
    await cs.get("u:1", lambda: VALUE)
    await cs.get_many(keys, lambda ks: {k: VALUE for k in ks})
    ca = cashews_cache(url)  # cashews' setup prefix selects a backend: the keys carry the run's prefix instead
    cw = f"{TAG}:cw:"
    cw_keys = [cw + k for k in keys]
    await ca.set(cw + "u:1", VALUE, expire=300)
    await ca.set_many({cw + k: VALUE for k in keys}, expire=300)
    ai = aiocache_cache(url, f"{TAG}:ai:")
    await ai.set("u:1", VALUE, ttl=300)
    await ai.multi_set([(k, VALUE) for k in keys], ttl=300)
    assert await ca.get(cw + "u:1") == VALUE and await ai.get("u:1") == VALUE

    async def raw() -> Any:
        return json.loads(await r.get(raw_key))

    async def raw_many() -> Any:
        return [json.loads(v) for v in await r.mget(raw_keys)]

    res = await _ainterleaved({
        "async hit: redis.asyncio GET+json": raw,
        "async hit: cachesync AsyncCache.get": lambda: cs.get("u:1", lambda: VALUE),
        "async hit: cashews cache.get": lambda: ca.get(cw + "u:1"),
        "async hit: aiocache RedisCache.get": lambda: ai.get("u:1"),
    }, n, rounds)
    res.update(await _ainterleaved({
        "async batch: MGET+json": raw_many,
        "async batch: cachesync get_many": lambda: cs.get_many(keys, lambda ks: {k: VALUE for k in ks}),
        "async batch: cashews get_many": lambda: ca.get_many(*cw_keys),
        "async batch: aiocache multi_get": lambda: ai.multi_get(keys),
    }, max(1, n // 20), rounds))
    # L1 hit, async
    l1 = cachesync.AsyncCache(url, namespace=TAG + "al", l1=True)
    await l1.get("u:1", lambda: VALUE)
    for _ in range(200):
        if (await l1.get_entry("u:1", lambda: VALUE)).source == "l1":
            break
        await asyncio.sleep(0.01)
    cw_l1 = cashews_cache(url, client_side=True)
    cwl = f"{TAG}:cwl:u:1"
    await cw_l1.set(cwl, VALUE, expire=300)
    await cw_l1.get(cwl)
    ttl: cachetools.TTLCache[str, Any] = cachetools.TTLCache(maxsize=10_000, ttl=60)
    ttl["u:1"] = VALUE

    async def ttl_get() -> Any:
        return ttl["u:1"]

    res.update(await _ainterleaved({
        "async L1: TTLCache[key] awaited": ttl_get,
        "async L1: cachesync AsyncCache.get (l1=True)": lambda: l1.get("u:1", lambda: VALUE),
        "async L1: cashews client_side get": lambda: cw_l1.get(cwl),
    }, n * 10, rounds))
    await r.delete(raw_key, *raw_keys, *cw_keys, cw + "u:1", *[f"{TAG}:ai:{k}" for k in keys], cwl)
    for c in (cs, l1):
        await c.redis.delete(*[c.ctx.ekey(k) for k in keys])
        await c.aclose()
    await ca.close()
    await cw_l1.close()
    await ai.close()
    await r.aclose()
    return res


# ---------------------------------------------------------------------------------------------- stampede


def _stampede_worker(kind: str, url: str, key: str, n: int, loader_ms: int, ready: Any, go: Any, out: Any,
                     tag: str) -> None:
    global TAG
    TAG = tag  # a spawned process imports this module afresh: use the parent's prefix

    async def main() -> None:
        calls = 0
        sent = 0

        async def loader() -> dict[str, Any]:
            nonlocal calls
            calls += 1
            await asyncio.sleep(loader_ms / 1000)
            return VALUE

        closer: Any = None

        async def warm(fn: Callable[[], Any]) -> None:  # n concurrent calls, ramped up (the server's accept
            # backlog is finite: 1000 connections at once time out on a loaded machine)
            for width in (10, 50, n):
                await asyncio.gather(*[fn() for _ in range(min(width, n))])
        if kind == "shared-future floor":
            shared = asyncio.get_running_loop().create_future()
            started = [False]

            async def one() -> float:
                if not started[0]:
                    started[0] = True
                    asyncio.get_running_loop().call_later(loader_ms / 1000, shared.set_result, None)
                await asyncio.shield(shared)
                return time.perf_counter()
        elif kind == "cachesync":
            c = cachesync.AsyncCache(url, namespace=TAG + "st")
            await warm(c.ping)  # connections open before the stampede, as in a long-running service
            await c.get(f"warm:{uuid.uuid4().hex}", lambda: 0)
            closer = c.aclose

            async def one() -> float:
                await c.get(key, loader)
                return time.perf_counter()
        elif kind == "cashews lock=True":
            from cashews import Cache

            cw = Cache()
            cw.setup(url)

            @cw(ttl=300, lock=True, key=f"{TAG}:st:{key}")
            async def cached() -> Any:
                return await loader()

            wk = f"{TAG}:warm:{uuid.uuid4().hex}"
            await warm(lambda: cw.get(wk))
            closer = cw.close

            async def one() -> float:
                await cached()
                return time.perf_counter()
        elif kind == "aiocache cached_stampede":
            from aiocache import cached_stampede
            from aiocache.serializers import JsonSerializer

            u = redis.connection.parse_url(url)
            dec = cached_stampede(lease=2, ttl=300, key=key, namespace=f"{TAG}:st", serializer=JsonSerializer(),
                                  cache=aiocache_cache(url, f"{TAG}:st").__class__, endpoint=u.get("host"),
                                  port=u.get("port"), db=u.get("db", 0),
                                  pool_max_size=10_000)  # its default (redis-py 8's pool of 100) raises
                                  # MaxConnectionsError with 250 concurrent requests per process

            @dec
            async def cached() -> Any:
                return await loader()

            closer = dec.cache.close
            wk = f"warm{uuid.uuid4().hex}"
            await warm(lambda: dec.cache.get(wk))

            async def one() -> float:
                await cached()
                return time.perf_counter()
        else:
            raise SystemExit(kind)
        # every library here speaks through redis.asyncio: count each command it sends (a pipeline's queued
        # commands one by one, a script call as one)
        inner = aredis.Redis.execute_command

        async def counting(self: Any, *args: Any, **kw: Any) -> Any:
            nonlocal sent
            sent += 1
            return await inner(self, *args, **kw)

        aredis.Redis.execute_command = counting  # type: ignore[method-assign]
        pinner = aredis.client.Pipeline.execute_command

        def pcounting(self: Any, *args: Any, **kw: Any) -> Any:
            nonlocal sent
            sent += 1
            return pinner(self, *args, **kw)

        aredis.client.Pipeline.execute_command = pcounting  # type: ignore[method-assign]
        ready.release()
        while not go.is_set():
            await asyncio.sleep(0.0005)
        t0 = time.perf_counter()
        ends = await asyncio.gather(*[one() for _ in range(n)])
        out.put((calls, [e - t0 for e in ends], sent))
        if closer is not None:
            await closer()

    asyncio.run(main())


def stampede(kind: str, url: str, requests: int, procs: int, loader_ms: int) -> dict[str, float]:
    ctx = mp.get_context("spawn")
    ready, go, out = ctx.Semaphore(0), ctx.Event(), ctx.Queue()
    key = f"stampede{uuid.uuid4().hex[:8]}"
    ps = [ctx.Process(target=_stampede_worker, args=(kind, url, key, requests // procs, loader_ms, ready, go, out, TAG))
          for _ in range(procs)]
    for p in ps:
        p.start()
    for _ in ps:
        if not ready.acquire(timeout=60):  # a worker died before it was ready (its traceback is above)
            for p in ps:
                p.kill()
            return {"failed": 1.0}
    go.set()
    results = []
    deadline = time.monotonic() + 120
    while len(results) < len(ps):
        try:
            results.append(out.get(timeout=0.5))
        except Exception:
            if time.monotonic() > deadline or any(p.exitcode not in (None, 0) for p in ps):
                for p in ps:
                    p.kill()
                return {"failed": 1.0}
    for p in ps:
        p.join()
    lat = [x for _, ls, _ in results for x in ls]
    return {"loader_calls": sum(c for c, _, _ in results), "per_request": sum(n for _, _, n in results) / len(lat),
            "p50_ms": pct(lat, 50) * 1000, "max_ms": max(lat) * 1000}


# ---------------------------------------------------------------------------------------------- L1 coherence

WRITER = textwrap.dedent("""
    import asyncio, sys
    kind, url, prefix = sys.argv[1], sys.argv[2], sys.argv[3]
    async def main():
        if kind == "cachesync":
            import cachesync
            c = cachesync.AsyncCache(url, namespace=prefix, l1=True)
            write = lambda v: c.set("u:1", v)
        else:
            from cashews import Cache
            c = Cache()
            c.setup(url, client_side=True)
            write = lambda v: c.set(prefix + ":u:1", v, expire=300)
        print("ready", flush=True)
        loop = asyncio.get_running_loop()
        while True:
            line = await loop.run_in_executor(None, sys.stdin.readline)
            if not line.strip():
                break
            await write(int(line))
            print("done", flush=True)
    asyncio.run(main())
""")


async def coherence(kind: str, url: str, rounds: int) -> dict[str, float]:
    prefix = f"{TAG}co{kind[:3]}"
    if kind == "cachesync":
        c = cachesync.AsyncCache(url, namespace=prefix, l1=True)

        async def read() -> Any:
            return await c.get("u:1", lambda: -1)

        async def write(v: int) -> Any:
            return await c.set("u:1", v)
    else:
        c = cashews_cache(url, client_side=True)

        async def read() -> Any:
            return await c.get(prefix + ":u:1")

        async def write(v: int) -> Any:
            return await c.set(prefix + ":u:1", v, expire=300)
    p = subprocess.Popen([sys.executable, "-c", WRITER, kind, url, prefix], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None and p.stdin is not None
    assert p.stdout.readline().strip() == "ready"
    loop = asyncio.get_running_loop()
    stale_rounds = stale_reads = 0
    worst = 0.0
    for i in range(rounds):
        v = 2 * i + 1
        await write(v)  # this process's own write, then two reads: the value now sits in this process's L1
        await read()
        await read()
        p.stdin.write(f"{v + 1}\n")
        p.stdin.flush()
        assert (await loop.run_in_executor(None, p.stdout.readline)).strip() == "done"
        t0 = time.perf_counter()
        seen = 0
        while await read() != v + 1:
            seen += 1
            if time.perf_counter() - t0 > 0.2:
                break
            await asyncio.sleep(0)
        worst = max(worst, time.perf_counter() - t0)
        stale_rounds += seen > 0
        stale_reads += seen
    p.stdin.write("\n")
    p.stdin.flush()
    p.wait(10)
    if kind == "cachesync":
        await c.redis.delete(c.ctx.ekey("u:1"))
        await c.aclose()
    else:
        await c.delete(prefix + ":u:1")
        await c.close()
    return {"rounds": rounds, "stale_rounds": stale_rounds, "stale_reads": stale_reads, "worst_ms": worst * 1000}


# ---------------------------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--redis-url", default=os.environ.get("CACHESYNC_TEST_REDIS_URL", "redis://127.0.0.1:6379/15"))
    ap.add_argument("--n", type=int, default=1000, help="calls per round on the hit paths (default 1000)")
    ap.add_argument("--rounds", type=int, default=9, help="interleaved rounds (default 9)")
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--processes", type=int, default=4)
    ap.add_argument("--loader-ms", type=int, default=50)
    ap.add_argument("--coherence-rounds", type=int, default=100)
    ap.add_argument("--stampede-redis-url", help="Redis for the stampede (default: a private redis-server)")
    ap.add_argument("--only", choices=["hits", "stampede", "coherence"], help="run one part (default: all)")
    ap.add_argument("--repeat", type=int, default=1, help="runs of the stampede and of the coherence check, each "
                    "printed (default 1)")
    ap.add_argument("--quick", action="store_true", help="smoke run (numbers meaningless)")
    a = ap.parse_args()
    if a.repeat < 1:
        raise SystemExit("--repeat must be >= 1")
    if a.quick:
        a.n, a.rounds, a.requests, a.coherence_rounds = 50, 2, 100, 5
    import aiocache
    import dogpile

    from importlib.metadata import version

    print(f"bench_peers: {env_line()}; cashews {version('cashews')}, aiocache {aiocache.__version__}, "
          f"dogpile.cache {dogpile.__version__}, cachetools {cachetools.__version__}")
    print(f"load before: {load()}; {a.rounds} interleaved rounds of {a.n} calls (batch: {max(1, a.n // 20)} calls of "
          f"100 keys; L1: {a.n * 20} sync / {a.n * 10} async calls) per line")
    if a.only in (None, "hits"):
        s = sync_hits(a.redis_url, a.n, a.rounds)
        r = asyncio.run(async_hits(a.redis_url, a.n, a.rounds))
        base = {"hit: ": "hit: raw redis-py GET+json", "batch: ": "batch: raw MGET+json",
                "L1: ": "L1: cachetools TTLCache[key]", "async hit: ": "async hit: redis.asyncio GET+json",
                "async batch: ": "async batch: MGET+json", "async L1: ": "async L1: TTLCache[key] awaited"}
        print(f"\n{'workload: library':<48} {'median':>10}  ratio to the raw line of its group")
        for k, v in {**s, **r}.items():
            b = next(base[p] for p in sorted(base, key=len, reverse=True) if k.startswith(p))
            unit = f"{v * 1e9:8.0f} ns" if "L1" in k else f"{v * 1e6:8.1f} µs"
            print(f"{k:<48} {unit}  x{v / ({**s, **r})[b]:.2f}")
    if a.only in (None, "stampede"):
        for _rep in range(a.repeat):
            print(f"\nstampede: {a.requests} requests for one missing key from {a.processes} processes, loader "
                  f"{a.loader_ms} ms (commands counted in the clients; a private redis-server unless --stampede-redis-url)")
            kinds = ("shared-future floor", "cachesync", "cashews lock=True", "aiocache cached_stampede")
            if a.stampede_redis_url:
                st = {k: stampede(k, a.stampede_redis_url, a.requests, a.processes, a.loader_ms) for k in kinds}
            else:  # 1000 connections opened at once: a private redis-server (maxclients 4000), not the shared one
                with private_redis() as purl:
                    st = {k: stampede(k, purl, a.requests, a.processes, a.loader_ms) for k in kinds}
            f = st["shared-future floor"]["max_ms"]
            print(f"{'':<26} {'loader calls':>12} {'cmd/request':>12} {'p50 ms':>8} {'max ms':>8}  max / floor")
            for k, x in st.items():
                if "failed" in x:
                    print(f"{k:<26} failed (a worker process raised; see its traceback above)")
                    continue
                print(f"{k:<26} {x['loader_calls']:>12.0f} {x['per_request']:>12.3f} {x['p50_ms']:>8.1f} {x['max_ms']:>8.1f}"
                      f"  x{x['max_ms'] / f:.2f}")
            print("  (dogpile.cache is sync only: not in the stampede of asyncio tasks)")
    if a.only in (None, "coherence"):
        for _rep in range(a.repeat):
            print(f"\nL1 coherence: another process writes through the same library; reads here until the new value "
                  f"({a.coherence_rounds} rounds, 200 ms cap)")
            for kind in ("cachesync", "cashews client_side"):
                c = asyncio.run(coherence(kind, a.redis_url, a.coherence_rounds))
                print(f"  {kind:<22}: rounds with a stale read after the write returned {c['stale_rounds']:.0f}/"
                      f"{c['rounds']:.0f}, stale reads {c['stale_reads']:.0f}, longest to the new value "
                      f"{c['worst_ms']:.1f} ms")
            print("  cachetools TTLCache: no invalidation at all, stale until its TTL")
    print(f"load after: {load()}")


if __name__ == "__main__":
    main()
