"""CDC against PRIVATE database servers (tests/private_servers.py) that the tests restart, crash and misconfigure.

* A server restarted mid-stream -- clean shutdown and ``kill -9`` of every server process -- while a writer keeps
  committing before, during (failing, reconnecting) and after: every committed row's key is invalidated, and
  nothing is replayed from the start (each attempted row is applied at most once).
* Real servers started with a wrong setting: MariaDB without ``--log-bin``, with ``binlog_format=MIXED``, with
  ``binlog_row_metadata=NO_LOG``; PostgreSQL with ``wal_level=replica``: ``cachesync cdc`` exits with an error
  naming the setting.
Synchronisation: bounded polls for observable conditions; no sleeps, no timed assertions.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import cachesync
from cachesync.cdc import CdcConfigError, CdcRunner, FileCheckpoint, Source
from cachesync.cdc.mysql import MySQLSource
from cachesync.cdc.postgres import PostgresSource
from cachesync.cli import main
from cachesync.db import connect
from cachesync.rules import Rules
from private_servers import PrivateMariaDB, PrivatePostgres, private_mariadb, private_pg  # noqa: F401
from test_cdc_conformance import tombstoned, wait_for
from test_cdc_mysql import server_id
from test_cdc_postgres import drop_slot_and_publication


class Writer:
    """Commits one single-row INSERT after another until stopped; survives the server going away (reconnects).

    ``confirmed``: ids whose commit returned; ``attempted``: every id tried (a commit cut off by the crash may or
    may not have committed)."""

    def __init__(self, url: str, table: str) -> None:
        self.url, self.table = url, table
        self.confirmed: list[int] = []
        self.attempted = 0
        self.errors = 0
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        conn: Any = None
        while not self._stop.is_set():
            try:
                if conn is None:
                    conn = connect(self.url)
                i = self.attempted
                self.attempted += 1
                cur = conn.cursor()
                cur.execute(f"INSERT INTO {self.table} (id, v) VALUES ({i}, 1)")
                conn.commit()
                cur.close()
                self.confirmed.append(i)
            except Exception:  # server down or restarting: reconnect (bounded by the test's polls)
                self.errors += 1
                try:
                    if conn is not None:
                        conn.close()
                except Exception:
                    pass
                conn = None
                self._stop.wait(0.02)  # back off between reconnect attempts while the server is down
        if conn is not None:
            conn.close()

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(30)


class Stream:
    def __init__(self, source: Source, rules: Rules, cache: cachesync.Cache, tmp: Path) -> None:
        self.runner = CdcRunner(source, cache, rules, FileCheckpoint(tmp / "cp.json"), stats_interval=0,
                                reconnect_delay=0.05, reconnect_max_delay=0.5)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        wait_for(lambda: self.runner.position is not None or self.error, 30, "the runner to start")
        if self.error:
            raise self.error

    def _run(self) -> None:
        try:
            self.runner.run()
        except BaseException as e:  # reported by the test
            self.error = e

    def stop(self) -> None:
        self.runner.stop()
        self.thread.join(30)
        assert not self.thread.is_alive()


@pytest.fixture
def cache(redis_url: str, namespace: str) -> Iterator[cachesync.Cache]:
    c = cachesync.Cache(redis_url, namespace=namespace, tombstone_ttl=300)
    yield c
    c.close()


def _restart_scenario(srv: PrivatePostgres | PrivateMariaDB, source: Source, table: str, rules: Rules,
                      cache: cachesync.Cache, tmp: Path, crash: bool) -> None:
    stream = Stream(source, rules, cache, tmp)
    writer = Writer(srv.url, table)
    try:
        def all_invalidated(n: int) -> bool:
            ids = writer.confirmed[:n]
            return len(ids) >= n and all(tombstoned(cache, f"r:{i}") for i in ids) or bool(stream.error)

        wait_for(lambda: all_invalidated(30), 30, "30 rows committed and invalidated before the restart")
        srv.kill() if crash else srv.stop()
        srv.start()
        before = len(writer.confirmed)
        wait_for(lambda: len(writer.confirmed) >= before + 30 or stream.error, 60, "30 commits after the restart")
        writer.stop()
        assert stream.error is None, stream.error
        wait_for(lambda: all_invalidated(len(writer.confirmed)), 30, "every committed row's key invalidated")
        st = stream.runner.stats
        assert stream.error is None, stream.error
        assert st["reconnects"] >= 1 and st["position_lost"] == 0, st
        assert writer.errors >= 1  # the writer really saw the server go away
        # not replayed from the start: every attempted row was applied at most once
        assert st["changes"] <= writer.attempted, (st, writer.attempted)
    finally:
        writer.stop()
        stream.stop()


@pytest.mark.parametrize("crash", [False, True], ids=["clean-restart", "kill-9"])
def test_postgres_restart_mid_stream(private_pg: PrivatePostgres, cache: cachesync.Cache, tmp_path: Path,  # noqa: F811
                                     crash: bool) -> None:
    table = "cdcr_" + uuid.uuid4().hex[:10]
    slot = "cs_" + table
    conn = connect(private_pg.url)
    cur = conn.cursor()
    cur.execute(f"CREATE TABLE {table} (id INT PRIMARY KEY, v INT)")
    conn.commit()
    conn.close()
    rules = Rules({table: ["r:{id}"]})
    try:
        _restart_scenario(private_pg, PostgresSource(private_pg.url, rules, slot=slot, publication=slot), table,
                          rules, cache, tmp_path, crash)
    finally:
        drop_slot_and_publication(private_pg.url, slot, slot)
        conn = connect(private_pg.url)
        conn.cursor().execute(f"DROP TABLE IF EXISTS {table}")
        conn.commit()
        conn.close()


@pytest.mark.parametrize("crash", [False, True], ids=["clean-restart", "kill-9"])
def test_mariadb_restart_mid_stream(private_mariadb: PrivateMariaDB, cache: cachesync.Cache,  # noqa: F811
                                    tmp_path: Path, crash: bool) -> None:
    table = "cdcr_" + uuid.uuid4().hex[:10]
    conn = connect(private_mariadb.url)
    cur = conn.cursor()
    cur.execute(f"CREATE TABLE {table} (id INT PRIMARY KEY, v INT)")
    conn.commit()
    conn.close()
    rules = Rules({table: ["r:{id}"]})
    try:
        _restart_scenario(private_mariadb, MySQLSource(private_mariadb.url, server_id(), [table]), table, rules,
                          cache, tmp_path, crash)
    finally:
        conn = connect(private_mariadb.url)
        conn.cursor().execute(f"DROP TABLE IF EXISTS {table}")
        conn.commit()
        conn.close()


# ---------------------------------------------------------------------------------------------- bad configuration

def _cli_error(url: str, tmp: Path, redis_url: str, capsys: pytest.CaptureFixture[str], table: str = "t") -> str:
    rules = tmp / "rules.toml"
    rules.write_text(f'[tables.{table}]\nkeys = ["k:{{id}}"]\n')
    rc = main(["cdc", "--db-url", url, "--rules", str(rules), "--redis-url", redis_url, "--namespace",
               "t" + uuid.uuid4().hex[:8], "--checkpoint", str(tmp / "cp.json"), "--server-id", str(server_id()),
               "--slot", "cs_bad_" + uuid.uuid4().hex[:8], "--publication", "cs_bad_" + uuid.uuid4().hex[:8]])
    err = capsys.readouterr().err
    assert rc == 2, err
    return err


@pytest.mark.parametrize("start_with, expect", [
    ({"log_bin": False}, "log_bin is 'OFF', must be 'ON': start the server with --log-bin"),
    ({"binlog-format": "MIXED"}, "binlog_format is 'MIXED', must be 'ROW'"),
    ({"binlog-row-metadata": "NO_LOG"}, "binlog_row_metadata is 'NO_LOG', must be 'FULL'"),
], ids=["binlog-off", "binlog-format-mixed", "row-metadata-no-log"])
def test_mariadb_started_with_bad_binlog_settings(private_mariadb: PrivateMariaDB, redis_url: str,  # noqa: F811
                                                  tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                  start_with: dict[str, Any], expect: str) -> None:
    private_mariadb.stop()
    try:
        private_mariadb.start(**start_with)
        with pytest.raises(CdcConfigError, match="not set up for CDC") as ei:
            MySQLSource(private_mariadb.url, server_id()).check()
        assert expect in str(ei.value)
        err = _cli_error(private_mariadb.url, tmp_path, redis_url, capsys)
        assert expect in err and "pw@" not in err
    finally:
        private_mariadb.stop()
        private_mariadb.start()


def test_postgres_started_with_wal_level_replica(private_pg: PrivatePostgres, redis_url: str,  # noqa: F811
                                                 tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    table = "cdcw_" + uuid.uuid4().hex[:8]
    conn = connect(private_pg.url)
    conn.cursor().execute(f"CREATE TABLE {table} (id INT PRIMARY KEY)")
    conn.commit()
    conn.close()
    private_pg.stop()  # PostgreSQL refuses wal_level=replica while logical slots exist: the tests drop theirs
    try:
        private_pg.start(wal_level="replica")
        with pytest.raises(CdcConfigError, match="wal_level is 'replica', must be 'logical'"):
            PostgresSource(private_pg.url, Rules({table: ["k:{id}"]}), slot="cs_w" + table,
                           publication="cs_w" + table).check()
        err = _cli_error(private_pg.url, tmp_path, redis_url, capsys, table)
        assert "wal_level is 'replica', must be 'logical'" in err and "restart" in err
    finally:
        private_pg.stop()
        private_pg.start()
