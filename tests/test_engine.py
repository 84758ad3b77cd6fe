"""The engine against real Redis (and a real SQLite database), interleavings forced with Events."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

import cachesync
from cachesync import NOT_FOUND, Versioned
from entries import hexists, hget, hgetall, hset  # noqa: F401


class DB:
    """A one-table SQLite database: the source of truth in these tests."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        with self.conn() as c:
            c.execute("CREATE TABLE IF NOT EXISTS t (id TEXT PRIMARY KEY, val TEXT, version INTEGER)")
        self.loads = 0

    def conn(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, timeout=30, isolation_level=None)

    def write(self, key: str, val: str, version: int) -> None:
        with self.conn() as c:
            c.execute("INSERT INTO t VALUES (?, ?, ?) ON CONFLICT(id) DO UPDATE SET val=excluded.val, "
                      "version=excluded.version", (key, val, version))

    def read(self, key: str):
        self.loads += 1
        with self.conn() as c:
            row = c.execute("SELECT val, version FROM t WHERE id=?", (key,)).fetchone()
        return NOT_FOUND if row is None else Versioned(row[0], row[1])


@pytest.fixture
def db(tmp_path: Path) -> DB:
    return DB(tmp_path / "db.sqlite")


class Gate:
    """A loader that reads the database, then stops until released (the article's slow reader)."""

    def __init__(self, db: DB, key: str) -> None:
        self.db, self.key = db, key
        self.loaded = threading.Event()
        self.go = threading.Event()

    def __call__(self):
        v = self.db.read(self.key)
        self.loaded.set()
        assert self.go.wait(10)
        return v


def background(fn) -> tuple[threading.Thread, dict]:
    out: dict = {}

    def run() -> None:
        try:
            out["result"] = fn()
        except BaseException as e:  # pragma: no cover - surfaced by the test
            out["error"] = e

    t = threading.Thread(target=run)
    t.start()
    return t, out


def cached_value(cache: cachesync.Cache, key: str):
    e = cache.peek(key)
    return None if e is None or "value" not in e else e["value"]


# ---------------------------------------------------------------- the article's last table


@pytest.mark.parametrize("leases", [True, False])
def test_reader_write_back_after_writer_delete(cache, redis_url, namespace, db, leases):
    """Reader misses and reads 100; writer commits 99 and deletes; reader writes 100 back."""
    c = cachesync.Cache(redis_url, namespace=namespace, leases=leases, ttl_jitter=0.0)
    db.write("k", "100", 1)
    gate = Gate(db, "k")
    t, out = background(lambda: c.get_entry("k", gate))
    assert gate.loaded.wait(10)          # T1-T2: reader missed and read 100
    db.write("k", "99", 2)               # T3: writer commits 99
    c.invalidate("k")                    # T4: writer deletes the cache entry
    gate.go.set()                        # T5: reader writes 100 back
    t.join()
    assert out["result"].value == "100"
    if leases:
        assert out["result"].filled is False
        assert cached_value(c, "k") is None          # refused: nothing cached
        assert c.get("k", lambda: db.read("k")) == "99"
    else:
        assert out["result"].filled is True
        assert cached_value(c, "k") == "100"         # plain cache-aside: stale until the TTL
    c.close()


# ---------------------------------------------------------------- write strategies


def test_db_then_cache_two_writers_reordered_is_stale(cache, db):
    db.write("k", "A", 1)
    db.write("k", "B", 2)                      # A committed first, then B
    with cache.write("k", strategy="db_then_cache", value="B"):
        pass                                   # B's cache update lands first
    with cache.write("k", strategy="db_then_cache", value="A"):
        pass                                   # A's cache update lands last
    assert cached_value(cache, "k") == "A" and db.read("k").value == "B"


def test_db_then_set_versioned_two_writers_reordered_is_consistent(cache, db):
    db.write("k", "A", 1)
    db.write("k", "B", 2)
    with cache.write("k", strategy="db_then_set_versioned", value="B", version=2):
        pass
    with cache.write("k", strategy="db_then_set_versioned", value="A", version=1):
        pass                                   # refused: version 1 < floor 2
    assert cached_value(cache, "k") == "B"


def test_cache_then_db_failed_write_leaves_uncommitted_value(cache, db):
    db.write("k", "old", 1)
    with pytest.raises(RuntimeError):
        with cache.write("k", strategy="cache_then_db", value="new"):
            raise RuntimeError("database write failed")
    assert cached_value(cache, "k") == "new" and db.read("k").value == "old"


def test_cache_then_db_two_writers_reordered_is_stale(cache, db):
    db.write("k", "0", 0)
    with cache.write("k", strategy="cache_then_db", value="A"):
        with cache.write("k", strategy="cache_then_db", value="B"):
            db.write("k", "B", 2)              # B's database write first
        db.write("k", "A", 1)                  # A's last
    assert cached_value(cache, "k") == "B" and db.read("k").value == "A"


def test_delete_then_db_reader_recaches_old_value_even_with_leases(cache, db):
    db.write("k", "old", 1)
    with cache.write("k", strategy="delete_then_db"):
        assert cache.get("k", lambda: db.read("k")) == "old"   # reader between delete and update
        db.write("k", "new", 2)
    assert cached_value(cache, "k") == "old" and db.read("k").value == "new"


class ManualScheduler:
    def __init__(self) -> None:
        self.pending: list = []

    def __call__(self, delay, fn):
        self.pending.append((delay, fn))

    def fire(self) -> None:
        while self.pending:
            self.pending.pop(0)[1]()


@pytest.mark.parametrize("delay_long_enough", [False, True])
def test_delayed_double_delete(redis_url, namespace, db, delay_long_enough):
    sched = ManualScheduler()
    c = cachesync.Cache(redis_url, namespace=namespace, scheduler=sched, ttl_jitter=0.0)
    db.write("k", "old", 1)
    gate = Gate(db, "k")
    with c.write("k", strategy="delayed_double_delete", delay=0.2):
        t, out = background(lambda: c.get_entry("k", gate))   # reader misses between delete and update
        assert gate.loaded.wait(10)                           # ... and read "old"
        db.write("k", "new", 2)
    assert sched.pending and sched.pending[0][0] == 0.2
    if delay_long_enough:
        gate.go.set()
        t.join()                       # reader re-caches "old" ...
        assert cached_value(c, "k") == "old"
        sched.fire()                   # ... and the second delete removes it
        assert cached_value(c, "k") is None
    else:
        sched.fire()                   # the second delete comes before the reader's write-back
        gate.go.set()
        t.join()
        # with leases the second delete voided the reader's lease: nothing stale is written back
        assert out["result"].filled is False and cached_value(c, "k") is None
    assert c.get("k", lambda: db.read("k")) == "new"
    c.close()


def test_delayed_double_delete_too_short_without_leases_is_stale(redis_url, namespace, db):
    sched = ManualScheduler()
    c = cachesync.Cache(redis_url, namespace=namespace, scheduler=sched, leases=False, ttl_jitter=0.0)
    db.write("k", "old", 1)
    gate = Gate(db, "k")
    with c.write("k", strategy="delayed_double_delete"):
        t, _ = background(lambda: c.get_entry("k", gate))
        assert gate.loaded.wait(10)
        db.write("k", "new", 2)
    sched.fire()
    gate.go.set()
    t.join()
    assert cached_value(c, "k") == "old"
    c.close()


def test_db_then_invalidate_reader_before_delete_is_transient(cache, db):
    """The article's table 5: a hit between the commit and the delete reads the old value, then it is gone."""
    db.write("k", "100", 1)
    assert cache.get("k", lambda: db.read("k")) == "100"
    with cache.write("k"):
        db.write("k", "99", 2)                                          # T1: commit 99
        assert cache.get("k", lambda: pytest.fail("hit")) == "100"     # T2: reader C reads the old value
    assert cached_value(cache, "k") is None                             # T3: deleted
    assert cache.get("k", lambda: db.read("k")) == "99"                 # consistent from then on


def test_default_strategy_invalidates_after_block(cache, db):
    db.write("k", "v1", 1)
    assert cache.get("k", lambda: db.read("k")) == "v1"
    with cache.write("k") as w:
        assert cached_value(cache, "k") == "v1"
        db.write("k", "v2", 2)
        assert w.strategy.name == "db_then_invalidate"
    assert cached_value(cache, "k") is None
    assert cache.get("k", lambda: db.read("k")) == "v2"


def test_safe_strategy_invalidates_when_block_raises(cache, db):
    db.write("k", "v1", 1)
    cache.get("k", lambda: db.read("k"))
    with pytest.raises(KeyError):
        with cache.write("k"):
            db.write("k", "v2", 2)
            raise KeyError("after commit")
    assert cached_value(cache, "k") is None


def test_set_versioned_needs_version(cache):
    with pytest.raises(cachesync.UsageError, match="version"):
        with cache.write("k", strategy="db_then_set_versioned") as w:
            w.set_value("x")


def test_version_floor_refuses_replica_lag_fill(cache, db):
    db.write("k", "v5", 5)
    cache.invalidate("k", version=6)                     # writer committed version 6
    e = cache.get_entry("k", lambda: Versioned("v5", 5))  # a lagging replica still has version 5
    assert e.filled is False and cached_value(cache, "k") is None


# ---------------------------------------------------------------- stampede


def test_stampede_in_process_loads_once(cache, db):
    db.write("k", "v", 1)
    started = threading.Event()
    release = threading.Event()
    calls = []

    def loader():
        calls.append(1)
        started.set()
        assert release.wait(10)
        return db.read("k")

    threads = [background(lambda: cache.get("k", loader)) for _ in range(20)]
    assert started.wait(10)
    release.set()
    for t, out in threads:
        t.join()
        assert out["result"] == "v"
    assert len(calls) == 1


def test_stampede_across_clients_waits_on_lease_not_polling(redis_url, namespace, db):
    """Two caches (separate pools, as two processes): the second waits for the first's fill."""
    db.write("k", "v", 1)
    a = cachesync.Cache(redis_url, namespace=namespace)
    b = cachesync.Cache(redis_url, namespace=namespace)
    gate = Gate(db, "k")
    t, out = background(lambda: a.get_entry("k", gate))
    assert gate.loaded.wait(10)
    b_calls = []
    t2, out2 = background(lambda: b.get_entry("k", lambda: b_calls.append(1) or db.read("k")))
    # wait until b registered as a waiter on the lease (observable in Redis), then let a fill
    for _ in range(1000):
        e = a.peek("k")
        if e and e.get("w") == b"1":
            break
        threading.Event().wait(0.005)
    gate.go.set()
    t.join()
    t2.join()
    assert out["result"].filled is True
    assert out2["result"].value == "v" and out2["result"].source == "cache"
    assert b_calls == [] and b.stats["waits"] >= 1
    a.close()
    b.close()


def test_loader_error_releases_lease(redis_url, namespace):
    a = cachesync.Cache(redis_url, namespace=namespace)
    with pytest.raises(ZeroDivisionError):
        a.get("k", lambda: 1 / 0)
    assert a.peek("k") is None or "lt" not in a.peek("k")
    assert a.get("k", lambda: 3) == 3
    a.close()


def test_waiter_loads_itself_after_max_wait(redis_url, namespace, r):
    a = cachesync.Cache(redis_url, namespace=namespace, max_wait=0.05, lease_ttl=30)
    ek = f"cs:{namespace}:{{k}}"
    hset(r, ek, mapping={"lt": "someone-else", "ld": 10**15})   # a lease holder that never fills
    r.pexpire(ek, 30000)
    e = a.get_entry("k", lambda: "mine")
    assert e.value == "mine" and e.source == "loader" and e.filled is False
    a.close()


def test_serve_stale_while_refreshing(redis_url, namespace, db):
    a = cachesync.Cache(redis_url, namespace=namespace, serve_stale=True)
    b = cachesync.Cache(redis_url, namespace=namespace, serve_stale=True)
    db.write("k", "v1", 1)
    assert a.get("k", lambda: db.read("k")) == "v1"
    db.write("k", "v2", 2)
    a.invalidate("k", version=2)
    gate = Gate(db, "k")
    t, out = background(lambda: a.get_entry("k", gate))   # a holds the lease and reloads
    assert gate.loaded.wait(10)
    e = b.get_entry("k", lambda: pytest.fail("must not load"))
    assert e.value == "v1" and e.stale is True
    gate.go.set()
    t.join()
    assert out["result"].value == "v2" and out["result"].filled
    assert b.get("k", lambda: None) == "v2"
    a.close()
    b.close()


# ---------------------------------------------------------------- penetration, avalanche, batches


def test_not_found_is_cached_negatively(cache, db):
    calls = []
    assert cache.get("nope", lambda: calls.append(1) or db.read("nope")) is NOT_FOUND
    assert cache.get("nope", lambda: calls.append(1) or db.read("nope")) is NOT_FOUND
    assert calls == [1] and cache.stats["negative_hits"] == 1
    e = cache.peek("nope")
    assert e["n"] == b"1"
    assert cache.get("none-value", lambda: None) is None      # None is a value, not "not found"
    assert cache.get("none-value", lambda: 1) is None


def test_negative_ttl_is_shorter(redis_url, namespace, r):
    c = cachesync.Cache(redis_url, namespace=namespace, negative_ttl=7, default_ttl=300, ttl_jitter=0)
    c.get("a", lambda: NOT_FOUND)
    c.get("b", lambda: 1)
    assert 0 < r.pttl(f"cs:{namespace}:{{a}}") <= 7000 < r.pttl(f"cs:{namespace}:{{b}}")
    c.close()


def test_ttl_jitter_spreads_expiry(redis_url, namespace, r):
    c = cachesync.Cache(redis_url, namespace=namespace, ttl_jitter=0.5)
    ttls = set()
    for i in range(20):
        c.get(f"k{i}", lambda: 1, ttl=100)
        ttls.add(r.pttl(f"cs:{namespace}:{{k{i}}}") // 1000)
    assert min(ttls) >= 99 and max(ttls) <= 150 and len(ttls) > 3
    c.close()
    c0 = cachesync.Cache(redis_url, namespace=namespace, ttl_jitter=0)
    c0.get("z", lambda: 1, ttl=100)
    assert 99_000 < r.pttl(f"cs:{namespace}:{{z}}") <= 100_000
    c0.close()


def test_get_many_one_round_trip_each_way(cache, db):
    for i in range(5):
        db.write(f"k{i}", f"v{i}", 1)
    batches = []

    def loader_many(keys):
        batches.append(list(keys))
        return {k: db.read(k) for k in keys if k != "k4"}

    cache.get("k0", lambda: db.read("k0"))
    out = cache.get_many(["k0", "k1", "k2", "k3", "k4", "k1"], loader_many)
    assert out == {"k0": "v0", "k1": "v1", "k2": "v2", "k3": "v3", "k4": NOT_FOUND}
    assert batches == [["k1", "k2", "k3", "k4"]]
    out2 = cache.get_many(["k0", "k1", "k4"], loader_many)
    assert out2 == {"k0": "v0", "k1": "v1", "k4": NOT_FOUND} and len(batches) == 1


def test_cached_decorator(cache, db):
    db.write("user:7", "alice", 1)
    calls = []

    @cache.cached("user:{user_id}", ttl=60)
    def get_user(user_id: int):
        calls.append(user_id)
        return db.read(f"user:{user_id}").value

    assert get_user(7) == "alice" and get_user(user_id=7) == "alice"
    assert calls == [7] and get_user.key(7) == "user:7"
    get_user.invalidate(7)
    assert get_user(7) == "alice" and calls == [7, 7]
    with pytest.raises(cachesync.UsageError, match="userid"):
        cache.cached("user:{userid}")(lambda user_id: 1)


# ---------------------------------------------------------------- bad input and Redis down


def free_port() -> int:
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@pytest.fixture
def dead_url() -> Iterator[str]:
    yield f"redis://:s3cret@127.0.0.1:{free_port()}/0"


def test_bad_keys(cache):
    with pytest.raises(cachesync.InvalidKeyError, match="empty"):
        cache.get("", lambda: 1)
    with pytest.raises(cachesync.InvalidKeyError, match="must be str"):
        cache.get(12, lambda: 1)  # type: ignore[arg-type]
    with pytest.raises(cachesync.InvalidKeyError, match="max_key_bytes"):
        cache.get("x" * 2000, lambda: 1)
    with pytest.raises(cachesync.InvalidKeyError):
        cache.invalidate("ok", "")
    assert cache.get("with{brace}", lambda: 1) == 1          # braces are allowed (digest hash tag)


def test_bad_values(cache, redis_url, namespace):
    with pytest.raises(cachesync.SerializationError, match="'k'.*set"):
        cache.get("k", lambda: {1, 2})
    assert cache.peek("k") is None or "lt" not in cache.peek("k")   # lease released
    small = cachesync.Cache(redis_url, namespace=namespace, max_value_bytes=10)
    with pytest.raises(cachesync.ValueTooLargeError, match="'big'.*max_value_bytes is 10"):
        small.get("big", lambda: "x" * 100)
    small.close()
    with pytest.raises(cachesync.SerializationError):
        cache.set("k", object())


@pytest.mark.parametrize("opts,match", [
    ({"default_ttl": 0}, "default_ttl"), ({"negative_ttl": -1}, "negative_ttl"), ({"ttl_jitter": 2}, "ttl_jitter"),
    ({"strategy": "yolo"}, "unknown write strategy 'yolo'"), ({"serializer": "xml"}, "serializer"),
    ({"namespace": "a b"}, "namespace"), ({"no_such_option": 1}, "no_such_option"),
    ({"on_redis_error": "ignore"}, "on_redis_error"), ({"max_connections": 0}, "max_connections"),
])
def test_bad_options(opts, match):
    with pytest.raises(cachesync.ConfigError, match=match):
        cachesync.Cache("redis://127.0.0.1:6379/15", **opts)


def test_bad_ttl_and_strategy_per_call(cache):
    with pytest.raises(cachesync.ConfigError, match="ttl"):
        cache.get("k", lambda: 1, ttl=0)
    with pytest.raises(cachesync.ConfigError, match="ttl"):
        cache.get("k", lambda: 1, ttl=-5)
    with pytest.raises(cachesync.UnknownStrategyError):
        with cache.write("k", strategy="nope"):
            pass


def test_bad_url():
    with pytest.raises(cachesync.UsageError, match="redis://"):
        cachesync.Cache("http://127.0.0.1:6379")


def test_redis_down_load_policy(dead_url):
    c = cachesync.Cache(dead_url, on_redis_error="load", connect_timeout=0.2)
    e = c.get_entry("k", lambda: "from-db")
    assert e.value == "from-db" and e.source == "fallback" and c.stats["redis_errors"] == 1
    assert c.get_many(["a", "b"], lambda ks: {k: k for k in ks}) == {"a": "a", "b": "b"}


def test_redis_down_fail_policy_names_url_without_password(dead_url):
    c = cachesync.Cache(dead_url, on_redis_error="fail", connect_timeout=0.2)
    with pytest.raises(cachesync.CacheUnavailableError) as ei:
        c.get("k", lambda: "x")
    assert "127.0.0.1" in str(ei.value) and "s3cret" not in str(ei.value)


def test_invalidation_failure_names_keys(dead_url):
    c = cachesync.Cache(dead_url, connect_timeout=0.2)
    with pytest.raises(cachesync.InvalidationError) as ei:
        c.invalidate("user:1", "user_by_email:a@b")
    assert ei.value.keys == ["user:1", "user_by_email:a@b"] and "user:1" in str(ei.value)
    with pytest.raises(cachesync.InvalidationError):
        with c.write("user:1"):
            pass


def test_noscript_fallback_after_script_flush(cache, r):
    assert cache.get("k", lambda: 1) == 1
    r.script_flush()
    assert cache.get("k", lambda: 2) == 1


def test_msgpack_and_pickle_serializers(redis_url, namespace):
    m = cachesync.Cache(redis_url, namespace=namespace, serializer="msgpack")
    assert m.get("k", lambda: {"a": [1, 2]}) == {"a": [1, 2]}
    assert m.get("k", lambda: None) == {"a": [1, 2]}
    m.close()
    p = cachesync.Cache(redis_url, namespace=namespace + "p", serializer="pickle")
    assert p.get("k", lambda: {1, 2}) == {1, 2}
    p.close()


class _Recording:
    """A real redis-py client that records the name of every command it sends (a spy, not a mock)."""

    def __init__(self, url: str) -> None:
        import redis

        self.client = redis.Redis.from_url(url)
        self.sent: list[str] = []
        real = self.client.execute_command

        def execute_command(*args, **kw):
            self.sent.append(str(args[0]))
            return real(*args, **kw)

        self.client.execute_command = execute_command  # type: ignore[method-assign]


def test_sync_hit_fast_path_sends_one_get_and_a_miss_reuses_it(redis_url, namespace):
    """Cache.get sends the flow's first command (the fast-path GET) itself: a hit is that one command; a miss,
    a stale-marked entry or a foreign key runs the flow, which takes the same reply instead of sending it again."""
    rec = _Recording(redis_url)
    c = cachesync.Cache(client=rec.client, namespace=namespace)
    rec.sent.clear()  # the namespace record
    try:
        assert c.get("k", lambda: "v1") == "v1"  # miss: GET, then get.lua (lease) and fill.lua
        assert rec.sent == ["GET", "EVALSHA", "EVALSHA"]
        rec.sent.clear()
        e = c.get_entry("k", lambda: "unused")
        assert (e.value, e.source, e.version, e.stale) == ("v1", "cache", None, False)
        assert rec.sent == ["GET"]
        assert c.stats["hits"] == 1
        c.set("k", NOT_FOUND, version=3)  # a negative entry with a version: served by the fast path too
        rec.sent.clear()
        e = c.get_entry("k", lambda: "unused")
        assert (e.value, e.version, e.source) == (NOT_FOUND, 3, "cache") and rec.sent == ["GET"]
        assert c.stats["negative_hits"] == 1
        rec.client.delete(c.ctx.ekey("k"))
        rec.client.set(c.ctx.ekey("k"), "foreign")  # not an entry: repaired by the flow, read anew
        rec.sent.clear()
        assert c.get("k", lambda: "v2") == "v2"
        assert rec.sent == ["GET", "DEL", "EVALSHA", "EVALSHA"]
        assert c.stats["corrupt_entries"] == 1
        hset(rec.client, c.ctx.ekey("k"), "v", b"{not json")  # undecodable payload: repaired, reloaded
        rec.sent.clear()
        assert c.get("k", lambda: "v3") == "v3"
        assert rec.sent == ["GET", "DEL", "EVALSHA", "EVALSHA"]
    finally:
        c.close()
        rec.client.close()


def test_sync_fast_path_redis_down_falls_back_after_one_attempt(namespace):
    """A connection error on the fast-path GET is handed to the flow as its first reply: one attempt, then
    the fallback load (no second attempt at the unreachable server)."""
    c = cachesync.Cache("redis://127.0.0.1:1/0", namespace=namespace, connect_timeout=0.2, socket_timeout=0.2)
    attempts = [0]
    pool = c.redis.connection_pool
    real = pool.get_connection

    def counting(*args, **kw):  # every attempt takes a connection (kept connections too: none is kept yet)
        attempts[0] += 1
        return real(*args, **kw)

    pool.get_connection = counting  # type: ignore[method-assign]
    try:
        e = c.get_entry("k", lambda: "from db")
        assert (e.value, e.source) == ("from db", "fallback")
        assert attempts[0] == 1
    finally:
        c.close()


class _Gone(Exception):
    pass


def test_cached_not_found_answer(cache) -> None:
    """``cached(..., not_found=...)``: what a decorated function gives for NOT_FOUND (a web endpoint must not hand
    the marker to its framework): the marker by default, an exception raised, a callable's result, a value."""
    calls = []

    def lookup(i: int) -> object:
        calls.append(i)
        return cachesync.NOT_FOUND

    plain = cache.cached("nf:a:{i}")(lookup)
    raising = cache.cached("nf:b:{i}", not_found=_Gone)(lookup)
    instance = cache.cached("nf:c:{i}", not_found=_Gone("no such row"))(lookup)
    called = cache.cached("nf:d:{i}", not_found=lambda: {"missing": True})(lookup)
    value = cache.cached("nf:e:{i}", not_found=None)(lookup)
    assert plain(1) is cachesync.NOT_FOUND
    with pytest.raises(_Gone):
        raising(1)
    with pytest.raises(_Gone, match="no such row"):
        instance(1)
    assert called(1) == {"missing": True} and value(1) is None
    assert value(1) is None and len(calls) == 5  # the negative entry is cached: the second call loads nothing


def test_get_many_refuses_a_loader_many_answering_keys_of_another_type(cache) -> None:
    """{1: row} for the keys ["1"] left every asked key out: each was cached as NOT_FOUND for negative_ttl, a
    silent wrong answer. Now a UsageError names the key, nothing is cached, and the leases are released."""
    from cachesync.errors import UsageError

    with pytest.raises(UsageError, match=r"loader_many returned the key 1 \(int\)"):
        cache.get_many(["1", "2"], lambda ks: {int(k): f"row {k}" for k in ks})
    assert cache.get_many(["1", "2"], lambda ks: {k: f"row {k}" for k in ks}) == {"1": "row 1", "2": "row 2"}


async def test_async_get_many_refuses_a_loader_many_answering_keys_of_another_type(acache) -> None:
    from cachesync.errors import UsageError

    with pytest.raises(UsageError, match=r"loader_many returned the key 1 \(int\)"):
        await acache.get_many(["1", "2"], lambda ks: {int(k): f"row {k}" for k in ks})
    assert await acache.get_many(["1", "2"], lambda ks: {k: f"row {k}" for k in ks}) == {"1": "row 1", "2": "row 2"}
