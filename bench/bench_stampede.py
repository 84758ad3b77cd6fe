"""Stampede (cache breakdown): N concurrent requests for one missing key from P processes, loader sleeping 50 ms.

    .venv/bin/python bench/bench_stampede.py [--requests 1000] [--processes 4] [--loader-ms 50] [--redis-url URL]

Each process runs requests/processes asyncio tasks that all ask for the same missing key at once. Reported for
cachesync (AsyncCache) and for plain cache-aside (GET; on a miss load and SET) in the same run: loader calls in
total, Redis commands per request (sent by the clients; "in server" also counts the commands scripts run inside
Redis, from INFO commandstats of a private redis-server), and request latency (from each process's start) against
the loader time and against an "asyncio floor": the same processes and tasks awaiting one future, no Redis. Targets: 1 loader call, <= 3 commands per request, max <= loader + 10 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import time
import uuid

import redis.asyncio as aredis

import cachesync

from _util import command_count, env_line, pct, private_redis


def worker(kind: str, url: str, key: str, n: int, loader_ms: int, ready, go, out) -> None:  # type: ignore[no-untyped-def]
    async def main() -> None:
        calls = 0

        async def loader() -> dict[str, object]:
            nonlocal calls
            calls += 1
            await asyncio.sleep(loader_ms / 1000)
            return {"id": 1, "plan": "pro"}

        c: object = None

        if kind == "asyncio floor":
            # the same processes and tasks, no Redis: every task awaits one future resolved after the loader time
            shared = asyncio.get_running_loop().create_future()

            async def one() -> float:
                if not shared.done() and not getattr(one, "started", False):
                    one.started = True  # type: ignore[attr-defined]
                    asyncio.get_running_loop().call_later(loader_ms / 1000, shared.set_result, await_marker)
                await asyncio.shield(shared)
                return time.perf_counter()
            await_marker = None
            c = None
        elif kind == "cachesync":
            c = cachesync.AsyncCache(url, namespace="stampede")
            await asyncio.gather(*[c.ping() for _ in range(n)])
            # warm the code paths once (a long-running service has), on a key of its own
            warm = f"warmup:{uuid.uuid4().hex}"
            for _ in range(2):
                await c.get(warm, lambda: 0)
            await c.redis.execute_command("SCRIPT", "LOAD", cachesync.scripts.SCRIPTS["get"].source)

            async def one() -> float:
                await c.get(key, loader)
                return time.perf_counter()
        else:
            c = aredis.Redis.from_url(url, max_connections=10_000)
            await asyncio.gather(*[c.ping() for _ in range(n)])  # open n connections first, as the cache has
            warm = f"warmup:{uuid.uuid4().hex}"
            await c.get(warm)
            await c.set(warm, "0", ex=60)

            async def one() -> float:
                v = await c.get(key)
                if v is None:
                    val = await loader()
                    await c.set(key, repr(val), ex=300)
                return time.perf_counter()

        sent = 0
        if c is not None:
            client = c.redis if kind == "cachesync" else c
            inner = client.execute_command

            async def counting(*args: object, **kw: object) -> object:
                nonlocal sent
                sent += 1
                return await inner(*args, **kw)

            client.execute_command = counting
        ready.release()
        while not go.is_set():
            await asyncio.sleep(0.0005)
        t0 = time.perf_counter()
        ends = await asyncio.gather(*[one() for _ in range(n)])
        out.put((calls, [e - t0 for e in ends], sent))
        if c is not None:
            await c.aclose()

    asyncio.run(main())


def run(kind: str, url: str, requests: int, procs: int, loader_ms: int) -> dict[str, float]:
    ctx = mp.get_context("spawn")
    ready, go, out = ctx.Semaphore(0), ctx.Event(), ctx.Queue()
    key = f"stampede:{uuid.uuid4().hex[:8]}"
    ps = [ctx.Process(target=worker, args=(kind, url, key, requests // procs, loader_ms, ready, go, out))
          for _ in range(procs)]
    for p in ps:
        p.start()
    for _ in ps:
        ready.acquire()
    before = command_count(url)
    go.set()
    results = [out.get(timeout=60) for _ in ps]
    for p in ps:
        p.join()
    server_cmds = command_count(url) - before - 1  # the second INFO itself; includes commands run inside Lua
    lat = [x for _, ls, _ in results for x in ls]
    cmds = sum(n for _, _, n in results)
    if kind == "asyncio floor":
        server_cmds = 0
    return {"loader_calls": sum(c for c, _, _ in results), "commands": cmds, "per_request": cmds / len(lat),
            "server_commands": server_cmds,
            "p50_ms": pct(lat, 50) * 1000, "p99_ms": pct(lat, 99) * 1000, "max_ms": max(lat) * 1000}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--processes", type=int, default=4)
    ap.add_argument("--loader-ms", type=int, default=50)
    ap.add_argument("--redis-url")
    ap.add_argument("--repeat", type=int, default=5, help="runs of each case; the table shows the median run")
    a = ap.parse_args()
    print(f"bench_stampede: {env_line()}; {a.requests} requests from {a.processes} processes, "
          f"loader {a.loader_ms} ms")

    def go(url: str) -> None:
        runs: dict[str, list[dict[str, float]]] = {k: [] for k in ("asyncio floor", "plain cache-aside", "cachesync")}
        for _ in range(a.repeat):
            for k in runs:  # interleaved, so that machine noise hits every case alike
                runs[k].append(run(k, url, a.requests, a.processes, a.loader_ms))
        for k, rs in runs.items():
            print(f"max latency of each run, {k}: " + ", ".join(f"{r['max_ms']:.1f} ms" for r in rs))
        rows = {k: sorted(rs, key=lambda r: r["max_ms"])[len(rs) // 2] for k, rs in runs.items()}
        print(f"median run of {a.repeat}:")
        print(f"{'':<18} {'loader calls':>12} {'commands':>9} {'cmd/req':>8} {'in server':>9} {'p50 ms':>8} "
              f"{'p99 ms':>8} {'max ms':>8}")
        for k, r in rows.items():
            print(f"{k:<18} {r['loader_calls']:>12.0f} {r['commands']:>9.0f} {r['per_request']:>8.3f} "
                  f"{r['server_commands']:>9.0f} "
                  f"{r['p50_ms']:>8.1f} {r['p99_ms']:>8.1f} {r['max_ms']:>8.1f}")
        c, b, f = rows["cachesync"], rows["plain cache-aside"], rows["asyncio floor"]
        print(f"=> max latency over the asyncio floor (same processes and tasks, no Redis): "
              f"{c['max_ms'] - f['max_ms']:+.1f} ms (x{c['max_ms'] / f['max_ms']:.2f})")
        print(f"=> loader calls x{c['loader_calls'] / b['loader_calls']:.4f} of plain; commands "
              f"x{c['commands'] / b['commands']:.4f} of plain; max latency {c['max_ms']:.1f} ms vs loader "
              f"{a.loader_ms} ms + 10 ms budget: {'OK' if c['max_ms'] <= a.loader_ms + 10 else 'OVER'}")

    if a.redis_url:
        go(a.redis_url)
    else:
        with private_redis() as url:
            go(url)


if __name__ == "__main__":
    main()
