"""The consistency auditor against real Redis and SQLite, PostgreSQL and MariaDB."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections.abc import Iterator

import pytest

import cachesync
from cachesync.audit import AuditError, Auditor
from cachesync.db import connect, dialect_of
from cachesync.protocol import NOT_FOUND, Versioned
from cachesync.rules import Rules
from test_outbox import db_url  # noqa: F401 - fixture


class World:
    def __init__(self, url: str, cache: cachesync.Cache) -> None:
        self.url, self.cache = url, cache
        self.table = "aud_" + uuid.uuid4().hex[:8]
        self.rules = Rules({self.table: {"keys": ["u:{id}", "ue:{email}", "users:count"], "version": "version"}})
        self.conn = connect(url)
        self.ph = dialect_of(url).placeholder
        self.sql(f"CREATE TABLE {self.table} (id INTEGER PRIMARY KEY, email VARCHAR(100), version INTEGER)")

    def sql(self, stmt: str, *params: object) -> None:
        cur = self.conn.cursor()
        cur.execute(stmt.replace("?", self.ph), params)
        self.conn.commit()
        cur.close()

    def row(self, id_: int) -> tuple[str, int] | None:
        cur = self.conn.cursor()
        cur.execute(f"SELECT email, version FROM {self.table} WHERE id = {self.ph}", (id_,))
        r = cur.fetchone()
        self.conn.commit()
        cur.close()
        return None if r is None else (r[0], r[1])

    def load(self, id_: int) -> None:
        """A reader's cache-aside fill of u:<id> with the row's version."""
        def loader() -> object:
            r = self.row(id_)
            return NOT_FOUND if r is None else Versioned({"email": r[0]}, r[1])
        self.cache.get(f"u:{id_}", loader)

    def auditor(self, **kw: object) -> Auditor:
        kw.setdefault("grace", 0)
        return Auditor(self.cache, self.url, self.rules, **kw)  # type: ignore[arg-type]

    def close(self) -> None:
        self.sql(f"DROP TABLE IF EXISTS {self.table}")
        self.conn.close()


@pytest.fixture
def world(db_url: str, cache: cachesync.Cache) -> Iterator[World]:  # noqa: F811
    w = World(db_url, cache)
    yield w
    w.close()


def test_consistent_cache_has_no_findings(world: World) -> None:
    for i in range(1, 4):
        world.sql(f"INSERT INTO {world.table} VALUES (?, ?, 1)", i, f"e{i}@x")
        world.load(i)
    world.cache.set("users:count", 3)  # an aggregate key: not audited by version
    world.cache.set("other:1", "x")  # no rule: unmatched
    r = world.auditor().run()
    assert r.ok and r.stale == [] and r.consistent == 3
    assert r.unmatched == 2 and r.scanned == 5


def test_lost_invalidation_deleted_row_and_negative_entry_are_found(world: World) -> None:
    t = world.table
    for i in (1, 2):
        world.sql(f"INSERT INTO {t} VALUES (?, ?, 1)", i, f"e{i}@x")
        world.load(i)
    world.load(3)  # no row: a negative entry
    world.sql(f"UPDATE {t} SET email = 'new@x', version = 2 WHERE id = 1")  # the invalidation is lost
    world.sql(f"DELETE FROM {t} WHERE id = 2")  # same
    world.sql(f"INSERT INTO {t} VALUES (3, 'late@x', 1)")  # same
    r = world.auditor().run()
    got = {(f.key, f.kind, f.cached_version, f.db_version) for f in r.stale}
    assert got == {("u:1", "stale", 1, 2), ("u:2", "deleted", 1, None), ("u:3", "negative_but_exists", None, 1)}
    assert not r.ok and r.transient == 0


def test_invalidation_in_flight_is_transient(world: World) -> None:
    """A finding whose invalidation lands during the grace is not reported (forced with the recheck hook)."""
    t = world.table
    world.sql(f"INSERT INTO {t} VALUES (1, 'a@x', 1)")
    world.load(1)
    world.sql(f"UPDATE {t} SET version = 2 WHERE id = 1")
    r = world.auditor(on_recheck=lambda: world.cache.invalidate("u:1", version=2)).run()
    assert r.ok and r.transient == 1


def test_finding_that_persists_through_the_grace_is_reported(world: World) -> None:
    t = world.table
    world.sql(f"INSERT INTO {t} VALUES (1, 'a@x', 1)")
    world.load(1)
    world.sql(f"UPDATE {t} SET version = 3 WHERE id = 1")
    r = world.auditor(on_recheck=lambda: None).run()
    assert [(f.key, f.kind) for f in r.stale] == [("u:1", "stale")]


def test_repair_invalidates_with_the_row_version(world: World) -> None:
    t = world.table
    world.sql(f"INSERT INTO {t} VALUES (1, 'a@x', 1)")
    world.load(1)
    world.sql(f"UPDATE {t} SET version = 2 WHERE id = 1")
    r = world.auditor().run(repair=True)
    assert r.repaired == ["u:1"]
    e = world.cache.peek("u:1")
    assert e is not None and "v" not in e  # invalidated
    # the version floor refuses an old write-back; a fresh load is consistent again
    world.load(1)
    assert world.auditor().run().ok


def test_repair_of_an_entry_ahead_of_its_row_lets_the_row_be_cached_again(world: World) -> None:
    """A cached version newer than the row's (a write-through set whose transaction rolled back): repaired, the
    row's own version is the floor, so the next read caches the row (the phantom version must not stay the floor,
    refusing every fill as older until the tombstone expires)."""
    t = world.table
    world.sql(f"INSERT INTO {t} VALUES (1, 'a@x', 1)")
    world.cache.set("u:1", {"email": "rolled-back@x"}, version=5)
    r = world.auditor().run(repair=True)
    assert [(f.key, f.kind, f.cached_version, f.db_version) for f in r.stale] == [("u:1", "ahead", 5, 1)]
    assert r.repaired == ["u:1"]
    refused = world.cache.stats["fills_refused_older"]
    world.load(1)
    assert world.cache.stats["fills_refused_older"] == refused
    e = world.cache.peek("u:1")
    assert e is not None and e.get("ver") == b"1" and "v" in e
    assert world.cache.get("u:1", lambda: pytest.fail("the repaired row is cached")) == {"email": "a@x"}
    assert world.auditor().run().ok


def test_pattern_limit_and_email_template(world: World) -> None:
    t = world.table
    for i in range(1, 6):
        world.sql(f"INSERT INTO {t} VALUES (?, ?, 1)", i, f"e{i}@x")
        world.load(i)
    world.cache.get("ue:e1@x", lambda: Versioned("x", 1))
    world.sql(f"UPDATE {t} SET version = 2")
    r = world.auditor().run(pattern="ue:*")
    assert r.scanned == 1 and [f.key for f in r.stale] == ["ue:e1@x"]
    assert world.auditor().run(limit=2).scanned == 2


def test_bad_input_is_named(world: World) -> None:
    with pytest.raises(AuditError, match="no rule has a version column"):
        Auditor(world.cache, world.url, Rules({"t": ["k:{id}"]}))
    with pytest.raises(AuditError, match="two fields with no text between"):
        Auditor(world.cache, world.url, Rules({"t": {"keys": ["{a}{b}"], "version": "v"}}))
    with pytest.raises(AuditError, match="format spec"):
        Auditor(world.cache, world.url, Rules({"t": {"keys": ["k:{id:05d}"], "version": "v"}}))
    with pytest.raises(AuditError, match="'grace': must be"):
        world.auditor(grace=-1)
    with pytest.raises(AuditError, match="'limit': must be"):
        world.auditor().run(limit=0)


def test_cli_reports_and_exits_1_on_findings(world: World, tmp_path, redis_url: str) -> None:
    t = world.table
    world.sql(f"INSERT INTO {t} VALUES (1, 'a@x', 1)")
    world.load(1)
    rules = tmp_path / "rules.toml"
    rules.write_text(f'[tables.{t}]\nkeys = ["u:{{id}}"]\nversion = "version"\n')
    cmd = [sys.executable, "-m", "cachesync", "audit", "--redis-url", redis_url, "--namespace",
           world.cache.ctx.ns, "--db-url", world.url, "--rules", str(rules), "--grace", "0", "--json"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["consistent"] == 1
    world.sql(f"UPDATE {t} SET version = 2 WHERE id = 1")
    p = subprocess.run(cmd[:-1], capture_output=True, text=True, timeout=60)
    assert p.returncode == 1 and "stale" in p.stdout and "u:1" in p.stdout, p.stdout + p.stderr
    no_rules = [a for i, a in enumerate(cmd) if a != "--rules" and cmd[i - 1] != "--rules"]
    p = subprocess.run(no_rules, capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "--rules is required" in p.stderr


def test_value_marked_stale_by_serve_stale_is_not_a_finding(world: World, redis_url: str) -> None:
    ss = cachesync.Cache(redis_url, namespace=world.cache.ctx.ns, serve_stale=True)
    try:
        world.sql(f"INSERT INTO {world.table} VALUES (1, 'a@x', 1)")
        world.load(1)
        world.sql(f"UPDATE {world.table} SET version = 2 WHERE id = 1")
        ss.invalidate("u:1", version=2)  # keeps the old value, marked stale, for serve-stale readers
        e = world.cache.peek("u:1")
        assert e is not None and "v" in e
        r = world.auditor().run()
        assert r.ok and r.empty == 1
    finally:
        ss.close()


def test_loader_judges_entries_no_versioned_rule_covers(world: World) -> None:
    """With the application's loader, values cached without a version (or under keys no rule names) are
    compared by value, through the serializer's round trip (which gives back tuples as tuples)."""
    db = {"cfg:a": {"x": (1, 2)}, "cfg:b": {"x": 1}, "cfg:d": None, "cfg:n": {"late": True}}

    def loader(key: str) -> object:
        v = db.get(key)
        return NOT_FOUND if v is None else v

    for k in ("cfg:a", "cfg:b", "cfg:d", "cfg:n"):
        world.cache.get(k, lambda k=k: NOT_FOUND if k == "cfg:n" else {"x": (1, 2)} if k == "cfg:a" else {"x": 1})
    db["cfg:b"] = {"x": 2}  # changed, the invalidation lost
    r = Auditor(world.cache, loader=loader, grace=0).run(pattern="cfg:*")
    got = {(f.key, f.kind) for f in r.stale}
    assert got == {("cfg:b", "value_differs"), ("cfg:d", "deleted"), ("cfg:n", "negative_but_exists")}
    assert r.consistent == 1  # cfg:a
    # both at once: rule tables by version, the rest by the loader
    world.sql(f"INSERT INTO {world.table} VALUES (1, 'a@x', 1)")
    world.load(1)
    r = Auditor(world.cache, world.url, world.rules, loader=loader, grace=0).run()
    assert {f.key for f in r.stale} == {"cfg:b", "cfg:d", "cfg:n"} and r.unmatched == 0


def test_loader_errors_and_usage_are_named(world: World) -> None:
    with pytest.raises(AuditError, match="needs rules"):
        Auditor(world.cache)
    with pytest.raises(AuditError, match="give db_url"):
        Auditor(world.cache, None, world.rules)
    world.cache.set("boom:1", "x")

    def bad(key: str) -> object:
        raise RuntimeError("db down")

    with pytest.raises(AuditError, match="loader failed for key 'boom:1'"):
        Auditor(world.cache, loader=bad, grace=0).run(pattern="boom:*")


def test_cli_loader(world: World, tmp_path, redis_url: str) -> None:
    (tmp_path / "myloader.py").write_text("def load(key):\n    return {'k': key}\n")
    world.cache.set("ld:1", {"k": "ld:1"})
    world.cache.set("ld:2", {"k": "other"})
    env = {**__import__("os").environ, "PYTHONPATH": str(tmp_path)}
    cmd = [sys.executable, "-m", "cachesync", "audit", "--redis-url", redis_url, "--namespace",
           world.cache.ctx.ns, "--loader", "myloader:load", "--pattern", "ld:*", "--grace", "0", "--json"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env)
    assert p.returncode == 1, p.stderr
    doc = json.loads(p.stdout)
    assert [f["key"] for f in doc["stale"]] == ["ld:2"] and doc["consistent"] == 1
    p = subprocess.run(cmd[:-7] + ["--loader", "nope:load"], capture_output=True, text=True, timeout=60, env=env)
    assert p.returncode == 2 and "cannot be imported" in p.stderr


def test_overlapping_templates_judge_a_key_by_its_most_specific_template(world: World) -> None:
    """``u:{id}`` also matches ``u:1:p`` (id = "1:p"): the key of a child table's template ``u:{id}:p`` must be
    judged against that table's row, not the parent's (MariaDB casts '1:p' to 1 and finds the parent's row 1,
    whose version can equal the stale cached one: a stale entry reported consistent)."""
    child = world.table + "_p"
    world.sql(f"CREATE TABLE {child} (id INTEGER PRIMARY KEY, version INTEGER)")
    try:
        world.sql(f"INSERT INTO {world.table} VALUES (1, 'a@x', 1)")
        world.sql(f"INSERT INTO {child} VALUES (1, 2)")  # the child row is at version 2
        world.cache.get("u:1:p", lambda: Versioned("old profile", 1))  # cached at version 1: stale
        rules = Rules({world.table: {"keys": ["u:{id}"], "version": "version"},
                       child: {"keys": ["u:{id}:p"], "version": "version"}})
        r = Auditor(world.cache, world.url, rules, grace=0).run()
        assert [(f.key, f.kind, f.table, f.db_version) for f in r.stale] == [("u:1:p", "stale", child, 2)]
    finally:
        world.sql(f"DROP TABLE IF EXISTS {child}")


def test_a_key_whose_field_the_column_type_refuses_does_not_stop_the_audit(world: World) -> None:
    """``u:abc`` matches ``u:{id}`` but 'abc' is no INTEGER: PostgreSQL refuses the SELECT (the whole audit
    failed). No row can have that id: a value cached there is ``deleted``, as SQLite and MariaDB answer; the audit
    of the others goes on and still finds the stale ``u:1``."""
    world.sql(f"INSERT INTO {world.table} VALUES (1, 'a@x', 1)")
    world.load(1)
    world.sql(f"UPDATE {world.table} SET version = 2 WHERE id = 1")  # a lost invalidation: u:1 is stale
    world.cache.set("u:abc", "not a row's entry")
    r = world.auditor().run()
    assert sorted((f.key, f.kind) for f in r.stale) == [("u:1", "stale"), ("u:abc", "deleted")]
