"""Outbox benchmarks (not run by the tests).

    .venv/bin/python bench/bench_outbox.py [--db-url postgresql://root@127.0.0.1:5432/test]
        [--redis-url redis://127.0.0.1:6379/15] [--n 500] [--rows 50000] [--commits 1000]

1. commit -> key invalidated in Redis, p50/p99, through the relay woken by LISTEN/NOTIFY, through the relay
   polling every 10 ms, and through relay -> Redis Streams -> worker. The relay and the worker run as
   subprocesses; arrival is observed on the namespace's invalidation channel (pub/sub).
2. relay throughput (invalidations/s) draining a backlog with batches of 500.
Commits are spaced by a random 0-20 ms think time.
3. the cost the outbox insert adds to the writer's transaction, for two transaction shapes (printed): a single
   UPDATE + COMMIT, and SELECT FOR UPDATE + UPDATE + INSERT + COMMIT; baseline, + ``Outbox.record()`` before
   ``commit()``, and ``Outbox.commit()`` (INSERT + COMMIT in one round trip on psycopg 3 / PyMySQL with
   multi-statements; ``--mysql-multi-statements`` opens the MySQL connection with that flag), interleaved on one
   connection, printed as ratios; on PostgreSQL also ``record()`` into a table
   with the old empty-payload NOTIFY trigger, ``pg_logical_emit_message`` instead of a row then ``commit()``, and
   ``Outbox.emit_commit()`` (``SELECT pg_logical_emit_message(...); COMMIT`` in one round trip).
5. PostgreSQL: commit -> key invalidated p50/p99 for ``Outbox.emit_commit()`` WAL messages read by ``cachesync cdc``
   (subprocess; same think time and pub/sub observation as 1.).
4. PostgreSQL: 1 and 2 relays listening while a writer commits 10 rows per transaction, fast path on and off:
   rows/s, Redis applies per row (duplicate work of several relays) and the relays' CPU per 1000 rows.
The latency runs print the fast path (``notify``) beside the claim-only path (``notify-claim``, the relay with
``--no-fast-path``) in the same run.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
import os
import random
import statistics
import subprocess
import sys
import threading
import time
import uuid
from typing import Any

import redis

import cachesync
from cachesync.db import connect
from cachesync.keys import channel, entry_key
from cachesync.outbox import Outbox
from cachesync.outbox.relay import Relay
from cachesync.rules import Rules

from _util import env_line


def load() -> str:
    return "{:.2f} {:.2f} {:.2f}".format(*os.getloadavg())


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def spawn(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "cachesync", *args], stderr=subprocess.DEVNULL)


def latency(db_url: str, redis_url: str, n: int, mode: str) -> dict[str, tuple[float, float]]:
    ns = "bench" + uuid.uuid4().hex[:8]
    table = "cachesync_outbox_b" + uuid.uuid4().hex[:8]
    ob = Outbox(table)
    conn = connect(db_url)
    ob.init(conn)
    stream = "csbench-" + uuid.uuid4().hex[:8]
    procs = []
    common = ["--db-url", db_url, "--table", table]
    if mode == "notify":
        procs.append(spawn("relay", *common, "--redis-url", redis_url, "--namespace", ns))
    elif mode == "notify-eager":  # fast path, claiming after every notification (claim_delay 0)
        procs.append(spawn("relay", *common, "--redis-url", redis_url, "--namespace", ns, "--claim-delay", "0"))
    elif mode == "notify-claim":
        procs.append(spawn("relay", *common, "--redis-url", redis_url, "--namespace", ns, "--no-fast-path"))
    elif mode == "poll10ms":
        procs.append(spawn("relay", *common, "--redis-url", redis_url, "--namespace", ns, "--no-listen",
                           "--poll-interval", "0.01"))
    else:
        procs.append(spawn("relay", *common, "--bus", redis_url, "--bus-name", stream))
        procs.append(spawn("worker", "--bus", redis_url, "--bus-name", stream, "--redis-url", redis_url,
                           "--namespace", ns))
    r = redis.Redis.from_url(redis_url)
    ps = r.pubsub()
    ps.subscribe(channel(ns))
    arrived: dict[str, float] = {}
    got = threading.Event()
    want = [""]

    stop = threading.Event()

    def listen() -> None:
        while not stop.is_set():
            m = ps.get_message(timeout=0.05)
            if m is None or m["type"] != "message":
                continue
            now = time.perf_counter()
            for k in m["data"].decode().split("\n"):
                arrived.setdefault(k, now)
                if k == want[0]:
                    got.set()

    t = threading.Thread(target=listen, daemon=True)
    t.start()
    # The floor, on the same commits: a bare LISTEN client (no Redis, no work) notified by the outbox trigger.
    floor_at: dict[str, float] = {}
    lt = None
    if mode.startswith("notify"):
        import psycopg

        lconn = psycopg.connect(db_url, autocommit=True)
        lconn.execute(f'LISTEN "{table}"')

        def listen_floor() -> None:
            while not stop.is_set():
                for note in lconn.notifies(timeout=0.05):
                    now = time.perf_counter()
                    try:
                        for k in json.loads(json.loads(note.payload)[1]):
                            floor_at.setdefault(k, now)
                    except (ValueError, IndexError, TypeError):
                        pass
            lconn.close()

        lt = threading.Thread(target=listen_floor, daemon=True)
        lt.start()
    # warm up until the pipeline delivers
    floor: list[float] = []
    floor_after: list[float] = []
    added: list[float] = []  # per commit: invalidated in Redis minus notification at the bare listener
    lat: list[float] = []
    after: list[float] = []  # from the writer's commit() returning
    commit: list[float] = []  # the writer's commit() itself
    rng = random.Random(1)
    for i in range(n + 20):
        key = f"k{i}"
        want[0] = entry_key(ns, key)
        got.clear()
        ob.record(conn, key, f"{key}@example.com", version=i + 1)  # a real row: two keys and a version
        time.sleep(rng.uniform(0, 0.02))  # think time: commits must not phase-lock with the relay's poll cycle
        t0 = time.perf_counter()
        conn.commit()
        t1 = time.perf_counter()
        if not got.wait(30):
            raise SystemExit(f"{mode}: invalidation of {key} never arrived")
        if lt is not None:
            deadline = time.monotonic() + 30
            while key not in floor_at and time.monotonic() < deadline:
                time.sleep(0.0005)
            if key not in floor_at:
                raise SystemExit(f"{mode}: notification of {key} never arrived")
        if i >= 20:
            if lt is not None:
                floor.append(floor_at[key] - t0)
                floor_after.append(floor_at[key] - t1)
                added.append(arrived[want[0]] - floor_at[key])
            lat.append(arrived[want[0]] - t0)
            after.append(arrived[want[0]] - t1)
            commit.append(t1 - t0)
    for p in procs:
        p.terminate()
        p.wait()
    stop.set()
    t.join()
    if lt is not None:
        lt.join()
    ps.close()
    r.delete(stream, stream + ":retry", stream + ":dead")
    keys = [entry_key(ns, k) for i in range(n + 20) for k in (f"k{i}", f"k{i}@example.com")]
    for i in range(0, len(keys), 500):
        r.delete(*keys[i:i + 500])
    r.close()
    ob.drop(conn)
    conn.close()
    return {k: (statistics.median(v) * 1000, pct(v, 99) * 1000)
            for k, v in (("total", lat), ("after", after), ("commit", commit), ("floor", floor),
                         ("floor_after", floor_after), ("added", added)) if v}


def latency_wal(db_url: str, redis_url: str, n: int) -> dict[str, tuple[float, float]]:
    """commit -> invalidated through ``cachesync cdc`` for ``Outbox.emit_commit()`` messages (PostgreSQL)."""
    import tempfile

    import psycopg

    from cachesync.cdc.postgres import PostgresSource

    tag = uuid.uuid4().hex[:8]
    ns, name, table = "bench" + tag, "csb_" + tag, "bench_cdcmsg_" + tag
    ob = Outbox(message_prefix=name)
    conn = psycopg.connect(db_url)
    conn.execute(f"CREATE TABLE {table} (id INT PRIMARY KEY)")
    conn.commit()
    tmp = tempfile.mkdtemp()
    rules = os.path.join(tmp, "rules.toml")
    with open(rules, "w") as f:
        f.write(f'[tables.{table}]\nkeys = ["row:{{id}}"]\n')
    src = PostgresSource(db_url, Rules.load(rules), slot=name, publication=name, message_prefix=name)
    src.check()  # slot exists before the first message: nothing committed from here on is missed
    proc = spawn("cdc", "--db-url", db_url, "--rules", rules, "--redis-url", redis_url, "--namespace", ns,
                 "--slot", name, "--publication", name, "--message-prefix", name, "--stats-interval", "0",
                 "--checkpoint", os.path.join(tmp, "cp.json"))
    r = redis.Redis.from_url(redis_url)
    ps = r.pubsub()
    ps.subscribe(channel(ns))
    arrived: dict[str, float] = {}
    got = threading.Event()
    want = [""]
    stop = threading.Event()

    def listen() -> None:
        while not stop.is_set():
            m = ps.get_message(timeout=0.05)
            if m is None or m["type"] != "message":
                continue
            now = time.perf_counter()
            for k in m["data"].decode().split("\n"):
                arrived.setdefault(k, now)
                if k == want[0]:
                    got.set()

    t = threading.Thread(target=listen, daemon=True)
    t.start()
    lat: list[float] = []
    commit: list[float] = []
    rng = random.Random(1)
    for i in range(n + 20):
        key = f"m{i}"
        want[0] = entry_key(ns, key)
        got.clear()
        time.sleep(rng.uniform(0, 0.02))  # think time
        t0 = time.perf_counter()
        ob.emit_commit(conn, key)
        t1 = time.perf_counter()
        if not got.wait(30):
            raise SystemExit(f"wal message: invalidation of {key} never arrived")
        if i >= 20:
            lat.append(arrived[want[0]] - t0)
            commit.append(t1 - t0)
    proc.terminate()
    proc.wait()
    stop.set()
    t.join()
    ps.close()
    keys = [entry_key(ns, f"m{i}") for i in range(n + 20)]
    for i in range(0, len(keys), 500):
        r.delete(*keys[i:i + 500])
    r.close()
    for _ in range(500):  # the walsender exits asynchronously: bounded poll until the slot is free
        row = conn.execute("SELECT active_pid FROM pg_replication_slots WHERE slot_name = %s", (name,)).fetchone()
        conn.commit()
        if row is None or row[0] is None:
            break
        time.sleep(0.01)
    src.drop_slot(drop_publication=True)
    conn.execute(f"DROP TABLE {table}")
    conn.commit()
    conn.close()
    return {k: (statistics.median(v) * 1000, pct(v, 99) * 1000) for k, v in (("total", lat), ("commit", commit))}


SHAPES_ROW = {
    "versioned, 2 keys": lambda i: ([f"user:{i}", f"user_by_email:u{i}@example.com"], str(i + 1)),
    "cheap: 1 key, no version": lambda i: ([f"t{i}"], None),
}
"""Outbox row shapes: keys and version of row ``i``. The first is the default (a real row: an entity key and a
lookup key, and the row's version); the second is the shape the earlier figures were measured with."""

BATCH_LUA = """
local t = redis.call('TIME')
local now = string.format('%.0f', tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
local tomb_ms, wake_ms, chan = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3]
local names = {}
for i = 1, #KEYS, 2 do
  local k = KEYS[i]
  local ver = ARGV[3 + (i + 1) / 2]
  local raw = redis.call('GET', k)
  local vver, fl, w = nil, nil, nil
  if raw then
    local c = string.sub(raw, 1, 1)
    if c == 'V' or c == 'N' then
      vver = string.sub(raw, 2, string.find(raw, '|', 2, true) - 1)
      fl = vver
    elseif c == 'M' then
      vver, fl, w = string.match(raw, '^M([^|]*)|([^|]*)|[^|]*|[^|]*|[^|]*|([^|]*)|')
    end
  end
  if fl == '' then fl = nil end
  local newfl = fl
  for _, c in ipairs({vver or '', ver}) do
    if c ~= '' and (not newfl or tonumber(c) > tonumber(newfl)) then newfl = c end
  end
  redis.call('SET', k, 'M|' .. (newfl or '') .. '|||||' .. now .. '|', 'PX', tomb_ms)
  local n = redis.call('LLEN', KEYS[i + 1]) + (tonumber(w) or 0)
  if n > 0 then
    redis.call('DEL', KEYS[i + 1])
    for _ = 1, n do redis.call('RPUSH', KEYS[i + 1], '0') end
    redis.call('PEXPIRE', KEYS[i + 1], wake_ms)
  end
  names[#names + 1] = k
end
if chan ~= '' then redis.call('PUBLISH', chan, table.concat(names, '\\n')) end
return #names
"""
"""The floor's batched Redis work, written for the benchmark (no cachesync code): what invalidate.lua does per key
in delete mode (read the entry string, raise the version floor, leave the tombstone string, wake waiters), for every key/version
pair of a whole claimed batch in one script call, and one PUBLISH of the batch's entry keys."""


def _seed(db_url: str, rows: int, shape: str) -> tuple[str, Outbox, Any]:
    table = "cachesync_outbox_b" + uuid.uuid4().hex[:8]
    ob = Outbox(table)
    conn = connect(db_url)
    ob.init(conn)
    cur = conn.cursor()
    d = ob._dialect(conn)
    make = SHAPES_ROW[shape]
    for i in range(0, rows, 1000):
        batch = []
        for j in range(i, min(rows, i + 1000)):
            keys, ver = make(j)
            batch.append((json.dumps(keys, separators=(",", ":")), ver))
        cur.executemany(d.sql(f"INSERT INTO {table} (cache_keys, key_version) VALUES (?, ?)"), batch)
    conn.commit()
    return table, ob, conn


def _cleanup(r: redis.Redis, ns: str, rows: int, shape: str) -> None:
    make = SHAPES_ROW[shape]
    keys = [entry_key(ns, k) for j in range(rows) for k in make(j)[0]]
    for i in range(0, len(keys), 1000):
        r.delete(*keys[i:i + 1000])


def throughput(db_url: str, redis_url: str, rows: int, shape: str) -> float:
    """``Relay.drain()`` of a backlog of ``rows`` rows of ``shape``, batches of 500: rows/s. Timed from the first
    claim, like the floors: the relay is connected and set up (and the script loaded) before the clock starts."""
    ns = "bench" + uuid.uuid4().hex[:8]
    table, ob, conn = _seed(db_url, rows, shape)
    cache = cachesync.Cache(redis_url, namespace=ns)
    relay = Relay(db_url, cache, table=table, batch_size=500)
    relay._db()  # connected and set up before the clock starts, as the floors are
    cache.invalidate("warm-up")  # the script loaded, as the floors load theirs first
    t0 = time.perf_counter()
    done = relay.drain()
    dt = time.perf_counter() - t0
    assert done == rows, done
    relay.close()
    _cleanup(cache.redis, ns, rows, shape)
    cache.close()
    ob.drop(conn)
    conn.close()
    return rows / dt


def floor_throughput(db_url: str, redis_url: str, rows: int, shape: str, batched: bool) -> float:
    """The relay's floor on the same backlog, written by hand: the same database work as the relay (PostgreSQL:
    ``BEGIN; DELETE ... WHERE id IN (SELECT ... FOR UPDATE SKIP LOCKED LIMIT 500) RETURNING ...`` prepared, then
    ``COMMIT`` + the next-due query; MariaDB: ``SELECT ... FOR UPDATE SKIP LOCKED LIMIT 500`` then ``DELETE ...;
    COMMIT`` on a multi-statement connection, READ COMMITTED; the columns the relay claims, with ``traceparent``
    when OpenTelemetry is installed, as the relay then reads it), ``json.loads`` of each row's keys, and the same
    Redis work sent raw with redis-py in one pipeline per batch: ``batched`` False = ``EVALSHA invalidate.lua``
    once per 500 keys with their versions (the calls the script takes since it carries a version per key);
    True = one call of :data:`BATCH_LUA` per batch with every key/version pair. Rows/s."""
    from cachesync.db import MYSQL, dialect_of
    from cachesync.scripts import SCRIPTS

    ns = "bench" + uuid.uuid4().hex[:8]
    table, ob, conn0 = _seed(db_url, rows, shape)
    with cachesync.Cache(redis_url, namespace=ns) as c0:  # only to read the default TTLs (constants)
        tomb_ms, wake_ms = c0.ctx.tomb_ms, c0.ctx.wake_ms
    chan = channel(ns)
    r = redis.Redis.from_url(redis_url)
    inv_src = SCRIPTS["invalidate"].source
    inv_sha = r.script_load(inv_src)
    batch_sha = r.script_load(BATCH_LUA)
    d = dialect_of(db_url)
    from cachesync.outbox import PARKED, now_ms_sql

    now = now_ms_sql(d)
    from cachesync import tracing

    # the columns the relay claims: with OpenTelemetry installed it also reads the writers' traceparent
    cols = "id, cache_keys, key_version, attempts" + (", traceparent" if tracing.AVAILABLE else "")
    claim = (f"DELETE FROM {table} WHERE id IN (SELECT id FROM {table} WHERE run_at <= {now} ORDER BY id LIMIT 500 "
             f"FOR UPDATE SKIP LOCKED) RETURNING {cols}")
    due = f"SELECT MIN(run_at) - {now} FROM {table} WHERE run_at > 0 AND run_at < {PARKED}"
    if d is MYSQL:
        from pymysql.constants import CLIENT

        conn = connect(db_url, client_flag=CLIENT.MULTI_STATEMENTS)
        cur = conn.cursor()
        cur.execute("SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED")
    else:
        conn = connect(db_url)
        conn.autocommit = True
        conn.execute("SET synchronous_commit = off")
        conn.execute(f"PREPARE fl_claim AS {claim}")
        conn.execute(f"PREPARE fl_due AS {due}")
        cur = conn.cursor()

    def send(raw: list[tuple[Any, ...]]) -> None:
        pipe = r.pipeline(transaction=False)
        if batched:
            ks: list[str] = []
            vs: list[str] = []
            for t in raw:
                ver = "" if t[2] is None else str(t[2])
                for k in json.loads(t[1]):
                    ek = f"cs:{ns}:{{{k}}}"
                    ks += (ek, ek + ":w")
                    vs.append(ver)
            pipe.execute_command("EVALSHA", batch_sha, len(ks), *ks, tomb_ms, wake_ms, chan, *vs)
        else:  # invalidate.lua itself: one call per 500 keys, each key with its own version
            eks: list[str] = []
            evs: list[str] = []
            for t in raw:
                ver = "" if t[2] is None else str(t[2])
                for k in json.loads(t[1]):
                    ek = f"cs:{ns}:{{{k}}}"
                    eks += (ek, ek + ":w")
                    evs.append(ver)
            for i in range(0, len(evs), 500):
                part = eks[2 * i:2 * i + 1000]
                pipe.execute_command("EVALSHA", inv_sha, len(part), *part, tomb_ms, "d", wake_ms, chan, "",
                                     *evs[i:i + 500])
        pipe.execute()

    t0 = time.perf_counter()
    done = 0
    while True:
        if d is MYSQL:
            cur.execute(f"SELECT {cols} FROM {table} WHERE run_at <= {now} "
                        "ORDER BY id LIMIT 500 FOR UPDATE SKIP LOCKED")
            raw = list(cur.fetchall())
            if not raw:
                conn.commit()
                break
            send(raw)
            ids = [t[0] for t in raw]
            cond = (f"id BETWEEN {ids[0]} AND {ids[-1]}" if ids[-1] - ids[0] == len(ids) - 1
                    else f"id IN ({','.join(map(str, ids))})")
            cur.execute(f"DELETE FROM {table} WHERE {cond}; COMMIT")
            while cur.nextset():
                pass
        else:
            cur.execute("BEGIN; EXECUTE fl_claim")
            cur.nextset()
            raw = cur.fetchall()
            if not raw:
                cur.execute("ROLLBACK")
                break
            raw.sort()
            send(raw)
            cur.execute("COMMIT; EXECUTE fl_due")
            cur.nextset()
            cur.fetchone()
        done += len(raw)
    dt = time.perf_counter() - t0
    assert done == rows, done
    cur.close()
    conn.close()
    _cleanup(r, ns, rows, shape)
    r.close()
    ob.drop(conn0)
    conn0.close()
    return rows / dt


def live(db_url: str, redis_url: str, rows: int, relays: int, fast: bool, per_commit: int = 1,
         claim_delay: float = 0.1) -> dict[str, float]:
    """``relays`` relays (threads of this process) listening while one writer commits ``rows`` rows, ``per_commit``
    ``record()`` calls (= notifications) per transaction, as fast as it can. Returns the rows/s from the first
    commit until the outbox is empty, Redis row-applies per row (fast path + claim path, all relays) and the relays'
    CPU ms per 1000 rows (thread CPU time, all relays) and the claims (database batches) per 1000 rows.
    ``claim_delay`` as in :class:`Relay`."""
    ns = "bench" + uuid.uuid4().hex[:8]
    table = "cachesync_outbox_b" + uuid.uuid4().hex[:8]
    ob = Outbox(table)
    conn = connect(db_url)
    ob.init(conn)
    cache = cachesync.Cache(redis_url, namespace=ns)
    rs = [Relay(db_url, cache, table=table, fast=fast, claim_delay=claim_delay) for _ in range(relays)]
    for r in rs:
        r.run_once()  # connected and listening before the first commit
    stop = threading.Event()
    cpu = [0.0] * relays

    def run(i: int) -> None:
        c0 = time.thread_time()
        rs[i].run(stop)
        cpu[i] = time.thread_time() - c0

    ts = [threading.Thread(target=run, args=(i,)) for i in range(relays)]
    for t in ts:
        t.start()
    t0 = time.perf_counter()
    for i in range(0, rows, per_commit):
        for j in range(i, min(rows, i + per_commit)):
            ob.record(conn, f"l{j}", f"l{j}@example.com", version=j + 1)
        conn.commit()
    while ob.pending(conn):
        time.sleep(0.005)
    dt = time.perf_counter() - t0
    stop.set()
    for t in ts:
        t.join()
    applies = sum(r.stats["fast"] + r.stats["applied"] for r in rs)
    keys = [entry_key(ns, k) for j in range(rows) for k in (f"l{j}", f"l{j}@example.com")]
    for i in range(0, len(keys), 1000):
        cache.redis.delete(*keys[i:i + 1000])
    cache.close()
    ob.drop(conn)
    conn.close()
    claims = sum(r.stats["batches"] for r in rs)
    return {"rate": rows / dt, "applies": applies / rows, "cpu": sum(cpu) * 1e6 / rows, "claims": claims * 1000 / rows}


SHAPES = {
    "1-stmt": ["UPDATE {app} SET version = version + 1 WHERE id = 1"],
    "3-stmt": ["SELECT email, version FROM {app} WHERE id = 2 FOR UPDATE",
               "UPDATE {app} SET version = version + 1 WHERE id = 2",
               "INSERT INTO {audit} (user_id, note) VALUES (2, 'version bumped')"],
}
"""The writer transactions measured: each is followed by COMMIT; the outbox variants record one key."""


TRIGGER_KEYS = {"keys": ["user:{id}", "user_by_email:{email}"], "version": "version"}
"""The rule of the capture-trigger variants (two keys per row, as the outbox variants' one key plus the email)."""


def commit_cost(db_url: str, n: int, multi: bool = False) -> dict[str, dict[str, float]]:
    """Median writer transaction time per shape: baseline (statements + commit), with ``record()`` before the
    commit, with ``Outbox.commit()``, and with capture triggers (the same statements on an identical table whose
    triggers record the change), interleaved on one connection (MySQL: ``multi`` opens it with
    CLIENT.MULTI_STATEMENTS, without which ``Outbox.commit()`` is ``record()`` + ``commit()``)."""
    from cachesync.outbox import triggers

    table = "cachesync_outbox_b" + uuid.uuid4().hex[:8]
    app = "bench_users_" + uuid.uuid4().hex[:8]
    audit = "bench_audit_" + uuid.uuid4().hex[:8]
    ob = Outbox(table)
    if multi and db_url.startswith("mysql"):
        from pymysql.constants import CLIENT

        conn = connect(db_url, client_flag=CLIENT.MULTI_STATEMENTS)
    else:
        conn = connect(db_url)
    ob.init(conn)
    d = ob._dialect(conn)
    ob_old = Outbox(table + "o")
    if d.name == "postgresql":
        ob_old.init(conn)
        conn.execute(f"CREATE OR REPLACE FUNCTION {ob_old.table}_notify() RETURNS trigger LANGUAGE plpgsql AS "
                     f"$$ BEGIN PERFORM pg_notify('{ob_old.table}', ''); RETURN NULL; END $$")
        conn.execute(f"DROP TRIGGER {ob_old.table}_notify ON {ob_old.table}")
        conn.execute(f"CREATE TRIGGER {ob_old.table}_notify AFTER INSERT ON {ob_old.table} FOR EACH STATEMENT "
                     f"EXECUTE FUNCTION {ob_old.table}_notify()")
        conn.commit()
    serial = {"postgresql": "BIGSERIAL PRIMARY KEY", "mysql": "BIGINT AUTO_INCREMENT PRIMARY KEY"}.get(
        d.name, "INTEGER PRIMARY KEY AUTOINCREMENT")
    cur = conn.cursor()
    # capture-trigger variants: an identical application table each, with its triggers
    trig: dict[str, tuple[str, Outbox]] = {"capture trigger -> outbox table": (app + "_t", ob)}
    if d.name == "postgresql":
        ob_nn = Outbox(table + "n")
        ob_nn.init(conn, notify=False)
        trig["capture trigger -> outbox table, no NOTIFY trigger"] = (app + "_n", ob_nn)
        trig["capture trigger -> WAL message (cachesync cdc)"] = (app + "_w", Outbox(table + "w"))
    apps = [app] + [a for a, _ in trig.values()]
    for a in apps:
        cur.execute(f"CREATE TABLE {a} (id INTEGER PRIMARY KEY, email VARCHAR(100), version INTEGER)")
        cur.execute(f"INSERT INTO {a} VALUES (1, 'a', 1), (2, 'b', 1)")
    cur.execute(f"CREATE TABLE {audit} (id {serial}, user_id INTEGER, note VARCHAR(100))")
    conn.commit()
    for label, (a, o) in trig.items():
        triggers.install(conn, o, Rules({a: TRIGGER_KEYS}), target="wal" if "WAL" in label else "table")
    out: dict[str, dict[str, float]] = {}
    for shape, stmts in SHAPES.items():
        def sqls_for(name: str) -> list[str]:
            return [q.format(app=name, audit=audit).replace(" FOR UPDATE", "" if d.name == "sqlite" else " FOR UPDATE")
                    for q in stmts]

        sqls = sqls_for(app)

        def base(i: int) -> None:
            for q in sqls:
                cur.execute(q)
            conn.commit()

        def rec(i: int) -> None:
            for q in sqls:
                cur.execute(q)
            ob.record(conn, "user:1", version=i)
            conn.commit()

        def one(i: int) -> None:  # Outbox.commit(): the INSERT and the COMMIT in one round trip where possible
            for q in sqls:
                cur.execute(q)
            ob.commit(conn, "user:1", version=i)

        def floor(i: int) -> None:  # the floor of "anything recorded in the transaction": one more round trip
            for q in sqls:
                cur.execute(q)
            cur.execute("SELECT 1")
            cur.fetchall()
            conn.commit()

        def with_trigger(name: str) -> Callable[[int], None]:
            tsqls = sqls_for(name)

            def run(i: int) -> None:  # the baseline's statements; the database records the change
                for q in tsqls:
                    cur.execute(q)
                conn.commit()
            return run

        variants = {"baseline": base, "record+commit": rec, "Outbox.commit()": one, "floor: + SELECT 1": floor}
        variants.update({label: with_trigger(a) for label, (a, _) in trig.items()})
        if d.name == "postgresql":
            def rec_old(i: int) -> None:  # the trigger before the fast path: NOTIFY with an empty payload
                for q in sqls:
                    cur.execute(q)
                ob_old.record(conn, "user:1", version=i)
                conn.commit()

            def emit(i: int) -> None:  # measurement only: a WAL message instead of a row (no relay reads it)
                for q in sqls:
                    cur.execute(q)
                cur.execute("SELECT pg_logical_emit_message(true, 'cachesync', %s)", (f'["user:1",{i}]',))
                conn.commit()

            def emit_one(i: int) -> None:  # Outbox.emit_commit(): WAL message + COMMIT in one round trip
                for q in sqls:
                    cur.execute(q)
                ob.emit_commit(conn, "user:1", version=i)

            def one_same(i: int) -> None:  # diagnosis: Outbox.commit() whose SQL text is the same every call
                for q in sqls:
                    cur.execute(q)
                ob.commit(conn, "user:1", version=1)

            def rec_literal(i: int) -> None:  # diagnosis: record+commit, values inlined (new SQL text every call)
                for q in sqls:
                    cur.execute(q)
                cur.execute(f"INSERT INTO {table} (cache_keys, key_version, run_at) VALUES ('[\"user:1\"]', '{i}', 0)",
                            prepare=False)
                conn.commit()

            variants.update({"diag: Outbox.commit(), same version every call": one_same,
                             "diag: record+commit, values inlined, never prepared": rec_literal})
            variants.update({"record, empty-payload trigger": rec_old, "pg_logical_emit_message": emit,
                             "pg_logical_emit_message + COMMIT, one round trip": emit_one})
        times: dict[str, list[float]] = {k: [] for k in variants}
        order = list(variants)
        for i in range(n):
            order = order[1:] + order[:1]  # rotate: no variant always runs first
            for k in order:
                t0 = time.perf_counter()
                variants[k](i)
                times[k].append(time.perf_counter() - t0)
        out[shape] = {k: statistics.median(v) * 1000 for k, v in times.items()}
    if d.name == "postgresql":  # diagnosis: the client-side cost of building Outbox.commit()'s one-trip text
        from psycopg import sql as pgsql

        t0 = time.perf_counter()
        for i in range(n):
            q, ps = ob.insert_sql(d, ob.rows_for(["user:1"], i))
            parts = q.split("?")
            parts[0] + "".join(pgsql.Literal(p).as_string(conn) + rest for p, rest in zip(ps, parts[1:], strict=True))
        t1 = time.perf_counter()
        for i in range(n):
            ob.insert_sql(d, ob.rows_for(["user:1"], i))
        t2 = time.perf_counter()
        out["_client"] = {"one-trip text": (t1 - t0) / n * 1000, "record() SQL + params": (t2 - t1) / n * 1000}
    for label, (a, o) in trig.items():
        triggers.uninstall(conn, o, Rules({a: TRIGGER_KEYS}))
        if o is not ob:
            o.drop(conn)
    for a in apps:
        cur.execute(f"DROP TABLE {a}")
    cur.execute(f"DROP TABLE {audit}")
    conn.commit()
    ob.drop(conn)
    if d.name == "postgresql":
        ob_old.drop(conn)
    conn.close()
    return out


def print_commit_cost(r: dict[str, dict[str, float]]) -> None:
    for shape, v in r.items():
        if shape == "_client":
            print(f"client CPU per call (no I/O): Outbox.commit()'s one-trip text {v['one-trip text'] * 1000:.1f} µs; "
                  f"record()'s SQL + parameters {v['record() SQL + params'] * 1000:.1f} µs")
            continue
        b = v["baseline"]
        print(f"writer {shape}: baseline {b:.3f} ms")
        for k, t in v.items():
            if k != "baseline":
                print(f"writer {shape}: {k} {t:.3f} ms, ratio x{t / b:.3f} (+{(t / b - 1) * 100:.1f} %)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--db-url", default=os.environ.get("CACHESYNC_TEST_PG_URL", "postgresql://root@127.0.0.1:5432/test"))
    ap.add_argument("--redis-url", default=os.environ.get("CACHESYNC_TEST_REDIS_URL", "redis://127.0.0.1:6379/15"))
    ap.add_argument("--n", type=int, default=300, help="commits per latency measurement (default 300)")
    ap.add_argument("--commits", type=int, default=500, help="writer transactions per variant (default 500)")
    ap.add_argument("--rows", type=int, default=20_000, help="backlog rows for the throughput run (default 20000)")
    ap.add_argument("--live-rows", type=int, default=2_000,
                    help="rows committed (one per transaction) while 1 or 2 relays listen (default 2000)")
    ap.add_argument("--mysql-multi-statements", action="store_true",
                    help="MySQL writer-cost run: connect with CLIENT.MULTI_STATEMENTS (Outbox.commit() in one trip)")
    ap.add_argument("--only-writer-cost", action="store_true", help="run only the writer-cost section (3.)")
    ap.add_argument("--only-latency", action="store_true",
                    help="run only the relay latency section (1.: notify, notify-claim, poll10ms, bus+worker)")
    ap.add_argument("--only-throughput", action="store_true", help="run only the relay throughput section (2.)")
    ap.add_argument("--repeat", type=int, default=1, help="writer-cost runs, each with its own baseline; throughput rounds (default 1)")
    ap.add_argument("--only-wal", action="store_true",
                    help="run only the WAL-message sections (3. and 5.; PostgreSQL)")
    ap.add_argument("--quick", action="store_true", help="smoke run: few commits and rows (numbers meaningless)")
    a = ap.parse_args()
    if a.quick:
        a.n, a.commits, a.rows, a.live_rows = 30, 30, 1000, 200
    print(f"database: {a.db_url.split('://')[0]}; {env_line()}; load {load()}")
    pg = a.db_url.startswith("postgres")
    if a.only_throughput:
        throughput_section(a)
        return
    if pg and not a.only_writer_cost and not a.only_latency:
        r = latency_wal(a.db_url, a.redis_url, a.n)
        print(f"commit -> invalidated, emit_commit() via cachesync cdc ({a.n} commits): p50 {r['total'][0]:.2f} ms  "
              f"p99 {r['total'][1]:.2f} ms  (emit_commit() itself p50 {r['commit'][0]:.2f} / p99 "
              f"{r['commit'][1]:.2f})")
    if a.only_wal:
        a.only_writer_cost = True
    if not a.only_writer_cost:
        print(f"commit -> invalidated, {a.n} single-row commits per mode (rows with two keys and a version), "
              "spans start when the writer's commit() returns:")
        for mode in ("notify", "notify-eager", "notify-claim", "poll10ms", "bus+worker"):
            if mode.startswith("notify") and not pg:
                continue
            r = latency(a.db_url, a.redis_url, a.n, mode)
            print(f"  {mode:12s}: after commit() returned p50 {r['after'][0]:.2f} ms  p99 {r['after'][1]:.2f} ms  "
                  f"(commit() itself p50 {r['commit'][0]:.2f} / p99 {r['commit'][1]:.2f}; from before commit() "
                  f"p50 {r['total'][0]:.2f} / p99 {r['total'][1]:.2f})")
            if "floor" in r:
                fa = r["floor_after"]
                print(f"     floor, same commits (bare LISTEN client notified), after commit() returned: p50 {fa[0]:.2f}"
                      f" / p99 {fa[1]:.2f} ms; ours/floor p50 "
                      + (f"x{r['after'][0] / fa[0]:.2f}" if fa[0] > 0 else "n/a (the floor is notified before commit() returns)")
                      + f", p99 x{r['after'][1] / fa[1]:.2f}; added by the relay over the floor, per commit: p50 "
                      f"{r['added'][0]:.2f} / p99 {r['added'][1]:.2f} ms")
        if a.only_latency:
            return
        throughput_section(a)
        if pg:
            print(f"live: one writer commits {a.live_rows} single-row transactions (two keys and a version each) while"
                  " relays listen:")
            for relays, fast, delay in ((1, True, 0.1), (1, True, 0.0), (1, False, 0.1), (2, True, 0.1),
                                        (2, False, 0.1)):
                r = live(a.db_url, a.redis_url, a.live_rows, relays, fast, claim_delay=delay)
                what = f"fast path, claim delay {delay:g} s" if fast else "claim only"
                print(f"  {relays} relay(s), {what}: {r['rate']:,.0f} rows/s (writer-bound), Redis applies/row "
                      f"{r['applies']:.2f}, relay CPU {r['cpu']:.0f} ms/1000 rows, claims/1000 rows {r['claims']:.0f}")
    for shape, stmts in SHAPES.items():
        print(f"writer transaction {shape}: " + "; ".join(stmts) + "; COMMIT")
    print(f"writer cost: {a.commits} transactions per variant, interleaved; load {load()}")
    runs = [commit_cost(a.db_url, a.commits, a.mysql_multi_statements) for _ in range(a.repeat)]
    for i, r in enumerate(runs):
        if a.repeat > 1:
            print(f"-- writer-cost run {i + 1} of {a.repeat}")
        print_commit_cost(r)
    if a.repeat > 1:
        print("-- ratios over the runs (min-max)")
        for shape in runs[0]:
            if shape == "_client":
                continue
            for k in runs[0][shape]:
                if k != "baseline":
                    rs = [r[shape][k] / r[shape]["baseline"] for r in runs]
                    print(f"writer {shape}: {k}: x{min(rs):.3f}-x{max(rs):.3f}")
    print(f"load at the end: {load()}")


def throughput_section(a: argparse.Namespace) -> None:
    rounds = max(1, a.repeat)
    print(f"relay throughput, backlog of {a.rows} rows, batches of 500, {rounds} round(s) (load before: {load()}):")
    for shape in SHAPES_ROW:
        ratios, rates = [], []
        for i in range(rounds):
            cases: dict[str, Callable[[], float]] = {
                "A": lambda: floor_throughput(a.db_url, a.redis_url, a.rows, shape, batched=False),
                "ours": lambda: throughput(a.db_url, a.redis_url, a.rows, shape),
                "B": lambda: floor_throughput(a.db_url, a.redis_url, a.rows, shape, batched=True)}
            order = list(cases)
            order = order[i % 3:] + order[:i % 3]  # rotated each round: no case always first (or after another)
            got = {k: cases[k]() for k in order}
            fa, ours, fb = got["A"], got["ours"], got["B"]
            best = max(fa, fb)
            ratios.append(ours / best)
            rates.append(ours)
            print(f"  {shape:25s}: Relay.drain() {ours:7,.0f} rows/s | floor A, invalidate.lua per 500 keys "
                  f"{fa:7,.0f} rows/s | floor B, one script call per batch {fb:7,.0f} rows/s | ours/faster floor "
                  f"x{ours / best:.2f} (goal: >= 30,000 rows/s and >= x0.80; order {', '.join(order)})")
        if rounds > 1:
            print(f"  {shape:25s}: over {rounds} rounds: {min(rates):,.0f}-{max(rates):,.0f} rows/s, ours/faster "
                  f"floor x{min(ratios):.2f}-x{max(ratios):.2f} (median x{statistics.median(ratios):.2f})")
    print(f"  load after: {load()}")


if __name__ == "__main__":
    main()
