"""Auditor benchmark: entries audited per second, beside a bare loop doing the same reads (not run by the tests).

    .venv/bin/python bench/bench_audit.py [--db-url postgresql://root@127.0.0.1:5432/test]
        [--redis-url redis://127.0.0.1:6379/15] [--keys 2000] [--samples 30] [--quick]

``--keys`` rows are inserted and cached with their versions (cache-aside fills), then ``Auditor.run()`` (grace 0,
no finding) is timed beside the floor: the same SCAN, the same GET pipelines of 500 and one ``SELECT version
... WHERE id = ?`` per key, written by hand with no matching, judging or bookkeeping. Both run ``--samples`` times
(default 30), interleaved; the medians, the ratio's range over the pairs and the load are printed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import uuid

import cachesync
from cachesync.core.layout import decode_entry
from cachesync.audit import Auditor
from cachesync.db import connect, dialect_of
from cachesync.protocol import Versioned
from cachesync.rules import Rules


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--db-url", default=os.environ.get("CACHESYNC_TEST_PG_URL", "postgresql://root@127.0.0.1:5432/test"))
    ap.add_argument("--redis-url", default=os.environ.get("CACHESYNC_TEST_REDIS_URL", "redis://127.0.0.1:6379/15"))
    ap.add_argument("--keys", type=int, default=2000, help="rows and cached entries (default 2000)")
    ap.add_argument("--samples", type=int, default=30, help="timed runs of each side, interleaved (default 30)")
    ap.add_argument("--quick", action="store_true", help="smoke run (numbers meaningless)")
    a = ap.parse_args()
    if a.quick:
        a.keys, a.samples = 200, 3
    load0 = "{:.2f} {:.2f} {:.2f}".format(*os.getloadavg())
    table = "bench_aud_" + uuid.uuid4().hex[:8]
    ns = "benchaud" + uuid.uuid4().hex[:8]
    ph = dialect_of(a.db_url).placeholder
    conn = connect(a.db_url)
    cur = conn.cursor()
    cur.execute(f"CREATE TABLE {table} (id INTEGER PRIMARY KEY, version INTEGER)")
    cur.executemany(f"INSERT INTO {table} VALUES ({ph}, 1)", [(i,) for i in range(a.keys)])
    conn.commit()
    cache = cachesync.Cache(a.redis_url, namespace=ns)
    for i in range(a.keys):
        cache.get(f"u:{i}", lambda: Versioned(i, 1))
    auditor = Auditor(cache, a.db_url, Rules({table: {"keys": ["u:{id}"], "version": "version"}}), grace=0)

    def ours() -> float:
        t0 = time.perf_counter()
        r = auditor.run()
        assert r.consistent == a.keys and r.ok
        return time.perf_counter() - t0

    def floor() -> float:
        t0 = time.perf_counter()
        c = connect(a.db_url)
        k = c.cursor()
        eks = [x.decode() for x in cache.redis.scan_iter(match=f"cs:{ns}:{{*", count=1000)]  # entries only
        eks = [ek for ek in eks if not ek.endswith(":w")]
        n = 0
        for j in range(0, len(eks), 500):
            pipe = cache.redis.pipeline(transaction=False)
            for ek in eks[j:j + 500]:
                pipe.get(ek)
            for raw in pipe.execute():
                decode_entry(raw)
            for ek in eks[j:j + 500]:
                k.execute(f"SELECT version FROM {table} WHERE id = {ph}", (ek[len(ns) + 7:-1],))  # cs:ns:{u:<id>}
                n += k.fetchone() is not None
        c.commit()
        c.close()
        assert n == a.keys
        return time.perf_counter() - t0

    times: dict[str, list[float]] = {"auditor": [], "floor": []}
    try:
        ours()  # warm: the first run also connects and prepares
        floor()
        for i in range(a.samples):
            if i % 2:
                times["floor"].append(floor())
                times["auditor"].append(ours())
            else:
                times["auditor"].append(ours())
                times["floor"].append(floor())
        f, o = statistics.median(times["floor"]), statistics.median(times["auditor"])
        pairs = sorted(x / y for x, y in zip(times["auditor"], times["floor"], strict=True))
        q = len(pairs) // 4
        print(f"database: {a.db_url.split('://')[0]}, {a.keys} cached entries, {a.samples} samples per side; "
              f"load before {load0}, after " + "{:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))
        print(f"floor (same SCAN, GET pipelines, one SELECT per key): {f:.3f} s = {a.keys / f:,.0f} entries/s")
        print(f"Auditor.run():                                         {o:.3f} s = {a.keys / o:,.0f} entries/s "
              f"(x{o / f:.2f} of the floor; per-pair ratio quartiles x{pairs[q]:.2f}-x{pairs[-1 - q]:.2f}, "
              f"min x{pairs[0]:.2f}, max x{pairs[-1]:.2f})")
    finally:
        cur.execute(f"DROP TABLE {table}")
        conn.commit()
        conn.close()
        for j in range(0, a.keys, 1000):
            cache.redis.delete(*[cache.ctx.ekey(f"u:{i}") for i in range(j, min(a.keys, j + 1000))])
        cache.close()


if __name__ == "__main__":
    main()
