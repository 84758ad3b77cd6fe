"""Outbox + relay end to end on SQLite, PostgreSQL and MariaDB (real servers, no mocks)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator

import pytest

import cachesync
from cachesync.db import connect
from cachesync.outbox import Outbox, OutboxError
from cachesync.outbox.relay import Relay
from cachesync.rules import Rules


def wait_for(cond, timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.01)


@pytest.fixture(params=["sqlite", "postgresql", "mysql"])
def db_url(request, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/t.db"
    return request.getfixturevalue("pg_url" if request.param == "postgresql" else "mysql_url")


@pytest.fixture
def table() -> str:
    return "cachesync_outbox_" + uuid.uuid4().hex[:10]


@pytest.fixture
def outbox(db_url: str, table: str) -> Iterator[Outbox]:
    ob = Outbox(table)
    conn = connect(db_url)
    ob.init(conn)
    yield ob
    ob.drop(conn)
    conn.close()


@pytest.fixture
def app_table(db_url: str) -> Iterator[str]:
    name = "users_" + uuid.uuid4().hex[:8]
    conn = connect(db_url)
    cur = conn.cursor()
    cur.execute(f"CREATE TABLE {name} (id INTEGER PRIMARY KEY, email VARCHAR(100), version INTEGER)")
    conn.commit()
    yield name
    cur.execute(f"DROP TABLE IF EXISTS {name}")
    conn.commit()
    conn.close()


def fill(cache: cachesync.Cache, *keys: str) -> None:
    for k in keys:
        cache.set(k, "cached")


def invalidated(cache: cachesync.Cache, key: str) -> bool:
    e = cache.peek(key)
    return e is not None and "ti" in e and "v" not in e


def test_commit_invalidates_via_relay(db_url, outbox, app_table, cache):
    fill(cache, "user:1", "user:2")
    conn = connect(db_url)
    cur = conn.cursor()
    cur.execute(f"INSERT INTO {app_table} (id, email, version) VALUES (1, 'a@x', 1)")
    outbox.record(conn, "user:1", version=1)
    conn.commit()
    relay = Relay(db_url, cache, table=outbox.table)
    assert relay.drain() == 1
    assert invalidated(cache, "user:1")
    assert cache.peek("user:2")["v"]
    assert outbox.pending(conn) == 0
    relay.close()
    conn.close()


def test_rollback_records_nothing(db_url, outbox, app_table, cache):
    fill(cache, "user:1")
    conn = connect(db_url)
    cur = conn.cursor()
    cur.execute(f"INSERT INTO {app_table} (id, email, version) VALUES (1, 'a@x', 1)")
    outbox.record(conn, "user:1")
    conn.rollback()
    assert outbox.pending(conn) == 0
    relay = Relay(db_url, cache, table=outbox.table)
    assert relay.drain() == 0
    assert cache.peek("user:1")["v"]
    relay.close()
    conn.close()


def test_key_column_change_invalidates_old_and_new_and_fans_out(db_url, table, cache):
    rules = Rules({"users": ["user:{id}", "user_by_email:{email}", "users:count"]})
    ob = Outbox(table, rules=rules)
    conn = connect(db_url)
    ob.init(conn)
    keys = ["user:1", "user_by_email:old@x", "user_by_email:new@x", "users:count"]
    fill(cache, *keys, "user:2")
    got = ob.record_change(conn, "users", {"id": 1, "email": "old@x"}, {"id": 1, "email": "new@x"})
    assert sorted(got) == sorted(keys)
    assert ob.record_change(conn, "not_ruled", None, {"id": 1}) == []
    conn.commit()
    relay = Relay(db_url, cache, table=table)
    assert relay.drain() == 1
    assert all(invalidated(cache, k) for k in keys)
    assert not invalidated(cache, "user:2")
    relay.close()
    ob.drop(conn)
    conn.close()


def test_delayed_double_delete_is_durable(db_url, outbox, cache):
    conn = connect(db_url)
    outbox.record(conn, "k:1", again_after=3600)  # the second delete is far in the future
    conn.commit()
    fill(cache, "k:1")
    r1 = Relay(db_url, cache, table=outbox.table)
    assert r1.drain() == 1
    assert invalidated(cache, "k:1")
    assert outbox.pending(conn) == 1  # the delayed row waits, durably
    r1.close()  # "crash": a new relay takes over
    fill(cache, "k:1")  # a stale value written back between the two deletes
    cur = conn.cursor()
    cur.execute(f"UPDATE {outbox.table} SET run_at = 1")  # its time has come
    conn.commit()
    r2 = Relay(db_url, cache, table=outbox.table)
    assert r2.drain() == 1
    assert invalidated(cache, "k:1")
    assert outbox.pending(conn) == 0
    r2.close()
    conn.close()


def test_delayed_row_runs_when_due(db_url, outbox, cache):
    conn = connect(db_url)
    outbox.record(conn, "k:2", delay=0.2)
    conn.commit()
    fill(cache, "k:2")
    stop = threading.Event()
    relay = Relay(db_url, cache, table=outbox.table)
    t = threading.Thread(target=relay.run, args=(stop,))
    t.start()
    try:
        wait_for(lambda: invalidated(cache, "k:2"), what="the delayed invalidation")
    finally:
        stop.set()
        t.join()
    conn.close()


def test_bad_input_is_named(db_url):
    with pytest.raises(OutboxError, match="table name"):
        Outbox("bad name; drop")
    ob = Outbox()
    conn = connect(db_url)
    with pytest.raises(OutboxError, match="at least one"):
        ob.record(conn)
    with pytest.raises(OutboxError, match="again_after"):
        ob.record(conn, "k", again_after=-1)
    with pytest.raises(cachesync.InvalidKeyError):
        ob.record(conn, "")
    with pytest.raises(OutboxError, match="rules"):
        ob.record_change(conn, "users", None, {"id": 1})
    conn.close()


def test_several_relays_share_the_work(db_url, outbox, cache):
    if db_url.startswith("sqlite"):
        pass  # SQLite relays share through the lease column
    conn = connect(db_url)
    n = 600
    for i in range(0, n, 100):
        for j in range(i, i + 100):
            outbox.record(conn, f"s:{j}")
        conn.commit()
    done = []
    lock = threading.Lock()
    relays = [Relay(db_url, cache, table=outbox.table, batch_size=20,
                    on_batch=lambda k, r=r: (lock.acquire(), done.append((r, k)), lock.release()))
              for r in range(3)]
    stop = threading.Event()
    ts = [threading.Thread(target=r.run, args=(stop,)) for r in relays]
    for t in ts:
        t.start()
    try:
        wait_for(lambda: outbox.pending(conn) == 0, what="an empty outbox")
    finally:
        stop.set()
        for t in ts:
            t.join()
    assert sum(k for _, k in done) == n  # each row delivered once when no relay crashed
    assert all(invalidated(cache, f"s:{j}") for j in range(0, n, 37))
    conn.close()


# ---------------------------------------------------------------- Redis unreachable (a private redis-server)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PrivateRedis:
    """A redis-server of our own (never the shared one on 6379), stopped and restarted by the test."""

    def __init__(self) -> None:
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="cs-redis-")
        self.proc: subprocess.Popen | None = None
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            pytest.skip("redis-server not installed")
        self.proc = subprocess.Popen([exe, "--port", str(self.port), "--save", "", "--appendonly", "no",
                                      "--dir", self.dir], stdout=subprocess.DEVNULL)
        import redis

        def up() -> bool:
            try:
                return bool(redis.Redis(port=self.port).ping())
            except redis.ConnectionError:
                return False

        wait_for(up, 10, "private redis-server")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def private_redis() -> Iterator[PrivateRedis]:
    pr = PrivateRedis()
    pr.start()
    yield pr
    pr.close()


def test_redis_unreachable_then_back(db_url, outbox, private_redis, namespace):
    cache = cachesync.Cache(private_redis.url, namespace=namespace, tombstone_ttl=600, socket_timeout=0.5,
                            connect_timeout=0.5)
    failed = threading.Event()
    relay = Relay(db_url, cache, table=outbox.table, max_backoff=0.2, on_error=lambda e: failed.set())
    stop = threading.Event()
    private_redis.stop()
    t = threading.Thread(target=relay.run, args=(stop,))
    t.start()
    try:
        conn = connect(db_url)
        for i in range(300):
            outbox.record(conn, f"u:{i}", f"v:{i}", version=i + 1)
            if i % 50 == 49:
                conn.commit()
        conn.commit()
        failed.wait(30)
        assert failed.is_set()
        assert outbox.pending(conn) == 300  # nothing lost while Redis is down
        private_redis.start()
        wait_for(lambda: outbox.pending(conn) == 0, what="the relay to drain after Redis came back")
    finally:
        stop.set()
        t.join()
    assert all(invalidated(cache, f"u:{i}") and invalidated(cache, f"v:{i}") for i in range(300))
    assert cache.peek("u:7")["fl"] == b"8" or cache.peek("u:7")["fl"] in ("8", 8)
    cache.close()
    conn.close()


def test_unusable_row_is_parked_and_status_reports_it(db_url, outbox, cache):
    conn = connect(db_url)
    cur = conn.cursor()
    d = outbox._dialect(conn)
    cur.execute(d.sql(f"INSERT INTO {outbox.table} (cache_keys) VALUES (?)"), ("not json",))
    outbox.record(conn, "user:5")
    outbox.record(conn, "user:6", delay=3600)
    conn.commit()
    fill(cache, "user:5")
    st = outbox.status(conn)
    assert (st["pending"], st["due"], st["delayed"], st["parked"]) == (3, 2, 1, 0)
    assert st["oldest_age_s"] is not None and st["oldest_age_s"] >= 0
    relay = Relay(db_url, cache, table=outbox.table)
    assert relay.drain() == 2  # the good row and the parked one
    relay.close()
    assert invalidated(cache, "user:5")
    st = outbox.status(conn)
    assert (st["pending"], st["due"], st["delayed"], st["parked"], st["retrying"]) == (1, 0, 1, 1, 0)
    cur.execute(f"SELECT cache_keys, last_error FROM {outbox.table} WHERE run_at >= {1 << 62}")
    keys, err = cur.fetchone()
    assert keys == "not json" and "JSONDecodeError" in err
    conn.commit()
    conn.close()


def test_status_command(db_url, outbox):
    import json
    import sys

    conn = connect(db_url)
    outbox.record(conn, "user:7")
    conn.commit()
    conn.close()
    out = subprocess.run([sys.executable, "-m", "cachesync", "outbox", "status", "--db-url", db_url, "--table",
                          outbox.table, "--json"], capture_output=True, text=True, check=True).stdout
    st = json.loads(out)
    assert st["pending"] == 1 and st["due"] == 1 and st["parked"] == 0


def test_sqlite_lease_of_a_dead_relay_is_released(tmp_path, table, cache):
    import sys

    url = f"sqlite:///{tmp_path}/lease.db"
    ob = Outbox(table)
    conn = connect(url)
    ob.init(conn)
    ob.record(conn, "user:8")
    ob.record(conn, "user:9")
    conn.commit()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # reaped: its pid is gone
    host = socket.gethostname()[:40]
    far = "CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER) + 3600000"
    conn.execute(f"UPDATE {table} SET claimed_until = {far}, claimed_by = ? WHERE cache_keys = ?",
                 (f"{host}:{dead.pid}:1", '["user:8"]'))
    conn.execute(f"UPDATE {table} SET claimed_until = {far}, claimed_by = ? WHERE cache_keys = ?",
                 (f"{host}:{os.getpid()}:1", '["user:9"]'))  # a live relay keeps its lease
    conn.commit()
    fill(cache, "user:8", "user:9")
    relay = Relay(url, cache, table=table)
    assert relay.drain() == 1
    relay.close()
    assert invalidated(cache, "user:8")
    assert cache.peek("user:9")["v"]
    assert ob.pending(conn) == 1
    conn.close()


# ---------------------------------------------------------------- PostgreSQL fast path (rows in the NOTIFY)


@pytest.fixture
def pg_outbox(pg_url: str, table: str) -> Iterator[Outbox]:
    ob = Outbox(table)
    conn = connect(pg_url)
    ob.init(conn)
    yield ob
    ob.drop(conn)
    conn.close()


def test_fast_path_applies_from_the_notification_and_the_claim_only_deletes(pg_url, pg_outbox, cache):
    relay = Relay(pg_url, cache, table=pg_outbox.table)
    assert relay.fast
    assert relay.run_once() == 0  # connects and LISTENs
    fill(cache, "f:1", "f:2")
    conn = connect(pg_url)
    pg_outbox.record(conn, "f:1", "f:2", version=5)
    conn.commit()
    assert relay.apply_notified(timeout=30) == 1  # no claim yet: applied from the payload alone
    assert invalidated(cache, "f:1") and invalidated(cache, "f:2")
    assert pg_outbox.pending(conn) == 1
    fill(cache, "f:1")  # a second apply by the claim would invalidate this value again
    assert relay.run_once() == 1
    assert cache.peek("f:1")["v"]  # not applied twice
    assert pg_outbox.pending(conn) == 0
    st = relay.stats
    assert (st["fast"], st["applied"], st["skipped"], st["rows"]) == (1, 0, 1, 1)
    relay.close()
    conn.close()


def test_fast_path_defers_the_claim_while_notifications_keep_coming(pg_url, pg_outbox, cache):
    """claim_delay: rows applied from notifications stay in the outbox (nothing lost) until the relay claims them;
    a wake-up without rows (a delayed row) makes it claim at once."""
    relay = Relay(pg_url, cache, table=pg_outbox.table, claim_delay=3600, poll_interval=3600)
    waiting = threading.Event()
    original = relay._notified

    def notified(timeout: float) -> list[str]:
        waiting.set()  # the first claim is over: the relay waits for notifications
        return original(timeout)

    relay._notified = notified  # type: ignore[method-assign]
    stop = threading.Event()
    t = threading.Thread(target=relay.run, args=(stop,), daemon=True)
    t.start()
    conn = connect(pg_url)
    try:
        assert waiting.wait(10)
        for i in range(3):
            fill(cache, f"d:{i}")
            pg_outbox.record(conn, f"d:{i}")
            conn.commit()
            wait_for(lambda i=i: invalidated(cache, f"d:{i}"), 10, f"d:{i} invalidated from the notification")
        assert pg_outbox.pending(conn) == 3  # applied, not claimed yet
        assert relay.stats["rows"] == 0
        pg_outbox.record(conn, "later:1", delay=3600)  # a wake-up without rows: the relay claims now
        conn.commit()
        wait_for(lambda: pg_outbox.pending(conn) == 1, 10, "the claim of the applied rows")
        # (the relay counts a claim after its COMMIT: the stats may lag the table by that much)
        wait_for(lambda: relay.stats["rows"] == 3, 10, "the claim to be counted")
        st = relay.stats
        assert (st["fast"], st["skipped"], st["applied"], st["rows"]) == (3, 3, 0, 3)
    finally:
        stop.set()
        conn.execute(f'NOTIFY "{pg_outbox.table}"')  # wake the relay's wait so that it sees stop
        conn.commit()
        t.join(10)
        assert not t.is_alive()
        relay.close()
        conn.close()


def test_fast_path_leaves_delayed_and_oversized_rows_to_the_claim(pg_url, pg_outbox, cache):
    relay = Relay(pg_url, cache, table=pg_outbox.table)
    assert relay.run_once() == 0
    big = [f"big:{i}:" + "x" * 300 for i in range(30)]  # > 8000 bytes of payload
    fill(cache, "d:1", *big)
    conn = connect(pg_url)
    pg_outbox.record(conn, "d:1", delay=3600)
    conn.commit()
    assert relay.apply_notified(timeout=30) == 0  # a bare wake-up
    pg_outbox.record(conn, *big)
    conn.commit()
    assert relay.apply_notified(timeout=30) == 0  # too big for a notification: a bare wake-up
    assert cache.peek("d:1")["v"] and cache.peek(big[0])["v"]
    assert relay.run_once() == 1  # the big row, through the claim
    assert all(invalidated(cache, k) for k in big)
    assert cache.peek("d:1")["v"]  # the delayed row waits
    assert (relay.stats["fast"], relay.stats["applied"], relay.stats["skipped"]) == (0, 1, 0)
    assert pg_outbox.pending(conn) == 1
    relay.close()
    conn.close()


def test_fast_path_off_and_several_relays(pg_url, pg_outbox, cache):
    """Every listening relay applies every notification; whichever claims the row deletes it without a second
    apply (it applied it too). A relay with fast=False applies only what it claims."""
    relays = [Relay(pg_url, cache, table=pg_outbox.table) for _ in range(2)]
    slow = Relay(pg_url, cache, table=pg_outbox.table, fast=False)
    for r in [*relays, slow]:
        assert r.run_once() == 0
    conn = connect(pg_url)
    pg_outbox.record(conn, "m:1")
    conn.commit()
    assert [r.apply_notified(timeout=30) for r in relays] == [1, 1]
    assert slow.apply_notified(timeout=30) == 0
    assert relays[1].run_once() == 1
    assert relays[0].run_once() == 0 and slow.run_once() == 0
    assert (relays[1].stats["applied"], relays[1].stats["skipped"]) == (0, 1)
    assert slow.stats["fast"] == 0
    for r in [*relays, slow]:
        r.close()
    conn.close()


# ---------------------------------------------------------------------- Outbox.commit(): record + COMMIT, one trip

COMMIT_DRIVERS = ["sqlite", "psycopg", "psycopg2", "mysql", "mysql-multi"]


@pytest.fixture(params=COMMIT_DRIVERS)
def commit_db(request, tmp_path) -> tuple[str, str]:
    """(driver, db URL) for the Outbox.commit() tests."""
    if request.param == "sqlite":
        return request.param, f"sqlite:///{tmp_path}/t.db"
    url = request.getfixturevalue("mysql_url" if request.param.startswith("mysql") else "pg_url")
    return request.param, url


def open_conn(driver: str, url: str):
    if driver == "psycopg2":
        import psycopg2

        return psycopg2.connect("postgresql://" + url.split("://", 1)[1])
    if driver == "mysql-multi":
        from pymysql.constants import CLIENT

        conn = connect(url, client_flag=CLIENT.MULTI_STATEMENTS)
        assert conn.client_flag & CLIENT.MULTI_STATEMENTS
        return conn
    conn = connect(url)
    if driver == "mysql":
        from pymysql.constants import CLIENT

        assert not conn.client_flag & CLIENT.MULTI_STATEMENTS  # the fallback: record() + commit()
    return conn


@pytest.fixture
def commit_setup(commit_db, table) -> Iterator[tuple[str, str, Outbox, str]]:
    """(driver, url, outbox, app table with row id=1 version=1)."""
    driver, url = commit_db
    ob = Outbox(table)
    app = "users_" + uuid.uuid4().hex[:8]
    conn = connect(url)
    ob.init(conn)
    cur = conn.cursor()
    cur.execute(f"CREATE TABLE {app} (id INTEGER PRIMARY KEY, email VARCHAR(100), version INTEGER)")
    cur.execute(f"INSERT INTO {app} VALUES (1, 'a@x', 1)")
    conn.commit()
    yield driver, url, ob, app
    cur.execute(f"DROP TABLE IF EXISTS {app}")
    conn.commit()
    ob.drop(conn)
    conn.close()


def app_version(url: str, app: str) -> int:
    """The committed version of row 1, seen from another connection."""
    conn = connect(url)
    try:
        cur = conn.cursor()
        cur.execute(f"SELECT version FROM {app} WHERE id = 1")
        return int(cur.fetchone()[0])
    finally:
        conn.close()


def pending_elsewhere(url: str, ob: Outbox) -> int:
    conn = connect(url)
    try:
        return ob.pending(conn)
    finally:
        conn.close()


def assert_idle(driver: str, conn) -> None:
    """The driver's idea of the transaction state matches the server's: no transaction open."""
    if driver == "psycopg":
        from psycopg.pq import TransactionStatus

        assert conn.info.transaction_status == TransactionStatus.IDLE
    elif driver == "psycopg2":
        import psycopg2.extensions as ext

        assert conn.info.transaction_status == ext.TRANSACTION_STATUS_IDLE
        assert conn.status == ext.STATUS_READY
    elif driver == "sqlite":
        assert not conn.in_transaction


def test_commit_records_and_commits_atomically_then_relay_invalidates(commit_setup, cache, monkeypatch):
    driver, url, ob, app = commit_setup
    if driver in ("psycopg", "mysql-multi"):  # one round trip: neither record() nor the driver's commit() is used
        def two_trips(*a, **k):
            raise AssertionError("record() + commit() used where one round trip is possible")

        monkeypatch.setattr(Outbox, "record", two_trips)
    key = "user:1 o'brien \\ \"é\" ; COMMIT; --"  # quoted by the driver, never formatted into the SQL
    fill(cache, key, "user:2")
    conn = open_conn(driver, url)
    cur = conn.cursor()
    cur.execute(f"UPDATE {app} SET version = 2 WHERE id = 1")
    ob.commit(conn, key, version=2)
    assert_idle(driver, conn)
    assert app_version(url, app) == 2 and pending_elsewhere(url, ob) == 1
    # the driver knows the transaction ended: the next one really is a transaction (rolled back here)
    cur.execute(f"UPDATE {app} SET version = 3 WHERE id = 1")
    conn.rollback()
    assert app_version(url, app) == 2
    # a delayed double delete through commit(): two rows, one transaction
    cur.execute(f"UPDATE {app} SET version = 4 WHERE id = 1")
    ob.commit(conn, key, version=4, again_after=60)
    assert app_version(url, app) == 4 and pending_elsewhere(url, ob) == 3
    relay = Relay(url, cache, table=ob.table)
    assert relay.drain() == 2  # the immediate rows; the delayed one waits
    assert invalidated(cache, key)
    assert cache.peek("user:2")["v"]
    relay.close()
    conn.close()


def test_commit_failure_commits_nothing(commit_setup):
    driver, url, ob, app = commit_setup
    conn = open_conn(driver, url)
    cur = conn.cursor()
    # 1. the outbox table does not exist
    missing = Outbox("cachesync_outbox_missing_" + uuid.uuid4().hex[:8])
    cur.execute(f"UPDATE {app} SET version = 2 WHERE id = 1")
    with pytest.raises(Exception, match="(?i)missing|exist|no such table"):
        missing.commit(conn, "user:1", version=2)
    assert_idle(driver, conn)
    assert app_version(url, app) == 1
    # 2. the INSERT violates a constraint
    c2 = connect(url)
    c2cur = c2.cursor()
    if driver == "sqlite":
        c2cur.execute(f"CREATE TRIGGER {ob.table}_no BEFORE INSERT ON {ob.table} WHEN NEW.cache_keys LIKE "
                      "'%forbidden%' BEGIN SELECT RAISE(ABORT, 'forbidden key'); END")
    else:
        c2cur.execute(f"ALTER TABLE {ob.table} ADD CONSTRAINT {ob.table}_no CHECK (cache_keys NOT LIKE '%forbidden%')")
    c2.commit()
    c2.close()
    cur.execute(f"UPDATE {app} SET version = 3 WHERE id = 1")
    with pytest.raises(Exception, match="(?i)forbidden|check|constraint"):
        ob.commit(conn, "user:1", "forbidden", version=3)
    assert_idle(driver, conn)
    assert app_version(url, app) == 1 and pending_elsewhere(url, ob) == 0
    # the connection is usable and the caller's same changes commit with a valid row
    cur.execute(f"SELECT version FROM {app} WHERE id = 1")
    assert int(cur.fetchone()[0]) == 1  # rolled back on this connection too
    cur.execute(f"UPDATE {app} SET version = 3 WHERE id = 1")
    ob.commit(conn, "user:1", version=3)
    assert app_version(url, app) == 3 and pending_elsewhere(url, ob) == 1
    conn.close()


def test_commit_refuses_autocommit(commit_setup):
    driver, url, ob, app = commit_setup
    conn = open_conn(driver, url)
    if driver == "sqlite":
        conn.isolation_level = None
    elif driver.startswith("mysql"):
        conn.autocommit(True)
    else:
        conn.autocommit = True
    with pytest.raises(OutboxError, match="autocommit"):
        ob.commit(conn, "user:1")
    assert pending_elsewhere(url, ob) == 0
    conn.close()


def test_commit_refused_inside_psycopg_transaction_block(pg_url, pg_outbox):
    conn = connect(pg_url)
    with pytest.raises(OutboxError, match="transaction\\(\\) block"):
        with conn.transaction():
            pg_outbox.commit(conn, "user:1")
    conn.close()
    assert pending_elsewhere(pg_url, pg_outbox) == 0


def test_module_level_commit_uses_default_table(tmp_path):
    import cachesync.outbox as outbox_mod

    conn = connect(f"sqlite:///{tmp_path}/d.db")
    Outbox().init(conn)
    outbox_mod.commit(conn, "user:9")
    assert Outbox().pending(conn) == 1
    conn.close()


def _parse_reference(t: tuple, mkb: int) -> tuple[str, object]:
    """What the relay's row checks are defined as: json.loads, checked_version, then a non-empty list of keys that
    checked_keys accepts (or a prefixes object); anything else is parked."""
    import json

    from cachesync.bus import checked_keys, checked_version

    try:
        ks = json.loads(t[1])
        ver = None if t[2] is None else checked_version(t[2])
        if isinstance(ks, dict) and isinstance(ks.get("prefixes"), list):
            return "good", ([], ver, ks["prefixes"])
        if not isinstance(ks, list) or not ks:
            raise ValueError("not a list")
        checked_keys(ks, mkb)
        return "good", (ks, ver, None)
    except (ValueError, TypeError, cachesync.errors.UsageError):
        return "bad", None


@pytest.mark.parametrize("keys, version", [
    ('["user:1","by_email:a@b.c"]', "12"),
    ('["user:1"]', None),
    ('["' + "a" * 16 + '"]', "1"),  # exactly max_key_bytes: longer than the cheap bound (16 / 4), still fits
    ('["' + "\u00e9" * 8 + '"]', "1"),  # 8 two-byte characters: 16 bytes, fits
    ('["' + "\u20ac" * 6 + '"]', "1"),  # 18 bytes: too long
    ('["' + "a" * 17 + '"]', "1"),
    ('[""]', "1"),
    ('[5]', "1"),
    ('[]', "1"),
    ('{"prefixes": ["user:"]}', None),
    ('{"other": 1}', None),
    ('"user:1"', None),
    ('["a"]', "1.5"),
    ('["a"]', "-3"),
    ('["a"]', "007"),
    ('["a"]', "123456789012345"),
    ('["a"]', "99999999999999999"),  # beyond 2**53
    ('["a"]', "abc"),
    ('["a"]', "nan"),
    ('["a"]', "\u00b2"),  # str.isdigit(), not a number
    ('["a"]', "\u0661\u0662"),
    ('["a\\ud800"]', None),  # a lone surrogate (valid JSON escape): no UTF-8 form, Redis could never get it
    ('["\u00e9\u00e9\u00e9\u00e9\u00e9"]', None),  # non-ASCII: the byte count decides (10 bytes <= 16)
    ('["\u00e9\u00e9\u00e9\u00e9\u00e9\u00e9\u00e9\u00e9\u00e9"]', None),  # 18 bytes > 16: parked  # Unicode digits: Python's float() reads them, Lua's tonumber() does not
    ('["a"]', ""),
    ('["a"]', 42),  # an integer column
    ('["a"]', b"7"),
])
def test_relay_row_checks_accept_and_park_exactly_what_the_full_checks_do(tmp_path, redis_url, namespace,
                                                                          keys, version):
    with cachesync.Cache(redis_url, namespace=namespace, max_key_bytes=16) as c:
        relay = Relay(f"sqlite:///{tmp_path}/t.db", c, table="t")
        good, bad = relay._parse([(7, keys, version, 0)])
        what, want = _parse_reference((7, keys, version, 0), 16)
        if what == "bad":
            assert not good and [b[0] for b in bad] == [7]
            assert bad[0][2] == (7, keys, version, 0)  # the claimed columns, to park the row
        else:
            assert not bad and len(good) == 1
            r = good[0]
            assert (r.keys, r.version, r.prefixes) == want
            assert (r.id, r.attempts, r.raw) == (7, 0, (7, keys, version, 0))


def test_a_row_redis_cannot_take_is_parked_not_retried_forever(db_url, outbox, cache):
    """A prefixes row (a TRUNCATE's) whose prefix no Redis command can carry (a lone surrogate, which JSON can
    spell): parked with its error, and the good row of the same batch applied. (It raised UnicodeEncodeError out
    of the delivery: the relay took it for a database error and retried the whole batch forever.)"""
    conn = connect(db_url)
    cur = conn.cursor()
    d = outbox._dialect(conn)
    cur.execute(d.sql(f"INSERT INTO {outbox.table} (cache_keys) VALUES (?)"), ('{"prefixes": ["\\ud800"]}',))
    outbox.record(conn, "user:5")
    conn.commit()
    fill(cache, "user:5")
    relay = Relay(db_url, cache, table=outbox.table)
    try:
        assert relay.drain() == 2  # the good row and the parked one
    finally:
        relay.close()
    assert invalidated(cache, "user:5")
    st = outbox.status(conn)
    assert (st["pending"], st["parked"]) == (0, 1), st
    cur.execute(f"SELECT last_error FROM {outbox.table} WHERE run_at >= {1 << 62}")
    assert "UnicodeEncodeError" in cur.fetchone()[0]
    conn.commit()
    conn.close()
