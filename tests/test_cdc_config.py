"""CDC configuration errors and degraded-setup handling against the real servers.

Covered against real servers: missing replication privileges (MariaDB user without REPLICATION grants, PostgreSQL
role without REPLICATION), a checkpoint the binlog no longer has (error 1236 -> invalidate everything covered,
restart from the current position), PostgreSQL tables without REPLICA IDENTITY FULL. The binlog-setting check
runs on real ``SHOW VARIABLES`` output of a session with ``SET SESSION binlog_format/binlog_row_image`` changed;
``log_bin=OFF`` and ``binlog_row_metadata=NO_LOG`` (global-only, the shared server must not change) and
``wal_level=replica`` (needs a server restart) are checked here on that output edited in memory, and on real
servers started with those settings in tests/test_cdc_private.py (private instances).
"""

from __future__ import annotations

import logging
import uuid
from pathlib import Path

import psycopg
import pytest

import cachesync
from cachesync.cdc import CdcConfigError
from cachesync.cdc.mysql import MySQLSource, check_settings
from cachesync.cdc.postgres import PostgresSource, check_wal_level
from cachesync.cli import main
from cachesync.db import connect
from cachesync.rules import Rules
from test_cdc_conformance import Env, tombstoned, wait_for
import test_cdc_mysql
import test_cdc_postgres
from test_cdc_mysql import server_id


def _vars(cur: object) -> dict[str, str]:
    cur.execute("SHOW VARIABLES WHERE Variable_name IN "  # type: ignore[attr-defined]
                "('log_bin','binlog_format','binlog_row_image','binlog_row_metadata')")
    return {k.lower(): v for k, v in cur.fetchall()}  # type: ignore[attr-defined]


def test_binlog_settings_check_on_real_show_variables(mysql_url: str) -> None:
    conn = connect(mysql_url)
    cur = conn.cursor()
    assert check_settings(_vars(cur)) == []
    cur.execute("SET SESSION binlog_format = 'MIXED'")
    cur.execute("SET SESSION binlog_row_image = 'MINIMAL'")
    problems = check_settings(_vars(cur))
    conn.close()
    assert any("binlog_format is 'MIXED', must be 'ROW'" in p for p in problems)
    assert any("binlog_row_image is 'MINIMAL', must be 'FULL'" in p for p in problems)
    off = check_settings({"log_bin": "OFF", "binlog_format": "ROW", "binlog_row_image": "FULL",
                          "binlog_row_metadata": "NO_LOG"})
    assert any(p.startswith("log_bin is 'OFF'") and "--log-bin" in p for p in off)
    assert any("binlog_row_metadata is 'NO_LOG'" in p and "UNKNOWN_COL" in p for p in off)


def test_wal_level_check() -> None:
    assert check_wal_level("logical") == []
    (p,) = check_wal_level("replica")
    assert "wal_level is 'replica', must be 'logical'" in p and "restart" in p


def test_mariadb_user_without_replication_grants(mysql_url: str) -> None:
    user = "cdcnp" + uuid.uuid4().hex[:8]
    conn = connect(mysql_url)
    cur = conn.cursor()
    cur.execute(f"CREATE USER '{user}'@'%' IDENTIFIED BY 'pw'")
    cur.execute(f"GRANT SELECT ON test.* TO '{user}'@'%'")
    try:
        url = mysql_url.replace("://root@", f"://{user}:pw@")
        with pytest.raises(CdcConfigError, match="lacks the privilege.*REPLICATION SLAVE") as ei:
            MySQLSource(url, server_id()).check()
        assert "pw@" not in str(ei.value)  # the password is never shown
    finally:
        cur.execute(f"DROP USER '{user}'@'%'")
        conn.close()


def test_postgres_role_without_replication(pg_url: str) -> None:
    role = "cdcnp" + uuid.uuid4().hex[:8]
    with psycopg.connect(pg_url, autocommit=True) as c:
        c.execute(f"CREATE ROLE {role} LOGIN")
    try:
        url = pg_url.replace("://root@", f"://{role}@")
        with pytest.raises(CdcConfigError, match="lacks the REPLICATION attribute"):
            PostgresSource(url, Rules({"t": ["k:{id}"]}), slot="x_" + role, publication="x_" + role).check()
    finally:
        with psycopg.connect(pg_url, autocommit=True) as c:
            c.execute(f"DROP ROLE {role}")


def test_cli_errors(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["cdc"]) == 2
    assert "needs --db-url and --rules" in capsys.readouterr().err
    rules = tmp_path / "r.toml"
    rules.write_text('[tables.t]\nkeys = ["k:{id}"]\n')
    assert main(["cdc", "--db-url", "sqlite:///x.db", "--rules", str(rules)]) == 2
    assert "mysql://, mariadb:// or postgresql://" in capsys.readouterr().err
    assert main(["cdc", "--db-url", "mysql://u:secret@127.0.0.1:1/test", "--rules", str(rules)]) != 0
    assert "secret" not in capsys.readouterr().err


class TestMariaDBPurgedPosition:
    def test_lost_position_invalidates_everything_and_restarts(self, mysql_url: str, redis_url: str,
                                                               namespace: str, tmp_path: Path) -> None:
        cache = cachesync.Cache(redis_url, namespace=namespace, tombstone_ttl=120)
        env = Env(test_cdc_mysql.TestMariaDBConformance(), mysql_url, cache, tmp_path)
        try:
            cache.set("u:5", "cached")
            cache.set("other:1", "not covered")
            # a GTID this server never wrote: the server answers error 1236 like for a purged binlog
            env.cp.save("mysql", MySQLSource(mysql_url, 1).ident, {"gtid": "0-4242-1", "file": "x", "pos": 4})
            r = env.start()
            env.wait_keys("u:5")
            assert r.stats["position_lost"] == 1
            assert cache.peek("other:1")["v"]  # type: ignore[index]
            env.write(f"INSERT INTO {env.table} VALUES (1, 'a@x', 'A')")
            env.wait_keys("u:1")
        finally:
            env.close()
            cache.close()


class TestPostgresWithoutReplicaIdentityFull:
    @pytest.mark.parametrize("mode", ["warn", "flush"])
    def test_missing_old_image(self, mode: str, pg_url: str, redis_url: str, namespace: str, tmp_path: Path,
                               caplog: pytest.LogCaptureFixture) -> None:
        suite = test_cdc_postgres.TestPostgresConformance()
        suite.prepare_table = lambda env: setattr(env, "slot", "cs_" + env.table) or  \
            setattr(env, "publication", "cs_" + env.table)  # type: ignore[method-assign]
        cache = cachesync.Cache(redis_url, namespace=namespace, tombstone_ttl=120)
        env = Env(suite, pg_url, cache, tmp_path)
        try:
            env.write(f"INSERT INTO {env.table} VALUES (1, 'a@x', 'A')")
            cache.set("e:a@x", "cached")
            with caplog.at_level(logging.WARNING, logger="cachesync.cdc"):
                env.runner_kw = {"on_missing_old_image": mode}
                r = env.start()
                assert "REPLICA IDENTITY FULL" in caplog.text
                env.write(f"UPDATE {env.table} SET email = 'b@x' WHERE id = 1")
                env.wait_keys("u:1", "e:b@x")
                wait_for(lambda: r.stats["missing_old_image"] >= 1, 5, "the missing old image to be counted")
            assert "cannot be invalidated" in caplog.text and "REPLICA IDENTITY FULL" in caplog.text
            if mode == "flush":
                assert tombstoned(cache, "e:a@x")
            else:
                assert (cache.peek("e:a@x") or {}).get("v")  # documented limitation, warned about
        finally:
            env.close()
            cache.close()
