"""CDC benchmarks: commit -> key invalidated (p50/p99) beside the raw event-receipt floor, and catch-up throughput.

    .venv/bin/python bench/bench_cdc.py [--source mysql|postgresql|both] [--commits 1000] [--rows 20000]
        [--mysql-url mysql://root@127.0.0.1:3306/test] [--pg-url postgresql://root@127.0.0.1:5432/test]
        [--redis-url redis://127.0.0.1:6379/15]

Latency: single-row commits one at a time; t0 = just before commit() is called, t1 = the runner has applied the
key to Redis (the checkpoint fsync runs in the background thread). The floor is a bare reader (mysql-replication / psycopg2 replication) that
only receives the event, measured in the same run on the same kind of commits; the ratio is what to quote.
Catch-up: the runner is stopped, ``--rows`` rows are committed (100 per transaction), then it is started from its
checkpoint and timed until every row event is applied. Not run by the tests.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import cachesync
from cachesync.cdc import CdcRunner, FileCheckpoint, Transaction
from cachesync.db import connect
from cachesync.rules import Rules


class TimedRunner(CdcRunner):
    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.applied: dict[str, float] = {}
        self.cond = threading.Condition()

    def apply(self, txns: list[Transaction]) -> None:
        super().apply(txns)
        now = time.perf_counter()
        with self.cond:
            for t in txns:
                for ch in t.changes:
                    if ch.new is not None:
                        self.applied[str(ch.new["id"])] = now
            self.cond.notify_all()


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p / 100 * len(xs)))]


def floor_mysql(url: str, table: str, commits: int, conn: Any) -> list[float]:
    from cachesync.cdc.mysql import MySQLSource

    src = MySQLSource(url, int.from_bytes(os.urandom(3), "big") + 300_000, [table])
    return _floor(src, table, commits, conn)


def floor_pg(url: str, table: str, commits: int, conn: Any, rules: Rules) -> list[float]:
    from cachesync.cdc.postgres import PostgresSource

    name = "bf_" + table
    src = PostgresSource(url, rules, slot=name, publication=name)
    src.check()
    try:
        return _floor(src, table, commits, conn)
    finally:
        for _ in range(500):  # the walsender releases the slot asynchronously
            try:
                src.drop_slot(drop_publication=True)
                break
            except Exception:
                time.sleep(0.01)


def _floor(src: Any, table: str, commits: int, conn: Any) -> list[float]:
    """Raw receipt: the source's own stream, no Redis, no checkpoint."""
    pos = src.current_position()
    got: dict[str, float] = {}
    cond = threading.Condition()

    def read() -> None:
        for t in src.stream(pos):
            now = time.perf_counter()
            with cond:
                for ch in t.changes:
                    got[str(ch.new["id"])] = now
                cond.notify_all()

    th = threading.Thread(target=read, daemon=True)
    th.start()
    lat = _drive(conn, table, commits, 10_000_000, got, cond)
    src.close()
    th.join(10)
    return lat


def _drive(conn: Any, table: str, commits: int, base: int, seen: dict[str, float],
           cond: threading.Condition) -> list[float]:
    cur = conn.cursor()
    lat = []
    # warm up: the first event also loads table metadata
    for i in range(commits + 20):
        k = str(base + i)
        cur.execute(f"INSERT INTO {table} (id, v) VALUES ({k}, 1)")
        t0 = time.perf_counter()
        conn.commit()
        with cond:
            if not cond.wait_for(lambda k=k: k in seen, 10):
                raise SystemExit(f"event for row {k} not seen in 10 s")
        if i >= 20:
            lat.append((seen[k] - t0) * 1000)
    return lat


def bench(kind: str, db_url: str, redis_url: str, commits: int, rows: int) -> None:
    table = "cdcb_" + uuid.uuid4().hex[:8]
    ns = "bench" + uuid.uuid4().hex[:8]
    rules = Rules({table: ["k:{id}"]})
    conn = connect(db_url)
    cur = conn.cursor()
    cur.execute(f"CREATE TABLE {table} (id INT PRIMARY KEY, v INT)")
    conn.commit()
    cache = cachesync.Cache(redis_url, namespace=ns)
    tmp = Path(tempfile.mkdtemp())
    slot = "cb_" + table
    try:
        if kind == "mysql":
            floor = floor_mysql(db_url, table, commits, conn)

            def mk() -> Any:
                from cachesync.cdc.mysql import MySQLSource

                return MySQLSource(db_url, int.from_bytes(os.urandom(3), "big") + 400_000, [table])
        else:
            floor = floor_pg(db_url, table, commits, conn, rules)

            def mk() -> Any:
                from cachesync.cdc.postgres import PostgresSource

                return PostgresSource(db_url, rules, slot=slot, publication=slot)
        cp = FileCheckpoint(tmp / "cp.json")
        runner = TimedRunner(mk(), cache, rules, cp, stats_interval=0)
        th = threading.Thread(target=runner.run, daemon=True)
        th.start()
        while runner.position is None:
            time.sleep(0.01)
        lat = _drive(conn, table, commits, 0, runner.applied, runner.cond)
        runner.stop()
        th.join(10)
        print(f"\n{kind}: commit -> key invalidated, {commits} single-row commits")
        print(f"  raw event receipt (floor): p50 {pct(floor, 50):.3f} ms  p99 {pct(floor, 99):.3f} ms")
        print(f"  cachesync cdc            : p50 {pct(lat, 50):.3f} ms  p99 {pct(lat, 99):.3f} ms  "
              f"(ratio p50 x{statistics.median(lat) / statistics.median(floor):.2f}, "
              f"p99 x{pct(lat, 99) / pct(floor, 99):.2f}; target p99 <= 5 ms)")
        # catch-up
        base = 20_000_000
        for s in range(0, rows, 100):
            cur.execute(f"INSERT INTO {table} (id, v) VALUES " +
                        ", ".join(f"({base + s + i}, 2)" for i in range(100)))
            conn.commit()
        runner2 = TimedRunner(mk(), cache, rules, cp, stats_interval=0)
        last = str(base + rows - 1)
        t0 = time.perf_counter()
        th = threading.Thread(target=runner2.run, daemon=True)
        th.start()
        with runner2.cond:
            runner2.cond.wait_for(lambda: last in runner2.applied, 120)
        dt = time.perf_counter() - t0
        runner2.stop()
        th.join(10)
        print(f"  catch-up: {rows} row events in {dt:.2f} s = {rows / dt:,.0f} row events/s "
              f"(incl. connect; target {'5,000' if kind == 'mysql' else '15,000'}/s)")
    finally:
        cur.execute(f"DROP TABLE IF EXISTS {table}")
        conn.commit()
        conn.close()
        if kind == "postgresql":
            from cachesync.cdc.postgres import PostgresSource

            PostgresSource(db_url, rules, slot=slot, publication=slot).drop_slot(drop_publication=True)
        cache.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", choices=("mysql", "postgresql", "both"), default="both")
    ap.add_argument("--commits", type=int, default=1000)
    ap.add_argument("--rows", type=int, default=20000)
    ap.add_argument("--mysql-url", default=os.environ.get("CACHESYNC_TEST_MYSQL_URL", "mysql://root@127.0.0.1:3306/test"))
    ap.add_argument("--pg-url", default=os.environ.get("CACHESYNC_TEST_PG_URL", "postgresql://root@127.0.0.1:5432/test"))
    ap.add_argument("--redis-url", default=os.environ.get("CACHESYNC_TEST_REDIS_URL", "redis://127.0.0.1:6379/15"))
    a = ap.parse_args()
    if a.source in ("mysql", "both"):
        bench("mysql", a.mysql_url, a.redis_url, a.commits, a.rows)
    if a.source in ("postgresql", "both"):
        bench("postgresql", a.pg_url, a.redis_url, a.commits, a.rows)


if __name__ == "__main__":
    main()
