"""CDC benchmarks: commit -> key invalidated (p50/p99) beside a bare reader, and catch-up beside a raw floor.

    .venv/bin/python bench/bench_cdc.py [--source mysql|postgresql|both] [--commits 1000] [--rows 10000] [--quick]
        [--mysql-url mysql://root@127.0.0.1:3306/test] [--pg-url postgresql://root@127.0.0.1:5432/test]
        [--redis-url redis://127.0.0.1:6379/15]

Rows are realistic by default: a table ``(id, email, version)`` whose rule has two keys (``user:{id}``,
``user_by_email:{email}``) and the version column, written in single-row commits.

Latency: ``--commits`` single-row commits one at a time; t0 = just before the writer's ``commit()`` (the bare
reader often has the event before ``commit()`` returns, so spans from its return are printed but not divided),
t1 = the runner has applied the row to Redis. The floor is a genuinely bare reader in the same run on the same kind of
commits: psycopg2 ``LogicalReplicationConnection`` reading pgoutput and looking only at the Insert message's first
column, or mysql-replication's ``BinLogStreamReader`` for ``WriteRowsEvent`` only; no Redis, no checkpoint.
The two sides alternate in ``--segments`` segments (default 4; the runner is restarted from its checkpoint for
each, and its warm-up commits absorb the catch-up of the bare segment's rows), so that a burst of load on the
shared machine falls on both. Goal: p99 <= x1.3 of the bare reader.

Catch-up: the runner is stopped, ``--rows`` single-row commits are made, then it is started from its checkpoint and
timed from the first transaction received until every row is applied (connecting, the preflight check and the
start of the stream are outside the span, as they are for the floor, which is timed from its first row). Beside
it, the floor: the same replication stream read from the same position by a bare reader that decodes only what the
row needs (id, email, version), then the same Redis work sent raw with redis-py: one script call per 500 keys with
every key/version pair (bench_outbox.BATCH_LUA: what invalidate.lua does per key), pipelined, one round trip per
500 rows. ``--rounds`` backlogs (default 3) per shape, floor and ours in alternating order; medians and the range
of the per-round ratios are printed. Goal: >= 20,000 rows/s and >= x0.8 of the floor. The old shape (one key, no
version, 100 rows per transaction) is an extra line. Not run by the tests.
"""

from __future__ import annotations

import argparse
import os
import select
import statistics
import struct
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis

import cachesync
from cachesync.cdc import CdcRunner, FileCheckpoint, Transaction
from cachesync.db import connect
from cachesync.keys import channel
from cachesync.rules import Rules

from _util import env_line
from bench_outbox import BATCH_LUA

REAL = "versioned, 2 keys, 1 row/commit"
CHEAP = "cheap: 1 key, no version, 100 rows/commit"


def load() -> str:
    return "{:.2f} {:.2f} {:.2f}".format(*os.getloadavg())


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p / 100 * len(xs)))]


class TimedRunner(CdcRunner):
    """Records when each row was applied (every row of a batch of a few transactions -- the latency runs apply one
    at a time --, only the rows of the last transaction with changes of a larger one: the catch-up waits for the
    last row, and the bookkeeping is not the runner's work) and when the first transaction was received (the catch-up's start)."""

    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.applied: dict[int, float] = {}
        self.first: float | None = None
        self.cond = threading.Condition()

    def apply(self, txns: list[Transaction]) -> None:
        super().apply(txns)
        now = time.perf_counter()
        if not txns:
            return
        if self.first is None:
            self.first = txns[0].received
        with self.cond:
            # a larger batch: its last transaction with row changes (transactions of other tables on the shared
            # server come through as empty ones, and may follow the backlog's last row in its batch)
            for t in (txns if len(txns) <= 4 else next(([t] for t in reversed(txns) if t.changes), [])):
                for ch in t.changes:
                    if ch.new is not None:
                        self.applied[int(ch.new["id"])] = now
            self.cond.notify_all()


# ------------------------------------------------------------------------------------------------ bare readers


def _pg_insert_cols(payload: bytes) -> list[bytes | None] | None:
    """pgoutput v1 Insert message -> its text columns (None for NULL); None for any other message."""
    if not payload or payload[0] != 0x49:  # 'I'
        return None
    n = struct.unpack_from("!h", payload, 6)[0]  # 'I', relid (4), 'N', ncols (2)
    off, cols = 8, []
    for _ in range(n):
        kind = payload[off]
        off += 1
        if kind == 0x74:  # 't'
            ln = struct.unpack_from("!i", payload, off)[0]
            cols.append(payload[off + 4:off + 4 + ln])
            off += 4 + ln
        else:
            cols.append(None)
    return cols


class PgBare:
    """A slot + publication of its own, read with psycopg2 replication (no cachesync code)."""

    def __init__(self, url: str, table: str) -> None:
        import psycopg2

        self.url, self.name = url, "bare_" + uuid.uuid4().hex[:10]
        c = psycopg2.connect(url)
        c.autocommit = True
        with c.cursor() as cur:
            cur.execute(f"CREATE PUBLICATION {self.name} FOR TABLE {table}")
            cur.execute("SELECT lsn::text FROM pg_create_logical_replication_slot(%s, 'pgoutput')", (self.name,))
            self.start = cur.fetchone()[0]
        c.close()

    def read(self, on_cols: Callable[[list[bytes | None]], bool], stop: threading.Event, feedback: bool) -> None:
        """Call ``on_cols`` with each Insert's columns until it returns True or ``stop`` is set. Without
        ``feedback`` the slot is not advanced (the next read replays from the same position)."""
        import psycopg2
        from psycopg2.extras import LogicalReplicationConnection

        conn = psycopg2.connect(self.url, connection_factory=LogicalReplicationConnection)
        cur = conn.cursor()
        cur.start_replication(slot_name=self.name, decode=False, start_lsn=self.start,
                              options={"proto_version": "1", "publication_names": self.name})
        try:
            while not stop.is_set():
                msg = cur.read_message()
                if msg is None:
                    select.select([cur], [], [], 0.05)
                    continue
                cols = _pg_insert_cols(msg.payload)
                if cols is not None and on_cols(cols):
                    return
                if feedback:
                    cur.send_feedback(flush_lsn=msg.data_start)
        finally:
            conn.close()

    def drop(self) -> None:
        import psycopg2

        c = psycopg2.connect(self.url)
        c.autocommit = True
        with c.cursor() as cur:
            for _ in range(500):  # the walsender releases the slot asynchronously
                cur.execute("SELECT active FROM pg_replication_slots WHERE slot_name = %s", (self.name,))
                row = cur.fetchone()
                if row is None or not row[0]:
                    break
                time.sleep(0.01)
            cur.execute("SELECT pg_drop_replication_slot(%s)", (self.name,))
            cur.execute(f"DROP PUBLICATION {self.name}")
        c.close()


class MyBare:
    """mysql-replication BinLogStreamReader, WriteRowsEvent only, from the binlog position at construction."""

    def __init__(self, url: str, table: str) -> None:
        import pymysql

        u = redis.connection.parse_url(url.replace("mysql://", "redis://", 1))  # host/port/user/password
        self.settings = {"host": u.get("host", "127.0.0.1"), "port": int(u.get("port", 3306)),
                         "user": u.get("username") or "root", "passwd": u.get("password") or ""}
        self.table = table
        c = pymysql.connect(host=self.settings["host"], port=self.settings["port"], user=self.settings["user"],
                            password=self.settings["passwd"])
        with c.cursor() as cur:
            cur.execute("SHOW MASTER STATUS")
            row = cur.fetchone()
        c.close()
        self.file, self.pos = str(row[0]), int(row[1])
        self.reader: Any = None

    def read(self, on_cols: Callable[[list[Any]], bool], stop: threading.Event, feedback: bool) -> None:
        from pymysqlreplication import BinLogStreamReader
        from pymysqlreplication.row_event import WriteRowsEvent

        self.reader = BinLogStreamReader(
            connection_settings=self.settings, server_id=int.from_bytes(os.urandom(3), "big") + 500_000,
            blocking=True, resume_stream=True, log_file=self.file, log_pos=self.pos, only_events=[WriteRowsEvent],
            only_tables=[self.table])
        try:
            for ev in self.reader:
                for row in ev.rows:
                    v = row["values"]
                    if on_cols([v.get("id"), v.get("email"), v.get("version")]):
                        return
                if stop.is_set():
                    return
        except Exception:
            if not stop.is_set():
                raise
        finally:
            self.reader.close()

    def drop(self) -> None:
        pass


# ------------------------------------------------------------------------------------------------ the runs


def _drive(conn: Any, table: str, commits: int, base: int, seen: dict[int, float],
           cond: threading.Condition) -> tuple[list[float], list[float], list[float]]:
    """Single-row commits one at a time; per commit, ms: from just before commit() to the row being seen, from
    commit() returning to the row being seen, and the commit() itself."""
    cur = conn.cursor()
    lat, after, com = [], [], []
    for i in range(commits + 20):  # warm up: the first event also loads table metadata
        k = base + i
        cur.execute(f"INSERT INTO {table} (id, email, version) VALUES ({k}, 'u{k}@example.com', 1)")
        t0 = time.perf_counter()
        conn.commit()
        t1 = time.perf_counter()
        with cond:
            if not cond.wait_for(lambda k=k: k in seen, 10):
                raise SystemExit(f"event for row {k} not seen in 10 s")
        if i >= 20:
            lat.append((seen[k] - t0) * 1000)
            after.append((seen[k] - t1) * 1000)
            com.append((t1 - t0) * 1000)
    return lat, after, com


def bare_latency(bare: Any, conn: Any, table: str, commits: int, base: int
                 ) -> tuple[list[float], list[float], list[float]]:
    seen: dict[int, float] = {}
    cond = threading.Condition()
    stop = threading.Event()

    def on_cols(cols: list[Any]) -> bool:
        now = time.perf_counter()
        with cond:
            seen[int(cols[0])] = now
            cond.notify_all()
        return int(cols[0]) == base + commits + 19  # the last commit: the reader ends by itself

    th = threading.Thread(target=bare.read, args=(on_cols, stop, True), daemon=True)
    th.start()
    time.sleep(0.3)  # connected before the first commit (the slot / binlog position keeps events anyway)
    lat, after, com = _drive(conn, table, commits, base, seen, cond)
    stop.set()
    th.join(10)
    return lat, after, com


def floor_catchup(bare: Any, redis_url: str, ns: str, shape: str, last: int, tomb_ms: int, wake_ms: int) -> float:
    """Bare reader from the backlog's start + raw pipelined Redis work, until row ``last`` is applied: rows/s."""
    r = redis.Redis.from_url(redis_url)
    sha = r.script_load(BATCH_LUA)
    chan = channel(ns)
    pend_k: list[str] = []
    pend_v: list[str] = []
    rows = [0]
    stop = threading.Event()
    versioned = shape == REAL

    def flush() -> None:
        pipe = r.pipeline(transaction=False)
        for i in range(0, len(pend_k), 1000):
            pipe.execute_command("EVALSHA", sha, len(pend_k[i:i + 1000]), *pend_k[i:i + 1000], tomb_ms, wake_ms, chan,
                                 *pend_v[i // 2:i // 2 + 500])
        pipe.execute()
        pend_k.clear()
        pend_v.clear()

    first: list[float] = []

    def on_cols(cols: list[Any]) -> bool:
        if not first:
            first.append(time.monotonic())  # the timed span starts at the first row read, as ours does
        rid = int(cols[0])
        ver = ""
        if versioned:
            email = cols[1].decode() if isinstance(cols[1], bytes) else str(cols[1])
            ver = cols[2].decode() if isinstance(cols[2], bytes) else str(cols[2])
            for k in (f"user:{rid}", f"user_by_email:{email}"):
                ek = f"cs:{ns}:{{{k}}}"
                pend_k.extend((ek, ek + ":w"))
                pend_v.append(ver)
        else:
            ek = f"cs:{ns}:{{k:{rid}}}"
            pend_k.extend((ek, ek + ":w"))
            pend_v.append("")
        rows[0] += 1
        if len(pend_v) >= 1000 or rid == last:
            flush()
        return rid == last

    bare.read(on_cols, stop, False)
    dt = time.monotonic() - first[0]
    r.close()
    return rows[0] / dt


def bench(kind: str, db_url: str, redis_url: str, commits: int, rows: int, segments: int = 4,
          rounds: int = 3) -> dict[str, Any]:
    out: dict[str, Any] = {}
    tag = uuid.uuid4().hex[:8]
    ns = "benchcdc" + tag
    cache = cachesync.Cache(redis_url, namespace=ns)
    tomb_ms, wake_ms = cache.ctx.tomb_ms, cache.ctx.wake_ms
    conn = connect(db_url)
    cur = conn.cursor()
    tables = {REAL: "cdcb_" + tag, CHEAP: "cdcc_" + tag}
    for t in tables.values():
        cur.execute(f"CREATE TABLE {t} (id INT PRIMARY KEY, email VARCHAR(100), version INT)")
        if kind == "postgresql":
            cur.execute(f"ALTER TABLE {t} REPLICA IDENTITY FULL")
    conn.commit()
    rules = {REAL: Rules({tables[REAL]: {"keys": ["user:{id}", "user_by_email:{email}"], "version": "version"}}),
             CHEAP: Rules({tables[CHEAP]: ["k:{id}"]})}
    tmp = Path(tempfile.mkdtemp())
    slots: list[str] = []
    bares: list[Any] = []

    def source(shape: str) -> Any:
        t = tables[shape]
        if kind == "mysql":
            from cachesync.cdc.mysql import MySQLSource

            return MySQLSource(db_url, int.from_bytes(os.urandom(3), "big") + 400_000, [t])
        from cachesync.cdc.postgres import PostgresSource

        slot = "cb_" + t
        if slot not in slots:
            slots.append(slot)
        return PostgresSource(db_url, rules[shape], slot=slot, publication=slot)

    def mkbare(shape: str) -> Any:
        b = (MyBare if kind == "mysql" else PgBare)(db_url, tables[shape])
        bares.append(b)
        return b

    def start(shape: str, cp: FileCheckpoint) -> tuple[TimedRunner, threading.Thread]:
        runner = TimedRunner(source(shape), cache, rules[shape], cp, stats_interval=0)
        th = threading.Thread(target=runner.run, daemon=True)
        th.start()
        while runner.position is None:
            time.sleep(0.01)
        return runner, th

    lat_ids: list[int] = []
    cu_bases: list[int] = []
    try:
        # latency: bare reader, then the runner, on the same kind of commits, in alternating segments (a burst
        # of load from another process on the shared machine then falls on both sides alike)
        bare = mkbare(REAL)
        cp = FileCheckpoint(tmp / "cp.json")
        floor: list[float] = []
        floor_after: list[float] = []
        floor_com: list[float] = []
        lat: list[float] = []
        after: list[float] = []
        com: list[float] = []
        per = [commits // segments + (1 if i < commits % segments else 0) for i in range(segments)]
        for seg, n in enumerate(per):
            fb, fa, fc = bare_latency(bare, conn, tables[REAL], n, 10_000_000 + seg * 100_000)
            floor += fb
            floor_after += fa
            floor_com += fc
            runner, th = start(REAL, cp)  # catches up the bare segment's rows during its warm-up commits
            la, af, co = _drive(conn, tables[REAL], n, seg * 100_000, runner.applied, runner.cond)
            runner.stop()
            th.join(10)
            lat += la
            after += af
            com += co
            lat_ids += [b + seg * 100_000 + i for b in (0, 10_000_000) for i in range(n + 20)]
        out["latency"] = {"bare": floor, "ours": lat, "commit": com, "bare_after": floor_after, "after": after,
                          "bare_commit": floor_com,
                          "segments": segments}
        # catch-up, each shape, in ``rounds`` rounds: runner stopped, backlog committed, the runner restarted from
        # its checkpoint and the floor reading the same backlog from the same position, in alternating order
        # (either may find the WAL/binlog in the page cache the other warmed)
        for shape in (REAL, CHEAP):
            t = tables[shape]
            cps = cp if shape == REAL else FileCheckpoint(tmp / "cp2.json")
            if shape == CHEAP:  # a checkpoint before the backlog: run once until connected
                r0, th0 = start(shape, cps)
                cur.execute(f"INSERT INTO {t} (id, email, version) VALUES (1, 'x', 1)")
                conn.commit()
                with r0.cond:
                    r0.cond.wait_for(lambda r0=r0: 1 in r0.applied, 10)
                r0.stop()
                th0.join(10)
            ours_r: list[float] = []
            floor_r: list[float] = []
            for rnd in range(rounds):
                fb = mkbare(shape)
                base = 20_000_000 + rnd * 1_000_000
                cu_bases.append(base)
                per = 1 if shape == REAL else 100
                for s in range(0, rows, per):
                    cur.execute(f"INSERT INTO {t} (id, email, version) VALUES " +
                                ", ".join(f"({base + s + i}, 'u{base + s + i}@example.com', 2)" for i in range(per)))
                    conn.commit()
                last = base + rows - 1

                def ours(shape: str = shape, cps: FileCheckpoint = cps, last: int = last) -> float:
                    runner2 = TimedRunner(source(shape), cache, rules[shape], cps, stats_interval=0)
                    th = threading.Thread(target=runner2.run, daemon=True)
                    th.start()
                    with runner2.cond:
                        runner2.cond.wait_for(lambda r2=runner2, last=last: last in r2.applied, 300)
                    # from the first transaction received (Transaction.received, monotonic) to the last row
                    # applied: connecting, the preflight check and the slot/binlog start are outside the span, as
                    # they are for the floor
                    dt = time.monotonic() - (runner2.first or 0.0)
                    runner2.stop()
                    th.join(10)
                    return rows / dt

                if rnd % 2 == 0:
                    floor_r.append(floor_catchup(fb, redis_url, ns, shape, last, tomb_ms, wake_ms))
                    ours_r.append(ours())
                else:
                    ours_r.append(ours())
                    floor_r.append(floor_catchup(fb, redis_url, ns, shape, last, tomb_ms, wake_ms))
                fb.drop()  # one bare slot at a time (max_replication_slots)
                bares.remove(fb)
            out[shape] = {"ours": ours_r, "floor": floor_r}
    finally:
        for t in tables.values():
            cur.execute(f"DROP TABLE IF EXISTS {t}")
        conn.commit()
        conn.close()
        for b in bares:
            try:
                b.drop()
            except Exception as e:
                print(f"  (could not drop the bare reader's slot: {e})")
        if kind == "postgresql":
            from cachesync.cdc.postgres import PostgresSource

            for slot in slots:
                for _ in range(100):
                    try:
                        PostgresSource(db_url, rules[REAL], slot=slot, publication=slot).drop_slot(
                            drop_publication=True)
                        break
                    except Exception:
                        time.sleep(0.05)
        keys = [cache.ctx.ekey(k) for i in lat_ids + [1] + [b + j for b in cu_bases for j in range(rows)]
                for k in (f"user:{i}", f"user_by_email:u{i}@example.com", f"k:{i}")]
        for i in range(0, len(keys), 1000):
            cache.redis.delete(*keys[i:i + 1000])
        cache.close()
    return out


def report(kind: str, r: dict[str, Any], commits: int, rows: int) -> None:
    x = r["latency"]
    lat, bare, com = x["ours"], x["bare"], x["commit"]
    print(f"\n{kind}: commit -> key invalidated, {len(lat)} samples (cachesync cdc) / {len(bare)} (bare reader) in "
          f"{x['segments']} alternating segments, "
          f"single-row commits of versioned two-key rows, from just before commit() (commit() itself p50 "
          f"{pct(com, 50):.3f} / p99 {pct(com, 99):.3f} ms; the bare reader often has the event before commit() "
          "returns, so spans from commit() returning cannot be divided)")
    print(f"  bare reader   : p50 {pct(bare, 50):.3f} ms  p99 {pct(bare, 99):.3f} ms  (after commit() returned: p50 "
          f"{pct(x['bare_after'], 50):.3f} / p99 {pct(x['bare_after'], 99):.3f}; commit() itself in its segments p50 "
          f"{pct(x['bare_commit'], 50):.3f} / p99 {pct(x['bare_commit'], 99):.3f})")
    print(f"  cachesync cdc : p50 {pct(lat, 50):.3f} ms  p99 {pct(lat, 99):.3f} ms  (after commit() returned: p50 "
          f"{pct(x['after'], 50):.3f} / p99 {pct(x['after'], 99):.3f}); p50 "
          f"x{statistics.median(lat) / statistics.median(bare):.2f}, p99 x{pct(lat, 99) / pct(bare, 99):.2f} of the "
          f"bare reader (goal p99 <= x1.30); added over the bare reader p50 "
          f"{pct(lat, 50) - pct(bare, 50):+.3f} / p99 {pct(lat, 99) - pct(bare, 99):+.3f} ms")
    for shape in (REAL, CHEAP):
        os_, fs = r[shape]["ours"], r[shape]["floor"]
        xs = sorted(o / f for o, f in zip(os_, fs, strict=True))
        o, f = statistics.median(os_), statistics.median(fs)
        print(f"  catch-up, {rows} rows, {shape:40s}: cachesync cdc {o:7,.0f} rows/s | floor (bare "
              f"reader + raw pipelined Redis) {f:7,.0f} rows/s | x{statistics.median(xs):.2f} of the floor "
              f"[x{xs[0]:.2f}-x{xs[-1]:.2f}, {len(xs)} rounds; medians] (goal >= 20,000 rows/s and >= x0.80)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", choices=("mysql", "postgresql", "both"), default="both")
    ap.add_argument("--commits", type=int, default=1000)
    ap.add_argument("--rows", type=int, default=10000)
    ap.add_argument("--rounds", type=int, default=3,
                    help="catch-up: this many backlogs per shape, floor and cachesync cdc in alternating order")
    ap.add_argument("--segments", type=int, default=4,
                    help="latency: alternate bare reader and cachesync cdc in this many segments each")
    ap.add_argument("--quick", action="store_true", help="smoke run (numbers meaningless)")
    ap.add_argument("--mysql-url", default=os.environ.get("CACHESYNC_TEST_MYSQL_URL", "mysql://root@127.0.0.1:3306/test"))
    ap.add_argument("--pg-url", default=os.environ.get("CACHESYNC_TEST_PG_URL", "postgresql://root@127.0.0.1:5432/test"))
    ap.add_argument("--redis-url", default=os.environ.get("CACHESYNC_TEST_REDIS_URL", "redis://127.0.0.1:6379/15"))
    a = ap.parse_args()
    if a.quick:
        a.commits, a.rows, a.rounds = 50, 500, 1
    print(f"bench_cdc: {env_line()}; load before {load()}")
    for kind, url in (("mysql", a.mysql_url), ("postgresql", a.pg_url)):
        if a.source in (kind, "both"):
            report(kind, bench(kind, url, a.redis_url, a.commits, a.rows, max(1, a.segments), max(1, a.rounds)),
                   a.commits, a.rows)
    print(f"load after: {load()}")


if __name__ == "__main__":
    main()
