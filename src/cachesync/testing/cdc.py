"""The conformance suite of a CDC :class:`cachesync.cdc.Source` (needs pytest): subclass :class:`CdcConformance`.

::

    import pytest
    from cachesync.testing import CdcConformance, CdcEnv

    class TestMySource(CdcConformance):
        @pytest.fixture
        def db_url(self) -> str:
            return "postgresql://root@127.0.0.1:5432/test"

        def make_source(self, env: CdcEnv) -> MySource:
            return MySource(env.db_url, list(env.rules.tables))

        def kill_stream(self, env: CdcEnv) -> None:
            ...  # end the source's replication connection on the server side

The suite needs the fixtures ``db_url`` (the subclass provides it) and ``redis_url`` (the project's conftest, or
``pytest_plugins = ["cachesync.testing.plugin"]``, which reads ``CACHESYNC_TEST_REDIS_URL``), plus pytest's
``tmp_path``. Each test gets a :class:`CdcEnv`: a fresh table ``cdc_<random>`` with the rule
``{"keys": ["u:{id}", "e:{email}"]}``, a cache in a namespace of its own, a file checkpoint and a runner started
by :meth:`CdcEnv.start` on a thread. Synchronisation: bounded polls for an observable condition (a tombstone
appears), never sleeps. See docs/testing.md.
"""

from __future__ import annotations

import functools
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ..cdc import CdcRunner, FileCheckpoint, Source
from ..db import connect
from ..core.rules import Rules
from .._sync.cache import Cache
from ._util import tombstoned, wait_for

__all__ = ["CdcConformance", "CdcEnv"]


class CdcEnv:
    """One running runner on a fresh table; ``write(*sql)`` commits, ``write(..., rollback=True)`` rolls back.

    Attributes: ``suite``, ``db_url``, ``cache``, ``tmp`` (a directory), ``table``, ``rules``, ``conn`` (a DB-API
    connection of :meth:`CdcConformance.connect`), ``cp`` (the checkpoint), ``source``/``runner``/``thread`` (set
    by :meth:`start`), ``error`` (what the runner raised), ``runner_kw`` (extra ``CdcRunner`` keywords). A suite's
    hooks may set more attributes on it (e.g. a slot name in ``prepare_table``).
    """

    def __init__(self, suite: CdcConformance, db_url: str, cache: Cache, tmp: Path) -> None:
        self.suite, self.db_url, self.cache, self.tmp = suite, db_url, cache, tmp
        self.table = "cdc_" + uuid.uuid4().hex[:10]
        self.rules = Rules({self.table: {"keys": ["u:{id}", "e:{email}"]}})
        self.conn = suite.connect(db_url)
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
        """A new source (:meth:`CdcConformance.make_source`) and runner, running on a thread; returns once the
        runner knows its position (or raises what it raised)."""
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
        """Wait (10 s at most each) until every key holds a tombstone; raises what the runner raised."""
        for k in keys:
            wait_for(functools.partial(self._done, k), 10, f"tombstone of {k}")
            if self.error:
                raise self.error

    def _done(self, key: str) -> bool:
        return tombstoned(self.cache, key) or self.error is not None

    def close(self) -> None:
        self.stop()
        try:
            self.write(f"DROP TABLE IF EXISTS {self.table}")
        finally:
            self.conn.close()
        self.suite.cleanup(self)


class CdcConformance:
    """Base class of a CDC source's conformance tests: subclasses provide the fixture ``db_url`` and implement
    :meth:`make_source` and :meth:`kill_stream`; the other hooks have defaults."""

    def make_source(self, env: CdcEnv) -> Source:
        """A new source reading the changes of ``env.rules.tables`` from ``env.db_url`` (required)."""
        raise NotImplementedError(f"{type(self).__name__} must implement make_source(env)")

    def kill_stream(self, env: CdcEnv) -> None:
        """End the reader's replication connection on the server side (required by the reconnect test)."""
        raise NotImplementedError(f"{type(self).__name__} must implement kill_stream(env)")

    def prepare_table(self, env: CdcEnv) -> None:
        """Per-source setup after ``env.table`` was created (e.g. REPLICA IDENTITY FULL). Default: nothing."""

    def cleanup(self, env: CdcEnv) -> None:
        """Remove what the source left on the server (slots, publications). Default: nothing."""

    def connect(self, db_url: str) -> Any:
        """The DB-API connection the tests write with (autocommit off). Default: :func:`cachesync.db.connect`."""
        return connect(db_url)

    def make_cache(self, redis_url: str) -> Cache:
        """The cache the runner invalidates. Default: a namespace of its own, tombstones kept for 120 s."""
        return Cache(redis_url, namespace="t" + uuid.uuid4().hex[:12], tombstone_ttl=120)

    @pytest.fixture
    def env(self, db_url: str, redis_url: str, tmp_path: Path) -> Iterator[CdcEnv]:
        cache = self.make_cache(redis_url)
        e = CdcEnv(self, db_url, cache, tmp_path)
        try:
            yield e
        finally:
            e.close()
            cache.close()

    def test_insert(self, env: CdcEnv) -> None:
        env.start()
        env.write(f"INSERT INTO {env.table} VALUES (1, 'a@x', 'A')")
        env.wait_keys("u:1", "e:a@x")

    def test_update_plain_and_key_column_change(self, env: CdcEnv) -> None:
        env.write(f"INSERT INTO {env.table} VALUES (1, 'a@x', 'A'), (2, 'b@x', 'B')")
        env.start()
        env.write(f"UPDATE {env.table} SET email = 'a2@x' WHERE id = 1")
        env.wait_keys("u:1", "e:a@x", "e:a2@x")
        env.write(f"UPDATE {env.table} SET id = 3 WHERE id = 2")
        env.wait_keys("u:2", "u:3", "e:b@x")
        assert env.runner is not None and env.runner.stats["missing_old_image"] == 0

    def test_delete(self, env: CdcEnv) -> None:
        env.write(f"INSERT INTO {env.table} VALUES (1, 'a@x', 'A')")
        env.start()
        env.write(f"DELETE FROM {env.table} WHERE id = 1")
        env.wait_keys("u:1", "e:a@x")

    def test_multi_row_transaction(self, env: CdcEnv) -> None:
        env.start()
        env.write(*(f"INSERT INTO {env.table} VALUES ({i}, 'm{i}@x', 'M')" for i in range(50)),
                  f"UPDATE {env.table} SET name = 'N' WHERE id < 10",
                  f"INSERT INTO {env.table} VALUES (100, 'p@x', 'P'), (101, 'q@x', 'Q')")
        env.wait_keys(*(f"u:{i}" for i in range(50)), *(f"e:m{i}@x" for i in range(50)), "u:100", "u:101", "e:q@x")

    def test_rollback_invalidates_nothing(self, env: CdcEnv) -> None:
        env.start()
        env.write(f"INSERT INTO {env.table} VALUES (7, 'r@x', 'R')", f"DELETE FROM {env.table} WHERE id = 7",
                  f"INSERT INTO {env.table} VALUES (8, 'r8@x', 'R')", rollback=True)
        env.write(f"INSERT INTO {env.table} VALUES (9, 'c@x', 'C')")
        env.wait_keys("u:9")  # applied in commit order, so the rolled-back one would be there by now
        assert not tombstoned(env.cache, "u:7") and not tombstoned(env.cache, "u:8")
        assert not tombstoned(env.cache, "e:r@x")

    def test_truncate_invalidates_every_key_of_the_table(self, env: CdcEnv) -> None:
        env.write(f"INSERT INTO {env.table} VALUES (1, 'a@x', 'A'), (2, 'b@x', 'B')")
        for k in ("u:1", "u:2", "e:a@x", "e:b@x", "u:999", "other:1"):
            env.cache.set(k, "cached")  # u:999: a key of the templates with no row behind it
        r = env.start()
        env.write(f"TRUNCATE TABLE {env.table}")
        env.wait_keys("u:1", "u:2", "e:a@x", "e:b@x", "u:999")
        assert (env.cache.peek("other:1") or {}).get("v")  # not covered by the table's templates
        wait_for(lambda: r.stats["flushed_keys"] >= 5, 10, "the flush to be counted")  # counted after the keys
        env.write(f"INSERT INTO {env.table} VALUES (3, 'c@x', 'C')")  # the stream goes on after the DDL
        env.wait_keys("u:3", "e:c@x")

    def test_value_cached_before_change_is_gone(self, env: CdcEnv) -> None:
        env.write(f"INSERT INTO {env.table} VALUES (1, 'a@x', 'A')")
        env.start()
        assert env.cache.get("u:1", lambda: "A") == "A"
        env.write(f"UPDATE {env.table} SET name = 'B' WHERE id = 1")
        env.wait_keys("u:1")
        assert env.cache.get("u:1", lambda: "B") == "B"

    def test_resumes_from_checkpoint_after_stop(self, env: CdcEnv) -> None:
        env.start()
        env.write(f"INSERT INTO {env.table} VALUES (1, 'a@x', 'A')")
        env.wait_keys("u:1")
        env.stop()
        assert env.source is not None
        saved = env.cp.load(env.source.kind, env.source.ident)
        assert saved is not None
        env.write(f"INSERT INTO {env.table} VALUES (2, 'b@x', 'B')")  # while no reader runs
        r = env.start()
        env.write(f"INSERT INTO {env.table} VALUES (3, 'c@x', 'C')")
        env.wait_keys("u:2", "u:3")
        assert not r.stats["position_lost"]
        # nothing before the checkpoint was replayed: only the two new rows (other tests' transactions on the
        # shared server arrive as transactions without changes of this table)
        assert r.stats["changes"] == 2, r.stats

    def test_reconnects_after_connection_killed(self, env: CdcEnv) -> None:
        r = env.start()
        env.write(f"INSERT INTO {env.table} VALUES (1, 'a@x', 'A')")
        env.wait_keys("u:1")
        self.kill_stream(env)
        env.write(f"INSERT INTO {env.table} VALUES (2, 'b@x', 'B')")
        env.wait_keys("u:2")
        wait_for(lambda: r.stats["reconnects"] >= 1, 10, "a reconnect")
        # resumed from the checkpoint, not from the start: the first insert was not applied again
        assert r.stats["changes"] == 2, r.stats

    def test_lag_and_stats(self, env: CdcEnv) -> None:
        r = env.start()
        env.write(f"INSERT INTO {env.table} VALUES (1, 'a@x', 'A')")
        env.wait_keys("u:1")
        # the runner counts a batch's keys after its checkpoint is handed over (the save may run first)
        wait_for(lambda: r.stats["checkpoints"] >= 1 and r.stats["keys"] >= 2, 5, "a checkpoint and the stats")
        assert r.stats["lag_ms"] is not None
        r._maybe_stats(force=True)
        assert env.source is not None
        h = env.cache.redis.hgetall(f"cs:{env.cache.ctx.ns}:cdc:{env.source.ident}")
        assert b"lag_ms" in h
