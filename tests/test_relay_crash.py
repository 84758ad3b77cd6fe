"""Relays and workers SIGKILLed at seeded random points during 10,000 committed changes: every change's key is
invalidated at least once and the outbox ends empty. Subprocesses (`python -m cachesync ...`); the fault plan
(CACHESYNC_FAULT=point:n) makes each process kill itself with SIGKILL at a chosen step."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import threading
import uuid

import pytest
import redis

from cachesync.bus.redis_streams import RedisStreamsBus
from cachesync.db import connect
from cachesync.keys import entry_key
from cachesync.outbox import Outbox
from test_outbox import db_url, wait_for  # noqa: F401  (fixture)
from cachesync.core.layout import decode_entry

N = 10_000
RELAY_POINTS = ["claimed", "applied", "deleted", "committed"]
WORKER_POINTS = ["consumed", "applied", "acked"]


def spawn(args: list[str], fault: str | None) -> subprocess.Popen:
    env = dict(os.environ)
    env.pop("CACHESYNC_FAULT", None)
    if fault:
        env["CACHESYNC_FAULT"] = fault
    return subprocess.Popen([sys.executable, "-m", "cachesync", *args], env=env, stderr=subprocess.DEVNULL)


class Supervisor(threading.Thread):
    """Runs a command over and over; each run but the last dies at a seeded fault point."""

    def __init__(self, args: list[str], points: list[str], seed: int, kills: int) -> None:
        super().__init__(daemon=True)
        rng = random.Random(seed)
        self.plan = [f"{rng.choice(points)}:{rng.randint(1, 6)}" for _ in range(kills)]
        self.args = args
        self.killed = 0
        self.stop = threading.Event()
        self.proc: subprocess.Popen | None = None

    def run(self) -> None:
        for fault in [*self.plan, None]:
            if self.stop.is_set():
                return
            self.proc = spawn(self.args, fault)
            rc = self.proc.wait()
            if rc == -9:
                self.killed += 1
            elif self.stop.is_set():
                return
            else:
                raise AssertionError(f"relay/worker exited with {rc}")

    def finish(self) -> None:
        self.stop.set()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
        self.join(30)


def write_changes(url: str, ob: Outbox) -> None:
    conn = connect(url)
    for i in range(0, N, 100):
        for j in range(i, i + 100):
            ob.record(conn, f"c:{j}")
        conn.commit()
    conn.close()


def tombstoned(redis_url: str, ns: str) -> int:
    r = redis.Redis.from_url(redis_url)
    pipe = r.pipeline(transaction=False)
    for j in range(N):
        pipe.get(entry_key(ns, f"c:{j}"))
    n = sum("ti" in (decode_entry(x) or {}) for x in pipe.execute())
    r.close()
    return n


def cleanup(redis_url: str, ns: str) -> None:
    r = redis.Redis.from_url(redis_url)
    for batch in range(0, N, 1000):
        r.delete(*[entry_key(ns, f"c:{j}") for j in range(batch, batch + 1000)])
    r.close()


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_relay_killed_at_random_points(db_url, redis_url, namespace):  # noqa: F811
    table = "cachesync_outbox_" + uuid.uuid4().hex[:10]
    ob = Outbox(table)
    conn = connect(db_url)
    ob.init(conn)
    sup = Supervisor(["relay", "--db-url", db_url, "--redis-url", redis_url, "--namespace", namespace,
                      "--table", table, "--tombstone-ttl", "600", "--batch-size", "100", "--lease", "0.5",
                      "--max-backoff", "0.2"], RELAY_POINTS, seed={"sqlite": 1, "postgresql": 2, "mysql": 3}[db_url.split(":")[0]], kills=8)
    sup.start()
    try:
        write_changes(db_url, ob)
        wait_for(lambda: not sup.is_alive() or (sup.proc is not None and sup.killed == len(sup.plan)
                                                and ob.pending(conn) == 0), 90, "all kills and an empty outbox")
    finally:
        sup.finish()
    assert sup.killed == len(sup.plan)
    assert ob.pending(conn) == 0
    assert tombstoned(redis_url, namespace) == N
    ob.drop(conn)
    conn.close()
    cleanup(redis_url, namespace)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_worker_killed_at_random_points(pg_url, redis_url, namespace):
    """outbox (PostgreSQL) -> relay -> Redis Streams -> workers; relay and worker both killed repeatedly."""
    table = "cachesync_outbox_" + uuid.uuid4().hex[:10]
    stream = "cs-test-" + uuid.uuid4().hex[:8]
    ob = Outbox(table)
    conn = connect(pg_url)
    ob.init(conn)
    bus = RedisStreamsBus(redis_url, stream)
    relay = Supervisor(["relay", "--db-url", pg_url, "--bus", redis_url, "--bus-name", stream, "--table", table,
                        "--batch-size", "100", "--max-backoff", "0.2"], RELAY_POINTS, seed=11, kills=4)
    worker = Supervisor(["worker", "--bus", redis_url, "--bus-name", stream, "--redis-url", redis_url,
                         "--namespace", namespace, "--tombstone-ttl", "600", "--claim-idle", "0.3",
                         "--batch-size", "100", "--max-backoff", "0.2"], WORKER_POINTS, seed=12, kills=6)
    relay.start()
    worker.start()
    try:
        write_changes(pg_url, ob)
        wait_for(lambda: relay.killed == len(relay.plan) and worker.killed == len(worker.plan)
                 and ob.pending(conn) == 0 and tombstoned(redis_url, namespace) == N, 90,
                 "every change applied by the workers")
    finally:
        relay.finish()
        worker.finish()
    assert tombstoned(redis_url, namespace) == N
    bus.destroy()
    bus.close()
    ob.drop(conn)
    conn.close()
    cleanup(redis_url, namespace)


@pytest.mark.timeout(120)
def test_relay_killed_after_fast_apply_before_delete(pg_url, redis_url, namespace):
    """PostgreSQL fast path: the relay applies a row from its notification and is SIGKILLed before any claim
    deletes it; the row stays and the restarted relay applies it again (through the claim)."""
    import cachesync
    from cachesync.outbox.relay import Relay

    table = "cachesync_outbox_" + uuid.uuid4().hex[:10]
    ob = Outbox(table)
    conn = connect(pg_url)
    ob.init(conn)
    cache = cachesync.Cache(redis_url, namespace=namespace, ttl_jitter=0.0)
    proc = spawn(["relay", "--db-url", pg_url, "--redis-url", redis_url, "--namespace", namespace,
                  "--table", table], "fast_applied:1")
    key = ""
    try:
        # until the relay LISTENs, a row is applied and deleted by a claim; the first one applied from its
        # notification kills the relay (the relay ignores late notifications of rows it deleted itself)
        for i in range(500):
            key = f"fast:{i}"
            ob.record(conn, key)
            conn.commit()
            wait_for(lambda: proc.poll() is not None or ob.pending(conn) == 0, 60, "the relay to act")
            if proc.poll() is not None:
                break
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    assert proc.returncode == -9
    assert ob.pending(conn) == 1  # applied from the notification, never deleted
    e = cache.peek(key)
    assert e is not None and "ti" in e and "v" not in e  # the fast apply happened
    cache.set(key, "written back after the apply")
    relay = Relay(pg_url, cache, table=table)
    assert relay.drain() == 1
    assert (relay.stats["applied"], relay.stats["fast"], relay.stats["skipped"]) == (1, 0, 0)
    e = cache.peek(key)
    assert e is not None and "ti" in e and "v" not in e  # applied again
    assert ob.pending(conn) == 0
    relay.close()
    cache.close()
    ob.drop(conn)
    conn.close()
    r = redis.Redis.from_url(redis_url)
    r.delete(*[entry_key(namespace, f"fast:{j}") for j in range(500)])
    r.close()
