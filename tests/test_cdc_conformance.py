"""Conformance suite every CDC source passes (real database, real Redis; no mocks).

A source's test module subclasses :class:`CdcConformance` and provides ``db_url`` (fixture), ``make_source``,
``prepare_table`` and ``kill_stream``: see tests/test_cdc_mysql.py and tests/test_cdc_postgres.py.
Synchronisation: bounded polls for an observable condition (a tombstone appears), never sleeps.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import cachesync
from cachesync.cdc import CdcRunner, FileCheckpoint, Source
from cachesync.db import connect
from cachesync.rules import Rules


def wait_for(cond: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.005)


def tombstoned(cache: cachesync.Cache, key: str) -> bool:
    e = cache.peek(key)
    return bool(e and e.get("ti"))


class Env:
    """One running runner on a fresh table; ``write(*sql)`` commits, ``write(..., rollback=True)`` rolls back."""

    def __init__(self, suite: CdcConformance, db_url: str, cache: cachesync.Cache, tmp: Path) -> None:
        self.suite, self.db_url, self.cache, self.tmp = suite, db_url, cache, tmp
        self.table = "cdc_" + uuid.uuid4().hex[:10]
        self.rules = Rules({self.table: {"keys": ["u:{id}", "e:{email}"]}})
        self.conn = connect(db_url)
        self.write(f"CREATE TABLE {self.table} (id INT PRIMARY KEY, email VARCHAR(100), name VARCHAR(100))")
        suite.prepare_table(self)
        self.cp = FileCheckpoint(tmp / "cp.json")
        self.source: Source | None = None
        self.runner: CdcRunner | None = None
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None
        self.runner_kw: dict[str, Any] = {}

    def write(self, *stmts: str, rollback: bool = False) -> None:
        cur = self.conn.cursor()
        for s in stmts:
            cur.execute(s)
        self.conn.rollback() if rollback else self.conn.commit()
        cur.close()

    def start(self) -> CdcRunner:
        self.source = self.suite.make_source(self)
        self.runner = CdcRunner(self.source, self.cache, self.rules, self.cp, stats_interval=0,
                                reconnect_delay=0.05, **self.runner_kw)

        def run() -> None:
            try:
                assert self.runner is not None
                self.runner.run()
            except BaseException as e:  # reported by the test
                self.error = e

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        wait_for(lambda: self.runner is not None and self.runner.position is not None or self.error, 15,
                 "the runner to start")
        if self.error:
            raise self.error
        return self.runner

    def stop(self) -> None:
        if self.runner is not None and self.thread is not None:
            self.runner.stop()
            self.thread.join(15)
            assert not self.thread.is_alive(), "runner did not stop"
        self.runner = self.thread = None

    def wait_keys(self, *keys: str) -> None:
        for k in keys:
            wait_for(lambda k=k: tombstoned(self.cache, k) or self.error, 10, f"tombstone of {k}")
            if self.error:
                raise self.error

    def close(self) -> None:
        self.stop()
        try:
            self.write(f"DROP TABLE IF EXISTS {self.table}")
        finally:
            self.conn.close()
        self.suite.cleanup(self)


class CdcConformance:
    """Base class: subclasses set the fixture ``db_url`` and implement the hooks below."""

    def make_source(self, env: Env) -> Source:
        raise NotImplementedError

    def prepare_table(self, env: Env) -> None:
        """Per-source table setup (e.g. REPLICA IDENTITY FULL)."""

    def kill_stream(self, env: Env) -> None:
        """Kill the reader's replication connection on the server side."""
        raise NotImplementedError

    def cleanup(self, env: Env) -> None:
        """Drop slots/publications."""

    @pytest.fixture
    def env(self, db_url: str, redis_url: str, namespace: str, tmp_path: Path) -> Iterator[Env]:
        cache = cachesync.Cache(redis_url, namespace=namespace, tombstone_ttl=120)
        e = Env(self, db_url, cache, tmp_path)
        try:
            yield e
        finally:
            e.close()
            cache.close()

    def test_insert(self, env: Env) -> None:
        env.start()
        env.write(f"INSERT INTO {env.table} VALUES (1, 'a@x', 'A')")
        env.wait_keys("u:1", "e:a@x")

    def test_update_plain_and_key_column_change(self, env: Env) -> None:
        env.write(f"INSERT INTO {env.table} VALUES (1, 'a@x', 'A'), (2, 'b@x', 'B')")
        env.start()
        env.write(f"UPDATE {env.table} SET email = 'a2@x' WHERE id = 1")
        env.wait_keys("u:1", "e:a@x", "e:a2@x")
        env.write(f"UPDATE {env.table} SET id = 3 WHERE id = 2")
        env.wait_keys("u:2", "u:3", "e:b@x")
        assert env.runner is not None and env.runner.stats["missing_old_image"] == 0

    def test_delete(self, env: Env) -> None:
        env.write(f"INSERT INTO {env.table} VALUES (1, 'a@x', 'A')")
        env.start()
        env.write(f"DELETE FROM {env.table} WHERE id = 1")
        env.wait_keys("u:1", "e:a@x")

    def test_multi_row_transaction(self, env: Env) -> None:
        env.start()
        env.write(*(f"INSERT INTO {env.table} VALUES ({i}, 'm{i}@x', 'M')" for i in range(50)),
                  f"UPDATE {env.table} SET name = 'N' WHERE id < 10",
                  f"INSERT INTO {env.table} VALUES (100, 'p@x', 'P'), (101, 'q@x', 'Q')")
        env.wait_keys(*(f"u:{i}" for i in range(50)), *(f"e:m{i}@x" for i in range(50)), "u:100", "u:101", "e:q@x")

    def test_rollback_invalidates_nothing(self, env: Env) -> None:
        env.start()
        env.write(f"INSERT INTO {env.table} VALUES (7, 'r@x', 'R')", f"DELETE FROM {env.table} WHERE id = 7",
                  f"INSERT INTO {env.table} VALUES (8, 'r8@x', 'R')", rollback=True)
        env.write(f"INSERT INTO {env.table} VALUES (9, 'c@x', 'C')")
        env.wait_keys("u:9")  # applied in commit order, so the rolled-back one would be there by now
        assert not tombstoned(env.cache, "u:7") and not tombstoned(env.cache, "u:8")
        assert not tombstoned(env.cache, "e:r@x")

    def test_truncate_invalidates_every_key_of_the_table(self, env: Env) -> None:
        env.write(f"INSERT INTO {env.table} VALUES (1, 'a@x', 'A'), (2, 'b@x', 'B')")
        for k in ("u:1", "u:2", "e:a@x", "e:b@x", "u:999", "other:1"):
            env.cache.set(k, "cached")  # u:999: a key of the templates with no row behind it
        r = env.start()
        env.write(f"TRUNCATE TABLE {env.table}")
        env.wait_keys("u:1", "u:2", "e:a@x", "e:b@x", "u:999")
        assert (env.cache.peek("other:1") or {}).get("v")  # not covered by the table's templates
        assert r.stats["flushed_keys"] >= 5
        env.write(f"INSERT INTO {env.table} VALUES (3, 'c@x', 'C')")  # the stream goes on after the DDL
        env.wait_keys("u:3", "e:c@x")

    def test_value_cached_before_change_is_gone(self, env: Env) -> None:
        env.write(f"INSERT INTO {env.table} VALUES (1, 'a@x', 'A')")
        env.start()
        assert env.cache.get("u:1", lambda: "A") == "A"
        env.write(f"UPDATE {env.table} SET name = 'B' WHERE id = 1")
        env.wait_keys("u:1")
        assert env.cache.get("u:1", lambda: "B") == "B"

    def test_resumes_from_checkpoint_after_stop(self, env: Env) -> None:
        env.start()
        env.write(f"INSERT INTO {env.table} VALUES (1, 'a@x', 'A')")
        env.wait_keys("u:1")
        env.stop()
        saved = env.cp.load(env.source.kind, env.source.ident)  # type: ignore[union-attr]
        assert saved is not None
        env.write(f"INSERT INTO {env.table} VALUES (2, 'b@x', 'B')")  # while no reader runs
        r = env.start()
        env.write(f"INSERT INTO {env.table} VALUES (3, 'c@x', 'C')")
        env.wait_keys("u:2", "u:3")
        assert not r.stats["position_lost"]
        # nothing before the checkpoint was replayed: only the two new rows (other tests' transactions on the
        # shared server arrive as transactions without changes of this table)
        assert r.stats["changes"] == 2, r.stats

    def test_reconnects_after_connection_killed(self, env: Env) -> None:
        r = env.start()
        env.write(f"INSERT INTO {env.table} VALUES (1, 'a@x', 'A')")
        env.wait_keys("u:1")
        self.kill_stream(env)
        env.write(f"INSERT INTO {env.table} VALUES (2, 'b@x', 'B')")
        env.wait_keys("u:2")
        wait_for(lambda: r.stats["reconnects"] >= 1, 10, "a reconnect")
        # resumed from the checkpoint, not from the start: the first insert was not applied again
        assert r.stats["changes"] == 2, r.stats

    def test_lag_and_stats(self, env: Env) -> None:
        r = env.start()
        env.write(f"INSERT INTO {env.table} VALUES (1, 'a@x', 'A')")
        env.wait_keys("u:1")
        wait_for(lambda: r.stats["checkpoints"] >= 1, 5, "a checkpoint")
        assert r.stats["lag_ms"] is not None and r.stats["keys"] >= 2
        r._maybe_stats(force=True)
        h = env.cache.redis.hgetall(f"cs:{env.cache.ctx.ns}:cdc:{env.source.ident}")  # type: ignore[union-attr]
        assert b"lag_ms" in h
