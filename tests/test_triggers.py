"""Capture triggers (cachesync.outbox.triggers) on SQLite, PostgreSQL and MariaDB: the database records the
invalidations of every change of a ruled table, with the keys the application's rules compute."""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Iterator

import psycopg
import pytest

import cachesync
from cachesync.db import connect, dialect_of
from cachesync.outbox import Outbox, OutboxError, triggers
from cachesync.outbox.relay import Relay
from cachesync.rules import Rules
from test_cdc_conformance import Env
from test_cdc_postgres import menv  # noqa: F401 - fixture
from test_outbox import db_url, fill, invalidated, table  # noqa: F401 - fixtures

TEMPLATES = ["user:{id}", "user_by_email:{email}", "users:count"]


class Setup:
    def __init__(self, url: str, outbox_table: str) -> None:
        self.url = url
        self.app = "users_" + uuid.uuid4().hex[:8]
        self.rules = Rules({self.app: {"keys": TEMPLATES, "version": "version"}})
        self.ob = Outbox(outbox_table, rules=self.rules)
        self.conn = connect(url)
        self.sql(f"CREATE TABLE {self.app} (id INTEGER PRIMARY KEY, email VARCHAR(100), version INTEGER)")

    def sql(self, *stmts: str, rollback: bool = False) -> None:
        cur = self.conn.cursor()
        for s in stmts:
            cur.execute(s)
        self.conn.rollback() if rollback else self.conn.commit()
        cur.close()

    def rows(self) -> list[tuple[list[str], str | None]]:
        import json

        cur = self.conn.cursor()
        cur.execute(f"SELECT cache_keys, key_version FROM {self.ob.table} ORDER BY id")
        out = [(json.loads(k), v) for k, v in cur.fetchall()]
        self.conn.commit()
        cur.close()
        return out

    def close(self) -> None:
        try:
            triggers.uninstall(self.conn, self.ob)
        finally:
            self.sql(f"DROP TABLE IF EXISTS {self.app}")
            self.ob.drop(self.conn)
            self.conn.close()


@pytest.fixture
def setup(db_url: str, table: str) -> Iterator[Setup]:  # noqa: F811
    s = Setup(db_url, table)
    yield s
    s.close()


def test_changes_are_recorded_by_the_database_and_relayed(setup: Setup, cache: cachesync.Cache) -> None:
    assert triggers.install(setup.conn, setup.ob) == [setup.app]
    keys = ["user:1", "user:2", "user_by_email:a@x", "user_by_email:b@x", "user_by_email:c@x", "users:count"]
    fill(cache, *keys, "user:3")
    a = setup.app
    setup.sql(f"INSERT INTO {a} VALUES (1, 'a@x', 1)", f"INSERT INTO {a} VALUES (2, 'c@x', 1)")
    setup.sql(f"UPDATE {a} SET email = 'b@x', version = 2 WHERE id = 1")  # key column change: old and new
    setup.sql(f"DELETE FROM {a} WHERE id = 2")
    setup.sql(f"UPDATE {a} SET version = 9 WHERE id = 1", rollback=True)  # rolled back: nothing
    rows = setup.rows()
    assert [(sorted(set(k)), v) for k, v in rows] == [
        (["user:1", "user_by_email:a@x", "users:count"], "1"),
        (["user:2", "user_by_email:c@x", "users:count"], "1"),
        (["user:1", "user_by_email:a@x", "user_by_email:b@x", "users:count"], "2"),
        (["user:2", "user_by_email:c@x", "users:count"], "1"),
    ]
    relay = Relay(setup.url, cache, table=setup.ob.table)
    assert relay.drain() == 4
    relay.close()
    assert all(invalidated(cache, k) for k in keys)
    assert not invalidated(cache, "user:3")
    assert setup.ob.pending(setup.conn) == 0


def test_bulk_statements_record_every_row(setup: Setup) -> None:
    triggers.install(setup.conn, setup.ob)
    a = setup.app
    setup.sql(*(f"INSERT INTO {a} VALUES ({i}, 'e{i}@x', 1)" for i in range(1, 6)))
    n0 = len(setup.rows())
    setup.sql(f"UPDATE {a} SET version = version + 1 WHERE id <= 3")
    setup.sql(f"DELETE FROM {a} WHERE id > 3")
    rows = setup.rows()[n0:]
    assert sorted(k[0] for k, _ in rows[:3]) == ["user:1", "user:2", "user:3"]
    assert all(v == "2" for _, v in rows[:3])
    assert sorted(k[0] for k, _ in rows[3:]) == ["user:4", "user:5"]


VALUES = ["plain", "it's", "back\\slash", "percent %s", "brace {x}", "ünïcödé ✓", "tab\tin", None]


def test_keys_match_the_python_rules(setup: Setup) -> None:
    """Whatever the value, the key the database computes is the key Rules computes in Python."""
    triggers.install(setup.conn, setup.ob)
    a = setup.app
    cur = setup.conn.cursor()
    ph = dialect_of(setup.url).placeholder
    for i, v in enumerate(VALUES, 1):
        cur.execute(f"INSERT INTO {a} VALUES ({ph}, {ph}, 1)", (i * 1000003, v))
    setup.conn.commit()
    rows = setup.rows()
    for (keys, _), (i, v) in zip(rows, enumerate(VALUES, 1), strict=True):
        expected = setup.rules.keys_for(a, None, {"id": i * 1000003, "email": v})
        assert keys == expected


def test_status_names_the_captured_tables(setup: Setup) -> None:
    triggers.install(setup.conn, setup.ob)
    st = setup.ob.status(setup.conn)
    assert st["capture_triggers"] == [setup.app]
    assert st["notify_trigger"] is (True if dialect_of(setup.url).name == "postgresql" else None)
    triggers.uninstall(setup.conn, setup.ob)
    assert setup.ob.status(setup.conn)["capture_triggers"] == []


def test_uninstall_stops_recording(setup: Setup) -> None:
    triggers.install(setup.conn, setup.ob)
    setup.sql(f"INSERT INTO {setup.app} VALUES (1, 'a@x', 1)")
    assert triggers.uninstall(setup.conn, setup.ob) == [setup.app]
    triggers.uninstall(setup.conn, setup.ob)  # idempotent
    setup.sql(f"INSERT INTO {setup.app} VALUES (2, 'b@x', 1)")
    assert len(setup.rows()) == 1


def test_install_is_idempotent(setup: Setup) -> None:
    triggers.install(setup.conn, setup.ob)
    triggers.install(setup.conn, setup.ob)
    setup.sql(f"INSERT INTO {setup.app} VALUES (1, 'a@x', 1)")
    assert len(setup.rows()) == 1  # one trigger, not two


BAD_TYPE = {"sqlite": "REAL", "postgresql": "TIMESTAMP", "mysql": "DATETIME"}


def test_what_cannot_be_formatted_like_python_is_refused(db_url: str, table: str) -> None:  # noqa: F811
    d = dialect_of(db_url)
    app = "bad_" + uuid.uuid4().hex[:8]
    conn = connect(db_url)
    cur = conn.cursor()
    cur.execute(f"CREATE TABLE {app} (id INTEGER PRIMARY KEY, at {BAD_TYPE[d.name]}, email VARCHAR(10))")
    conn.commit()
    try:
        def refused(rules: dict, match: str, **kw: object) -> None:
            with pytest.raises(OutboxError, match=match):
                triggers.install(conn, Outbox(table, rules=Rules(rules)), **kw)

        refused({app: ["k:{at}"]}, "column 'at' of key template 'k:.at.' has type")
        refused({app: ["k:{id:05d}"]}, "format spec or conversion")
        refused({app: ["k:{nope}"]}, "has no column 'nope'")
        refused({app: {"keys": ["k:{id}"], "version": "v"}}, "no version column 'v'")
        refused({"missing_" + app: ["k:{id}"]}, "does not exist")
        refused({app: ["k:{id}"]}, "no rule for table", tables=["other"])
        refused({app: ["k:{id}"]}, "trigger target 'x'", target="x")
        refused({"bad-name": ["k:{id}"]}, "plain identifier")
        if d.name != "postgresql":
            refused({app: ["k:{id}"]}, "trigger target 'wal' writes PostgreSQL WAL", target="wal")
        with pytest.raises(OutboxError, match="need rules"):
            triggers.install(conn, Outbox(table))
        # a refused table among good ones: nothing is installed
        good = "good_" + uuid.uuid4().hex[:8]
        cur.execute(f"CREATE TABLE {good} (id INTEGER PRIMARY KEY)")
        conn.commit()
        ob = Outbox(table, rules=Rules({good: ["g:{id}"], app: ["k:{at}"]}))
        with pytest.raises(OutboxError):
            triggers.install(conn, ob)
        ob.init(conn)
        cur.execute(f"INSERT INTO {good} VALUES (1)")
        conn.commit()
        assert ob.pending(conn) == 0
        cur.execute(f"DROP TABLE {good}")
        ob.drop(conn)
    finally:
        cur.execute(f"DROP TABLE IF EXISTS {app}")
        conn.commit()
        conn.close()


def test_cli_prints_installs_and_drops(setup: Setup, tmp_path) -> None:
    rules = tmp_path / "rules.toml"
    rules.write_text(f'[tables.{setup.app}]\nkeys = ["user:{{id}}"]\n')
    base = [sys.executable, "-m", "cachesync", "outbox", "triggers", "--db-url", setup.url, "--rules", str(rules),
            "--table", setup.ob.table]

    def run(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run(base + list(extra), capture_output=True, text=True, timeout=60)

    p = run("--print")
    assert p.returncode == 0 and "CREATE TRIGGER" in p.stdout, p.stderr  # printed, nothing created
    p = run()
    assert p.returncode == 0 and setup.app in p.stdout, p.stderr
    setup.sql(f"INSERT INTO {setup.app} VALUES (1, 'a@x', 1)")
    assert [k for k, _ in setup.rows()] == [["user:1"]]
    p = run("--drop")
    assert p.returncode == 0, p.stderr
    setup.sql(f"INSERT INTO {setup.app} VALUES (2, 'b@x', 1)")
    assert len(setup.rows()) == 1
    p = subprocess.run(base[:-4] + ["--table", setup.ob.table], capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "--rules is required" in p.stderr


# ---------------------------------------------------------------------------- PostgreSQL specifics


def test_pg_fast_path_carries_trigger_rows(pg_url: str, table: str, cache: cachesync.Cache) -> None:  # noqa: F811
    s = Setup(pg_url, table)
    try:
        triggers.install(s.conn, s.ob)
        fill(cache, "user:1", "user_by_email:a@x")
        relay = Relay(pg_url, cache, table=table)
        relay._db()  # LISTEN before the write
        s.sql(f"INSERT INTO {s.app} VALUES (1, 'a@x', 1)")
        assert relay.apply_notified(timeout=10) == 1  # applied from the notification, before any claim
        assert invalidated(cache, "user:1") and invalidated(cache, "user_by_email:a@x")
        assert relay.drain() == 1 and relay.stats["skipped"] == 1
        relay.close()
    finally:
        s.close()


def test_pg_outbox_without_notify_trigger(pg_url: str, table: str, cache: cachesync.Cache) -> None:  # noqa: F811
    ob = Outbox(table)
    with psycopg.connect(pg_url) as c:
        ob.init(c, notify=False)
        has = "SELECT count(*) FROM pg_trigger WHERE tgname = %s"
        assert c.execute(has, (table + "_notify",)).fetchone()[0] == 0
        relay = Relay(pg_url, cache, table=table)  # a relay starting does not put the trigger back
        relay._db()
        assert c.execute(has, (table + "_notify",)).fetchone()[0] == 0
        assert ob.status(c)["notify_trigger"] is False
        ob.record(c, "k:1")
        c.commit()
        assert relay.drain() == 1  # found by the claim (polling)
        relay.close()
        ob.init(c)  # default: NOTIFY on
        assert c.execute(has, (table + "_notify",)).fetchone()[0] == 1
        c.commit()
        ob.drop(c)


def test_pg_wal_target_through_cdc(menv: Env) -> None:  # noqa: F811
    menv.start()
    app = "trg_" + uuid.uuid4().hex[:8]
    menv.write(f"CREATE TABLE {app} (id INTEGER PRIMARY KEY, email TEXT, version BIGINT)")
    ob = Outbox(message_prefix=menv.prefix,  # type: ignore[attr-defined]
                rules=Rules({app: {"keys": ["w:{id}", "we:{email}"], "version": "version"}}))
    try:
        triggers.install(menv.conn, ob, target="wal")
        menv.write(f"INSERT INTO {app} VALUES (1, 'a@x', 1)", f"UPDATE {app} SET email = 'b@x' WHERE id = 1")
        menv.write(f"INSERT INTO {app} VALUES (2, 'r@x', 1)", rollback=True)
        menv.write(f"INSERT INTO {app} VALUES (3, 'z@x', 1)")
        menv.wait_keys("w:1", "we:a@x", "we:b@x", "w:3")
        assert menv.cache.peek("w:2") is None
    finally:
        triggers.uninstall(menv.conn, ob)
        menv.write(f"DROP TABLE {app}")


def test_pg_truncate_invalidates_every_key_of_the_templates(pg_url: str, table: str,  # noqa: F811
                                                            cache: cachesync.Cache) -> None:
    """TRUNCATE fires no row trigger: a statement trigger records the table's key prefixes; the relay invalidates
    every key with them that Redis holds (rows or not), and nothing else."""
    s = Setup(pg_url, table)
    try:
        triggers.install(s.conn, s.ob)
        s.sql(f"INSERT INTO {s.app} VALUES (1, 'a@x', 1), (2, 'b@x', 1)")
        relay = Relay(pg_url, cache, table=table)
        relay.drain()
        keys = ["user:1", "user:2", "user:999", "user_by_email:a@x", "users:count"]
        fill(cache, *keys, "other:1")
        s.sql(f"TRUNCATE {s.app}")
        assert [k for k, _ in s.rows()][-1] == {"prefixes": ["user:", "user_by_email:", "users:count"]}
        assert relay.drain() == 1
        assert all(invalidated(cache, k) for k in keys)
        assert not invalidated(cache, "other:1")
        relay.close()
        bus_only = Relay(pg_url, None, table=table, bus=open_bus_for_test(), apply=False)
        s.sql(f"TRUNCATE {s.app}")
        assert bus_only.drain() == 1 and bus_only.stats["parked"] == 1  # no cache to find the keys: parked
        st = s.ob.status(s.conn)
        assert st["parked"] == 1
        bus_only.bus.destroy()  # type: ignore[union-attr]
        bus_only.close()
    finally:
        s.close()


def open_bus_for_test():  # a real Redis Streams bus with a private stream
    import os

    from cachesync.bus import open_bus

    url = os.environ.get("CACHESYNC_TEST_REDIS_URL") or "redis://127.0.0.1:6379/15"
    return open_bus(url, "cstrg" + uuid.uuid4().hex[:8])


def test_pg_wal_target_truncate_through_cdc(menv: Env) -> None:  # noqa: F811
    app = "trg_" + uuid.uuid4().hex[:8]
    menv.write(f"CREATE TABLE {app} (id INTEGER PRIMARY KEY, email TEXT, version BIGINT)")
    ob = Outbox(message_prefix=menv.prefix,  # type: ignore[attr-defined]
                rules=Rules({app: {"keys": ["wt:{id}"], "version": "version"}}))
    try:
        triggers.install(menv.conn, ob, target="wal")
        menv.cache.set("wt:1", "cached")
        menv.cache.set("wt:77", "cached")
        menv.start()
        menv.write(f"TRUNCATE {app}")
        menv.wait_keys("wt:1", "wt:77")
    finally:
        triggers.uninstall(menv.conn, ob)
        menv.write(f"DROP TABLE {app}")
