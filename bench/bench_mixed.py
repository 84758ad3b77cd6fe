"""Mixed workload (issue 15): 90 % reads / 10 % writes over 1000 zipf keys on PostgreSQL, 4 processes.

    .venv/bin/python bench/bench_mixed.py [--db-url URL] [--redis-url URL] [--seconds 10] [--rounds 2]
                                          [--workers 4] [--variants ABCD] [--quick]

Two variants and two extra lines, measured in the same run and alternating (A B C D A B C D ...), each phase
starting cold under its own Redis namespace / prefix (keys deleted at the end, never FLUSHDB):

  (A) cachesync: ``cache.get(f"row:{id}", loader)``, the loader SELECTs the row and returns
      ``Versioned(payload, v)``; a write is ``with cache.write(key) as w:`` (the default strategy
      ``db_then_invalidate``) around ``UPDATE ... SET v = v + 1 ... RETURNING v, payload`` and
      ``w.set_value(payload, version=v)``, so the invalidation after the block raises the version floor.
  (B) hand-written plain cache-aside with redis-py (unsafe): GET -> on a miss SELECT and SET key json EX 300;
      a write is UPDATE then DEL key.
  (C) an extra line, no goal: (A) with ``leases=False``: a miss is GET + SELECT + ``fill.lua`` without the
      lease round trip (safe in this workload only because every load and every write carries a version; the
      fill's floor check refuses an older row). It shows what the lease itself costs.
  (D) an extra line, no goal: (A) with ``strategy="db_then_set_versioned"`` (the write stores the row it
      returned, guarded by its version, instead of invalidating: the next read of the key is a hit, not a
      miss). A shipped, safe strategy, safe here because every write supplies the row's increasing version;
      not the default, which must be safe for writes without a version. ``--variants AB`` skips C and D.

Both run on autocommit connections (psycopg 3): the UPDATE is committed when ``execute`` returns, before the
cache step. Each worker process uses the same seeded operation sequence in both variants of one round (seeded
``random``, zipf s=1.1 from precomputed cumulative weights, 10 % writes) and runs for ``--seconds``.

Per round: throughput (operations/s summed over the processes), read latency p50/p99 (perf_counter per read,
hit or miss, all processes merged) and, after every worker has stopped, the number of inconsistent keys (A:
``cache.peek`` value/version of each key holding a value vs the row; B: GET vs the row). Ratios ours/baseline
per round, printed as median [min-max]. Goals: throughput >= x0.95, p99 read <= x1.10, 0 inconsistent keys.
"""

from __future__ import annotations

import argparse
import bisect
import json
import multiprocessing
import os
import random
import statistics
import time
import uuid
from array import array
from typing import Any

import psycopg
import redis

import cachesync

from _util import env_line, pct

KEYS = 1000
ZIPF_S = 1.1
WRITE_FRACTION = 0.10
TTL = 300
PAD = "x" * 60  # payload ~80 bytes
CUM: list[float] = []
acc = 0.0
for _r in range(1, KEYS + 1):
    acc += 1.0 / _r ** ZIPF_S
    CUM.append(acc)
TOTAL = acc


def pick(rng: random.Random) -> int:
    """A row id in 1..KEYS, id 1 the most popular (zipf s=1.1)."""
    return min(KEYS, bisect.bisect_left(CUM, rng.random() * TOTAL) + 1)


def worker(variant: str, db_url: str, redis_url: str, table: str, ns: str, seed: int, seconds: float,
           barrier: Any, out: Any) -> None:
    conn = psycopg.connect(db_url, autocommit=True)
    cur = conn.cursor()
    sel = f"SELECT payload, v FROM {table} WHERE id = %s"
    upd = (f"UPDATE {table} SET v = v + 1, payload = 'row ' || id || ' v' || (v + 1) || ' ' || %s "
           "WHERE id = %s RETURNING v, payload")
    rng = random.Random(seed)
    lat = array("d")
    reads = writes = 0
    if variant != "B":  # C: the same without leases (safe here only because every load and write has a version)
        cache = cachesync.Cache(redis_url, namespace=ns, leases=variant != "C",
                                strategy="db_then_set_versioned" if variant == "D" else "db_then_invalidate")

        def read(i: int) -> object:
            def load() -> cachesync.Versioned[str]:
                cur.execute(sel, (i,))
                p, v = cur.fetchone()  # type: ignore[misc]
                return cachesync.Versioned(p, v)
            return cache.get(f"row:{i}", load)

        def write(i: int) -> None:
            with cache.write(f"row:{i}") as w:
                cur.execute(upd, (PAD, i))
                v, p = cur.fetchone()  # type: ignore[misc]
                w.set_value(p, version=v)
        cache.ping()
    else:
        r = redis.Redis.from_url(redis_url)

        def read(i: int) -> object:
            k = f"{ns}:row:{i}"
            b = r.get(k)
            if b is not None:
                return json.loads(b)  # type: ignore[arg-type]
            cur.execute(sel, (i,))
            p, _v = cur.fetchone()  # type: ignore[misc]
            r.set(k, json.dumps(p), ex=TTL)
            return p

        def write(i: int) -> None:
            cur.execute(upd, (PAD, i))
            cur.fetchone()
            r.delete(f"{ns}:row:{i}")
        r.ping()
    barrier.wait()
    t0 = time.perf_counter()
    end = t0 + seconds
    now = t0
    pc = time.perf_counter
    while now < end:
        i = pick(rng)
        if rng.random() < WRITE_FRACTION:
            write(i)
            writes += 1
            now = pc()
        else:
            s = pc()
            read(i)
            now = pc()
            lat.append(now - s)
            reads += 1
    elapsed = now - t0
    if variant != "B":
        cache.close()
    else:
        r.close()
    conn.close()
    out.put((reads, writes, elapsed, lat.tobytes()))


def inconsistent(variant: str, redis_url: str, ns: str, rows: dict[int, tuple[str, int]]) -> tuple[int, int]:
    """(keys holding a value, of which differ from the row), read after every worker stopped."""
    cached = bad = 0
    if variant != "B":
        cache = cachesync.Cache(redis_url, namespace=ns, record_namespace=False)
        for i, (p, v) in rows.items():
            e = cache.peek(f"row:{i}")
            if e is None or "value" not in e or e.get("s") in (b"1", "1"):
                continue
            cached += 1
            ver = e.get("ver")
            if e["value"] != p or ver is None or int(ver) != v:
                bad += 1
        cache.close()
    else:
        r = redis.Redis.from_url(redis_url)
        vals = r.mget([f"{ns}:row:{i}" for i in rows])
        for (_i, (p, _v)), b in zip(rows.items(), vals, strict=True):
            if b is None:
                continue
            cached += 1
            if json.loads(b) != p:
                bad += 1
        r.close()
    return cached, bad


def cleanup(redis_url: str, variant: str, ns: str) -> int:
    r = redis.Redis.from_url(redis_url)
    pattern = f"{ns}:*" if variant == "B" else f"cs:{ns}:*"
    n = 0
    batch: list[bytes] = []
    for k in r.scan_iter(match=pattern, count=1000):
        batch.append(k)
        if len(batch) >= 500:
            n += r.delete(*batch)
            batch = []
    if batch:
        n += r.delete(*batch)
    r.close()
    return n


NAMES = {"A": "cachesync", "B": "plain cache-aside", "C": "cachesync leases=False",
         "D": "cachesync db_then_set_versioned"}


def phase(variant: str, a: argparse.Namespace, table: str, rnd: int, db: Any) -> dict[str, Any]:
    ns = f"bench-mixed-{uuid.uuid4().hex[:8]}-{variant}{rnd}"
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(a.workers)
    out = ctx.Queue()
    procs = [ctx.Process(target=worker, args=(variant, a.db_url, a.redis_url, table, ns, 1000 * rnd + w,
                                               a.seconds, barrier, out)) for w in range(a.workers)]
    for p in procs:
        p.start()
    res = [out.get(timeout=a.seconds + 120) for _ in procs]
    for p in procs:
        p.join(30)
        if p.exitcode != 0:
            raise SystemExit(f"worker {p.pid} of variant {variant} exited with {p.exitcode}")
    rows = {i: (p, v) for i, p, v in db.execute(f"SELECT id, payload, v FROM {table}").fetchall()}
    cached, bad = inconsistent(variant, a.redis_url, ns, rows)
    cleanup(a.redis_url, variant, ns)
    lat: list[float] = []
    for *_, b in res:
        x = array("d")
        x.frombytes(b)
        lat.extend(x)
    ops = sum((rd + wr) / el for rd, wr, el, _ in res)
    d = {"ops": ops, "p50": pct(lat, 50), "p99": pct(lat, 99), "reads": sum(r[0] for r in res),
         "writes": sum(r[1] for r in res), "cached": cached, "bad": bad}
    name = NAMES[variant]
    print(f"  round {rnd} {variant} {name:<18} {ops:>8.0f} ops/s   read p50 {d['p50'] * 1e6:7.0f} µs  "
          f"p99 {d['p99'] * 1e6:7.0f} µs   reads {d['reads']}, writes {d['writes']}   after quiescence: "
          f"{cached} keys cached, {bad} inconsistent   (load {os.getloadavg()[0]:.2f})", flush=True)
    return d


def ratio_line(name: str, base: str, goal: str, ours: list[float], raw: list[float], fmt: str, scale: float,
               unit: str) -> None:
    rs = [o / r for o, r in zip(ours, raw, strict=True)]
    med = statistics.median(rs)
    if goal:
        ok = med >= float(goal[2:]) if goal.startswith(">=") else med <= float(goal[2:])
        verdict = f"goal {goal[:2]} x{goal[2:]}: {'met' if ok else 'MISSED'}"
    else:
        verdict = "(not a goal)"
    print(f"  {name:<22} x{med:.3f} [x{min(rs):.3f}-x{max(rs):.3f}] of {base}   {verdict}   (ours {statistics.median(ours) * scale:{fmt}} {unit} "
          f"[{min(ours) * scale:{fmt}}-{max(ours) * scale:{fmt}}], base {statistics.median(raw) * scale:{fmt}} "
          f"{unit} [{min(raw) * scale:{fmt}}-{max(raw) * scale:{fmt}}], {len(rs)} rounds)", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--db-url", default="postgresql://root@127.0.0.1:5432/test")
    ap.add_argument("--redis-url", default="redis://127.0.0.1:6379/15")
    ap.add_argument("--seconds", type=float, default=10.0, help="duration of each phase (default 10)")
    ap.add_argument("--rounds", type=int, default=2, help="rounds of A then B (default 2)")
    ap.add_argument("--workers", type=int, default=4, help="worker processes (default 4)")
    ap.add_argument("--variants", default="ABCD", help="which phases to run each round (default ABCD; A and B are "
                    "needed for the goals)")
    ap.add_argument("--quick", action="store_true", help="a smoke run: 2 s, 1 round (numbers meaningless)")
    a = ap.parse_args()
    if not set(a.variants) <= set("ABCD") or not {"A", "B"} <= set(a.variants):
        raise SystemExit("--variants: letters of ABCD, with A and B")
    if a.quick:
        a.seconds, a.rounds = 2.0, 1
    if a.seconds <= 0 or a.rounds < 1 or a.workers < 1:
        raise SystemExit("--seconds must be > 0, --rounds and --workers >= 1")
    load0 = os.getloadavg()
    print(f"bench_mixed: {env_line()}; {a.workers} processes, {a.seconds:g} s per phase, {a.rounds} rounds ({' '.join(a.variants)}); "
          f"{KEYS} keys zipf s={ZIPF_S}, {WRITE_FRACTION:.0%} writes; load average before "
          f"{load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}", flush=True)
    table = f"bench_mixed_{uuid.uuid4().hex[:8]}"
    db = psycopg.connect(a.db_url, autocommit=True)
    db.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, v int NOT NULL, payload text NOT NULL)")
    try:
        with db.cursor() as c:
            c.executemany(f"INSERT INTO {table} VALUES (%s, 1, 'row ' || %s || ' v1 ' || %s)",
                          [(i, i, PAD) for i in range(1, KEYS + 1)])
        res: dict[str, list[dict[str, Any]]] = {v: [] for v in a.variants}
        for rnd in range(1, a.rounds + 1):
            for variant in a.variants:
                res[variant].append(phase(variant, a, table, rnd, db))
    finally:
        db.execute(f"DROP TABLE IF EXISTS {table}")
        db.close()
    A, B = res["A"], res["B"]
    load1 = os.getloadavg()
    print(f"\n## Summary (cachesync vs hand-written plain cache-aside, same run; load average before "
          f"{load0[0]:.2f}, after {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f})")
    ratio_line("throughput", "plain cache-aside", ">=0.95", [d["ops"] for d in A], [d["ops"] for d in B],
               ".0f", 1, "ops/s")
    ratio_line("read p99", "plain cache-aside", "<=1.10", [d["p99"] for d in A], [d["p99"] for d in B],
               ".0f", 1e6, "µs")
    ratio_line("read p50", "plain cache-aside", "", [d["p50"] for d in A],
               [d["p50"] for d in B], ".0f", 1e6, "µs")
    ba = [d["bad"] for d in A]
    bb = [d["bad"] for d in B]
    print(f"  {'inconsistent keys':<22} cachesync {ba} (of {[d['cached'] for d in A]} cached)   goal 0: "
          f"{'met' if not any(ba) else 'MISSED'}   plain cache-aside {bb} (of {[d['cached'] for d in B]} cached)")
    extra = {  # where the cost goes: the lease round trip (C); no miss after a write at all (D)
        "C": "cachesync leases=False (no lease on a miss: GET + SELECT + fill.lua; safe in this workload only because "
             "every load and every write carries a version)",
        "D": 'cachesync strategy="db_then_set_versioned" (the write stores the returned row guarded by its version; '
             "safe when every write supplies an increasing version)"}
    for v, what in extra.items():
        if v not in res:
            continue
        X = res[v]
        print(f"  extra line, no goal: {what}")
        ratio_line("  throughput", "plain cache-aside", "", [d["ops"] for d in X], [d["ops"] for d in B],
                   ".0f", 1, "ops/s")
        ratio_line("  read p99", "plain cache-aside", "", [d["p99"] for d in X], [d["p99"] for d in B],
                   ".0f", 1e6, "µs")
        print(f"    inconsistent keys: {[d['bad'] for d in X]} (of {[d['cached'] for d in X]} cached)")
    print("  samples: " + "; ".join(f"{v}: reads {[d['reads'] for d in res[v]]}, writes {[d['writes'] for d in res[v]]}"
                                    for v in a.variants))


if __name__ == "__main__":
    main()
