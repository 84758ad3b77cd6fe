"""The in-process L1: hit latency, cross-process invalidation propagation, a hot-key workload.

    .venv/bin/python bench/bench_l1.py [--redis-url URL] [--n 200000] [--rounds 7] [--invalidations 1000]

Without --redis-url a private redis-server is started (so command counts are ours alone).
Prints medians and ratios. Targets: L1 hit <= 2x cachetools.TTLCache hit; propagation p99 <= 2 ms.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import textwrap
import time
import timeit

import cachetools
import redis

import cachesync

from _util import private_redis


def per_op_ns(stmt, n: int, rounds: int) -> float:
    t = timeit.Timer(stmt)
    return statistics.median(t.timeit(n) / n * 1e9 for _ in range(rounds))


def hit_latency(url: str, n: int, rounds: int) -> None:
    key = "user:1"
    value = {"id": 1, "name": "Alice", "plan": "pro"}
    d = {key: value}
    ttl = cachetools.TTLCache(maxsize=10_000, ttl=60)
    ttl[key] = value
    c = cachesync.Cache(url, namespace="bench-l1-hit", l1=True)
    assert c.l1 is not None and c.l1.wait_ready(5)
    c.invalidate(key)
    c.get(key, lambda: value)
    c.get(key, lambda: value)  # now an L1 hit
    assert c.get_entry(key, lambda: value).source == "l1"
    loader = lambda: value  # noqa: E731
    res = {
        "dict[key]": per_op_ns(lambda: d[key], n, rounds),
        "TTLCache[key]": per_op_ns(lambda: ttl[key], n, rounds),
        "L1 core lookup": per_op_ns(lambda: c.l1.core.lookup(key), n, rounds),
        "Cache.get (L1 hit)": per_op_ns(lambda: c.get(key, loader), n, rounds),
    }
    plain = cachesync.Cache(url, namespace="bench-l1-hit")
    res["Cache.get (Redis hit, no L1)"] = per_op_ns(lambda: plain.get(key, loader), max(1, n // 100), rounds)
    base = res["TTLCache[key]"]
    print("\n## L1 hit latency (median ns/op; ratio to TTLCache[key])")
    for k, v in res.items():
        print(f"  {k:32s} {v:10.0f} ns   x{v / base:6.2f} TTLCache   x{v / res['dict[key]']:6.1f} dict")
    c.close()
    plain.close()


CHILD = textwrap.dedent("""
    import json, sys, time, cachesync
    url, ns = sys.argv[1], sys.argv[2]
    c = cachesync.Cache(url, namespace=ns, l1=True)
    assert c.l1.wait_ready(10)
    seen = {}
    def on_inv(keys):
        t = time.monotonic_ns()
        if keys:
            for k in keys:
                seen.setdefault(k, t)
    c.l1.core.add_listener(on_inv)
    print("ready", flush=True)
    sys.stdin.readline()
    print(json.dumps(seen), flush=True)
    c.close()
""")


def propagation(url: str, count: int) -> None:
    ns = "bench-l1-prop"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    child = subprocess.Popen([sys.executable, "-c", CHILD, url, ns], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             text=True, env=env)
    assert child.stdout and child.stdin
    assert child.stdout.readline().strip() == "ready"
    w = cachesync.Cache(url, namespace=ns)
    sent = {}
    for i in range(count):
        k = f"k{i}"
        sent[k] = time.monotonic_ns()  # CLOCK_MONOTONIC is system-wide: comparable across processes
        w.invalidate(k)
        time.sleep(0.001)
    time.sleep(0.2)
    child.stdin.write("dump\n")
    child.stdin.flush()
    seen = json.loads(child.stdout.readline())
    child.wait(10)
    child.stdin.close()
    child.stdout.close()
    w.close()
    lat = sorted((seen[k] - t0) / 1e6 for k, t0 in sent.items() if k in seen)
    lost = count - len(lat)
    p = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))]  # noqa: E731
    print(f"\n## Invalidation propagation to another process's L1 ({count} invalidations, writer call start -> "
          f"subscriber dropped the key)")
    print(f"  p50 {p(0.50):.3f} ms   p99 {p(0.99):.3f} ms   max {lat[-1]:.3f} ms   lost {lost}   "
          f"(target p99 <= 2 ms: x{p(0.99) / 2.0:.2f} of target)")


def hot_keys(url: str, reads: int) -> None:
    r = redis.Redis.from_url(url)
    print(f"\n## Hot-key workload: {reads} reads over 20 keys (80 % on 4 keys), one write per 500 reads")
    out = {}
    for l1 in (False, True):
        ns = f"bench-l1-hot-{int(l1)}"
        c = cachesync.Cache(url, namespace=ns, l1=l1)
        if c.l1 is not None:
            c.l1.wait_ready(5)
        loads = [0]

        def loader(k: str) -> dict[str, str]:
            loads[0] += 1
            return {"k": k}

        import random

        rng = random.Random(1)
        before = int(r.info("stats")["total_commands_processed"])
        t0 = time.perf_counter()
        for i in range(reads):
            k = f"cfg:{rng.randrange(4)}" if rng.random() < 0.8 else f"cfg:{rng.randrange(4, 20)}"
            c.get(k, lambda k=k: loader(k))
            if i % 500 == 499:
                c.invalidate(f"cfg:{rng.randrange(20)}")
        wall = time.perf_counter() - t0
        cmds = int(r.info("stats")["total_commands_processed"]) - before - 2  # minus the two INFOs
        out[l1] = (loads[0], cmds, wall)
        print(f"  L1 {'on ' if l1 else 'off'}: DB loads {loads[0]:5d}   Redis commands {cmds:6d}   wall {wall * 1e3:8.1f} ms")
        c.close()
    (l_off, c_off, w_off), (l_on, c_on, w_on) = out[False], out[True]
    print(f"  ratios L1 on / off: DB loads x{l_on / max(1, l_off):.2f}   Redis commands x{c_on / max(1, c_off):.3f}   "
          f"wall x{w_on / w_off:.3f}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--redis-url")
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--invalidations", type=int, default=1000)
    ap.add_argument("--reads", type=int, default=10_000)
    a = ap.parse_args()

    def run(url: str) -> None:
        hit_latency(url, a.n, a.rounds)
        propagation(url, a.invalidations)
        hot_keys(url, a.reads)

    if a.redis_url:
        run(a.redis_url)
    else:
        with private_redis() as url:
            run(url)


if __name__ == "__main__":
    main()
