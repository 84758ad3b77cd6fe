"""Redis-side cost of the invalidation script (not run by the tests).

    .venv/bin/python bench/bench_lua.py [--redis-url URL] [--keys 1000] [--rounds 9] [--calls 50]

Times one ``EVALSHA`` of ``invalidate.lua`` (delete mode, one version per key) over ``--keys`` keys beside the
outbox/CDC benchmarks' raw floor script (``bench_outbox.BATCH_LUA``: the same per-key Redis work, no validation,
written for the benchmark) on the same keys, interleaved, as a ratio; once on keys that do not exist and once on
keys that hold tombstones (the state a backlog's second invalidation of a key meets). Without --redis-url a
private redis-server is started.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
import os
import statistics
import time
import uuid

import redis

from cachesync.core.scripts import SCRIPTS

from _util import env_line, private_redis
from bench_outbox import BATCH_LUA


def run(url: str, n: int, rounds: int, calls: int) -> None:
    r = redis.Redis.from_url(url)
    ns = f"bench-lua-{uuid.uuid4().hex[:8]}"
    ours, floor = r.script_load(SCRIPTS["invalidate"].source), r.script_load(BATCH_LUA)
    keys: list[str] = []
    for i in range(n):
        ek = f"cs:{ns}:{{k{i}}}"
        keys += [ek, ek + ":w"]
    vers = [str(100 + i) for i in range(n)]

    def a() -> None:
        r.evalsha(ours, len(keys), *keys, 30000, "d", 10000, "", "", *vers)

    def b() -> None:
        r.evalsha(floor, len(keys), *keys, 30000, 10000, "", *vers)

    def timed(f: Callable[[], None], absent: bool) -> float:
        """ms per call; ``absent``: each call on keys deleted just before (a backlog's first invalidation)."""
        total = 0.0
        for _ in range(calls):
            if absent:
                r.delete(*keys)
            t0 = time.perf_counter()
            f()
            total += time.perf_counter() - t0
        return total / calls * 1000

    try:
        for state, absent in (("absent keys", True), ("tombstoned keys", False)):
            o: list[float] = []
            fl: list[float] = []
            a()  # tombstones in place (and the scripts warm)
            for i in range(rounds):  # the order alternates each round
                if i % 2:
                    fl.append(timed(b, absent))
                    o.append(timed(a, absent))
                else:
                    o.append(timed(a, absent))
                    fl.append(timed(b, absent))
            ratios = sorted(x / y for x, y in zip(o, fl, strict=True))
            print(f"  {n} keys, {state:15}: invalidate.lua {statistics.median(o):.2f} ms | floor script "
                  f"{statistics.median(fl):.2f} ms | x{statistics.median(ratios):.2f} "
                  f"[x{ratios[0]:.2f}-x{ratios[-1]:.2f}] ({rounds} rounds of {calls} calls each)")
        print(f"  load average {os.getloadavg()[0]:.2f}")
    finally:
        r.delete(*keys)
        r.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--redis-url")
    ap.add_argument("--keys", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--calls", type=int, default=50)
    a = ap.parse_args()
    print("bench_lua:", env_line())
    if a.redis_url:
        run(a.redis_url, a.keys, a.rounds, a.calls)
    else:
        with private_redis() as url:
            run(url, a.keys, a.rounds, a.calls)


if __name__ == "__main__":
    main()
