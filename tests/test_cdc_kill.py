"""The CDC reader (a subprocess running ``cachesync cdc``) killed with SIGKILL repeatedly during 10,000 changes.

Every change's key must be invalidated (seen on the namespace's pub/sub channel, which the invalidation
script publishes to atomically with the invalidation), and repeats (at-least-once) must stay within one
batch per kill. Synchronisation: bounded polls on observable progress, no sleeps.
"""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
import redis

from cachesync.db import connect
from test_cdc_conformance import wait_for

N_TXNS, ROWS_PER_TXN = 2000, 5  # 10,000 row changes
MIN_KILLS = 3
BATCH_MAX_KEYS = 200


class Subscriber:
    def __init__(self, redis_url: str, ns: str) -> None:
        self.counts: collections.Counter[str] = collections.Counter()
        self.client = redis.Redis.from_url(redis_url)
        self.ps = self.client.pubsub(ignore_subscribe_messages=True)
        self.ps.subscribe(f"cs:{ns}:inv")
        wait_for(lambda: self.ps.get_message(timeout=0.1) is None and self.ps.subscribed, 5, "subscription")
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            m = self.ps.get_message(timeout=0.2)
            if m and m["type"] == "message":
                for k in m["data"].decode().split("\n"):
                    self.counts[k.rsplit("{", 1)[-1].rstrip("}")] += 1

    def close(self) -> None:
        self._stop.set()
        self.thread.join(5)
        self.ps.close()
        self.client.close()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["mysql", "postgresql"])
def test_sigkill_during_10k_changes(kind: str, request: pytest.FixtureRequest, redis_url: str, namespace: str,
                                    tmp_path: Path) -> None:
    db_url = request.getfixturevalue("mysql_url" if kind == "mysql" else "pg_url")
    table = "cdck_" + uuid.uuid4().hex[:10]
    slot = "cs_" + table
    rules = tmp_path / "rules.toml"
    rules.write_text(f'[tables.{table}]\nkeys = ["k:{{id}}"]\n')
    conn = connect(db_url)
    cur = conn.cursor()
    cur.execute(f"CREATE TABLE {table} (id INT PRIMARY KEY, v INT)")
    conn.commit()
    cp = tmp_path / "cp.json"
    cmd = [sys.executable, "-m", "cachesync.cli", "cdc", "--db-url", db_url, "--redis-url", redis_url,
           "--rules", str(rules), "--namespace", namespace, "--checkpoint", str(cp), "--stats-interval", "0",
           "--batch-max-keys", str(BATCH_MAX_KEYS), "--slot", slot, "--publication", slot,
           # a save after every batch: what a kill re-applies is then bounded by batches, not by the runner's
           # rate times the default 0.2 s between saves (a fast runner applies many batches in 0.2 s)
           "--checkpoint-interval", "0",
           "--server-id", str(int.from_bytes(os.urandom(3), "big") + 200_000)]
    sub = Subscriber(redis_url, namespace)
    procs: list[subprocess.Popen[bytes]] = []
    log = open(tmp_path / "reader.log", "ab")

    def start() -> subprocess.Popen[bytes]:
        p = subprocess.Popen(cmd, stdout=log, stderr=log)
        procs.append(p)
        return p

    kills = 0
    try:
        proc = start()
        wait_for(lambda: cp.exists() or proc.poll() is not None, 20, "the first checkpoint")
        assert proc.poll() is None, (tmp_path / "reader.log").read_text()
        done = threading.Event()
        # The writer stops at these transactions until the reader has been killed once more, so that the kills
        # land mid-stream however fast the machine is (forced, not timed).
        pause_at = {N_TXNS * (j + 1) // (MIN_KILLS + 1) for j in range(MIN_KILLS)}
        need_kill, killed = threading.Event(), threading.Event()

        def writer() -> None:
            wconn = connect(db_url)
            wc = wconn.cursor()
            for t in range(N_TXNS):
                if t in pause_at:
                    killed.clear()
                    need_kill.set()
                    assert killed.wait(60)
                base = t * ROWS_PER_TXN
                wc.execute(f"INSERT INTO {table} (id, v) VALUES " +
                           ", ".join(f"({base + i}, {t})" for i in range(ROWS_PER_TXN)))
                wconn.commit()
            wconn.close()
            done.set()

        w = threading.Thread(target=writer, daemon=True)
        t0 = time.monotonic()
        w.start()
        # kill whenever the reader has made visible progress since its start (or the writer finished)
        while not done.is_set():
            seen = len(sub.counts)
            # kill when the writer waits for it, or (at most 12 times) whenever the reader has made progress
            wait_for(lambda: need_kill.is_set() or done.is_set() or (kills < 12 and len(sub.counts) >= seen + 500),
                     30, "reader progress")
            if done.is_set():
                break
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
            kills += 1
            proc = start()
            if need_kill.is_set():
                need_kill.clear()
                killed.set()
        w.join(60)
        expected = {f"k:{i}" for i in range(N_TXNS * ROWS_PER_TXN)}
        wait_for(lambda: expected <= set(sub.counts), 40, "every key invalidated")
        elapsed = time.monotonic() - t0
        missing = expected - set(sub.counts)
        repeats = sum(c - 1 for k, c in sub.counts.items() if k in expected)
        print(f"{kind}: {kills} kills, {repeats} repeated invalidations, {elapsed:.1f}s")
        assert not missing
        assert kills >= MIN_KILLS
        # at-least-once: each kill may re-apply what was applied but not yet checkpointed: the batch in flight
        # plus what was applied during the last background fsync (a few batches at most)
        assert repeats <= kills * 4 * (BATCH_MAX_KEYS + ROWS_PER_TXN), (repeats, kills)
        # a clean SIGTERM saves a final checkpoint and exits 0
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0, (tmp_path / "reader.log").read_text()[-2000:]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)
        sub.close()
        log.close()
        cur.execute(f"DROP TABLE IF EXISTS {table}")
        conn.commit()
        conn.close()
        if kind == "postgresql":
            from test_cdc_postgres import drop_slot_and_publication

            drop_slot_and_publication(db_url, slot, slot)
