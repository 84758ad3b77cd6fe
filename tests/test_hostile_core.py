"""Hostile and careless use of the core (issue: no silent failure), against the real Redis.

Each test forces its case: forked processes, cancellation at a chosen effect, a follower joining a flight at a
chosen moment (events, not sleeps), corrupted entries written with raw redis-py, arguments Redis would reject.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import threading
import time
from decimal import Decimal
from typing import Any

import pytest
import redis

import cachesync
from cachesync import protocol as P
from cachesync.errors import ConfigError, UsageError
from cachesync.keys import entry_key
from cachesync.scripts import SCRIPTS
from entries import hexists, hget, hgetall, hset  # noqa: F401


def _until(cond: Any, what: str, timeout: float = 10.0) -> None:
    """Wait for a condition another thread makes true (bounded; this is not a timing assumption)."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.001)


# --------------------------------------------------------------------------- lease tokens across forks


def test_forked_workers_draw_distinct_lease_tokens() -> None:
    """gunicorn --preload / Celery prefork: children forked after import must never share tokens."""
    P.new_token()  # the parent has drawn tokens before forking
    pipes = []
    pids = []
    for _ in range(3):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # child
            os.close(r)
            os.write(w, ",".join(P.new_token() for _ in range(50)).encode())
            os._exit(0)
        os.close(w)
        pipes.append(r)
        pids.append(pid)
    seen: list[set[str]] = []
    for r, pid in zip(pipes, pids, strict=True):
        data = b""
        while chunk := os.read(r, 65536):
            data += chunk
        os.close(r)
        os.waitpid(pid, 0)
        seen.append(set(data.decode().split(",")))
    assert all(len(s) == 50 for s in seen)
    assert not (seen[0] & seen[1]) and not (seen[0] & seen[2]) and not (seen[1] & seen[2])


def test_forked_reader_cannot_fill_through_a_sibling_token(redis_url: str, namespace: str, r: redis.Redis) -> None:
    """The whole scenario with real forked processes: worker A's voided lease, worker B leases the same key;
    A's stale fill must be refused (with identical token sequences it was accepted)."""
    key = "user:1"
    cache = cachesync.Cache(redis_url, namespace=namespace, ttl_jitter=0.0)
    cache.get("warm", lambda: 1)  # the parent used the cache before forking (pool, tokens)
    ek = entry_key(namespace, key)

    def child(to_parent: int, from_parent: int, value: str) -> None:
        c = cachesync.Cache(redis_url, namespace=namespace, ttl_jitter=0.0)

        def loader() -> str:
            os.write(to_parent, b"L")  # holds the lease now
            os.read(from_parent, 1)  # wait for the parent's go
            return value

        e = c.get_entry(key, loader)
        os.write(to_parent, b"1" if e.filled else b"0")
        os._exit(0)

    chans = []
    for value in ("old", "new"):
        a_r, a_w = os.pipe()
        b_r, b_w = os.pipe()
        pid = os.fork()
        if pid == 0:
            child(a_w, b_r, value)
        chans.append((pid, a_r, b_w))
        assert os.read(a_r, 1) == b"L"  # child holds its lease
        if value == "old":
            cache.invalidate(key)  # the write commits: A's lease is void; B (next) takes a fresh one
    (pa, a_in, a_go), (pb, b_in, b_go) = chans
    os.write(a_go, b"g")  # A (stale) fills first: must be refused
    assert os.read(a_in, 1) == b"0"
    os.write(b_go, b"g")
    assert os.read(b_in, 1) == b"1"
    for pid in (pa, pb):
        os.waitpid(pid, 0)
    assert cache.get(key, lambda: "loader-not-expected") == "new"
    assert hget(r, ek, "lt") is None
    cache.close()



def test_a_child_forked_while_a_read_is_in_flight_does_not_wait_for_it_forever(cache: cachesync.Cache) -> None:
    """multiprocessing with fork from a threaded app: a thread is leading a read of "k" (its flight's lock held)
    when another thread forks. The child has no such thread: its own read of "k" must not join that flight and
    block for ever."""
    loading, go = threading.Event(), threading.Event()

    def loader() -> str:
        loading.set()
        go.wait(10)
        return "parent"

    t = threading.Thread(target=lambda: cache.get("k", loader))
    t.start()
    try:
        assert loading.wait(10)  # the flight of "k" is led by t
        assert _in_child(lambda: cache.get("k", lambda: "child").encode()) == b"child"
    finally:
        go.set()
        t.join(10)


def _in_child(fn: Any, bound: float = 10.0) -> bytes | None:
    """Run ``fn() -> bytes`` in a forked child; its answer, or None if it gave none within ``bound`` seconds (the
    bound only keeps a hang from lasting: the child is killed)."""
    r_fd, w_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.write(w_fd, fn())
        finally:
            os._exit(0)
    os.close(w_fd)
    got: list[bytes] = []
    done = threading.Event()
    threading.Thread(target=lambda: (got.append(os.read(r_fd, 1000)), done.set()), daemon=True).start()
    answered = done.wait(bound)
    if not answered:
        os.kill(pid, 9)
    os.waitpid(pid, 0)
    os.close(r_fd)
    return got[0] if answered else None


def test_a_child_forked_while_fallback_loads_run_gets_its_own_fallback_permits(redis_url: str,
                                                                               namespace: str) -> None:
    """Redis down, fallback_concurrency=1: a parent thread is in its fallback load (the one permit taken) when
    another thread forks. The child's fallback load must not wait for a permit no thread of its own holds."""
    c = cachesync.Cache("redis://127.0.0.1:1/0", namespace=namespace, fallback_concurrency=1, connect_timeout=0.2)
    loading, go = threading.Event(), threading.Event()

    def loader() -> str:
        loading.set()
        go.wait(10)
        return "parent"

    t = threading.Thread(target=lambda: c.get("k", loader))
    t.start()
    try:
        assert loading.wait(10)
        assert _in_child(lambda: c.get("k", lambda: "child").encode()) == b"child"
    finally:
        go.set()
        t.join(10)
        c.close()


def test_a_child_forked_after_a_delayed_step_was_scheduled_does_not_report_it_undelivered(
        cache: cachesync.Cache, caplog: pytest.LogCaptureFixture) -> None:
    """The parent's delayed second delete is the parent's to deliver: the child's close() neither waits for it nor
    logs it as NOT delivered."""
    with cache.write("k", strategy="delayed_double_delete", delay=0.5):
        pass
    assert cache._pending

    def child() -> bytes:
        t0 = time.monotonic()
        left = cache.close(timeout=5)
        return f"{left!r} {time.monotonic() - t0 < 4}".encode()
    assert _in_child(child) == b"[] True"


# --------------------------------------------------------------------------- cancellation


async def test_cancelled_reader_releases_its_lease_and_wakes_other_processes(redis_url: str, namespace: str,
                                                                             r: redis.Redis) -> None:
    key = "slow"
    # a lease and a wait long enough that only a release (not its expiry) can end the wait within the bound
    a = cachesync.AsyncCache(redis_url, namespace=namespace, lease_ttl=60, max_wait=60, ttl_jitter=0.0)
    other = cachesync.Cache(redis_url, namespace=namespace, lease_ttl=60, max_wait=60, ttl_jitter=0.0)
    started = asyncio.Event()

    async def slow_loader() -> str:
        started.set()
        await asyncio.Event().wait()  # forever: the request times out
        return "never"

    task = asyncio.create_task(asyncio.wait_for(a.get(key, slow_loader), timeout=60))
    await started.wait()
    ek = entry_key(namespace, key)
    ours = hget(r, ek, "lt")
    assert ours is not None
    # another process's reader registers as a waiter on the lease
    waiter_result: list[Any] = []
    t = threading.Thread(target=lambda: waiter_result.append(other.get_entry(key, lambda: "mine")))
    t.start()
    _until(lambda: hget(r, ek, "w") is not None, "the other process to wait on the lease")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # released at once, not left to its 60 s deadline (the woken waiter may already hold a lease of its own)
    assert hget(r, ek, "lt") != ours
    await asyncio.to_thread(t.join, 20)
    assert not t.is_alive(), "the other process's waiter sat out the lease"
    assert waiter_result[0].value == "mine"
    await a.aclose()
    other.close()


async def test_wait_for_timeout_releases_the_lease(redis_url: str, namespace: str, r: redis.Redis) -> None:
    a = cachesync.AsyncCache(redis_url, namespace=namespace, lease_ttl=60, ttl_jitter=0.0)
    gate = asyncio.Event()

    async def loader() -> str:
        gate.set()
        await asyncio.sleep(3600)
        return "x"

    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.2):
            await a.get("k", loader)
    assert gate.is_set()
    assert hget(r, entry_key(namespace, "k"), "lt") is None
    assert await a.get("k", lambda: "loaded") == "loaded"  # the next reader leases at once
    await a.aclose()


def test_keyboard_interrupt_in_loader_releases_the_lease(cache: cachesync.Cache, r: redis.Redis,
                                                         namespace: str) -> None:
    def loader() -> str:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cache.get("k", loader)
    assert hget(r, entry_key(namespace, "k"), "lt") is None


def test_keyboard_interrupt_in_get_many_loader_releases_every_lease(cache: cachesync.Cache, r: redis.Redis,
                                                                    namespace: str) -> None:
    def loader(keys: list[str]) -> dict[str, int]:
        raise SystemExit(3)

    with pytest.raises(SystemExit):
        cache.get_many(["a", "b", "c"], loader)
    for k in "abc":
        assert hget(r, entry_key(namespace, k), "lt") is None


async def test_cancelled_get_many_releases_every_lease(acache: cachesync.AsyncCache, r: redis.Redis,
                                                       namespace: str) -> None:
    started = asyncio.Event()

    async def loader(keys: list[str]) -> dict[str, int]:
        started.set()
        await asyncio.sleep(3600)
        return {}

    task = asyncio.create_task(acache.get_many(["a", "b"], loader))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    for k in "ab":
        assert hget(r, entry_key(namespace, k), "lt") is None


# --------------------------------------------------------------------------- read-your-writes through singleflight


def test_follower_that_joined_before_a_write_never_gets_the_refused_older_value(cache: cachesync.Cache) -> None:
    db = {"v": "old"}
    loaded = threading.Event()
    go = threading.Event()

    def leader_loader() -> str:
        v = db["v"]  # reads the row before the write
        loaded.set()
        go.wait(10)
        return v

    leader_out: list[Any] = []
    lt = threading.Thread(target=lambda: leader_out.append(cache.get_entry("k", leader_loader)))
    lt.start()
    loaded.wait(10)
    follower_out: list[Any] = []
    ft = threading.Thread(target=lambda: follower_out.append(cache.get("k", lambda: db["v"])))
    ft.start()  # this read joins the leader's flight before the write (a read started after it leads its own)
    _until(lambda: cache.stats["singleflight_joins"] == 1, "the follower to join the leader's flight")
    db["v"] = "new"  # the write commits ...
    cache.invalidate("k")  # ... and its invalidation returns
    go.set()
    lt.join(10)
    ft.join(10)
    assert leader_out[0].value == "old" and not leader_out[0].filled  # its fill was refused
    assert follower_out == ["new"]
    assert cache.stats["singleflight_retries"] == 1


async def test_async_follower_that_joined_before_a_write_never_gets_the_refused_older_value(
        acache: cachesync.AsyncCache) -> None:
    db = {"v": "old"}
    loaded = asyncio.Event()
    go = asyncio.Event()

    async def leader_loader() -> str:
        v = db["v"]
        loaded.set()
        await go.wait()
        return v

    leader = asyncio.create_task(acache.get_entry("k", leader_loader))
    await loaded.wait()
    follower = asyncio.create_task(acache.get("k", lambda: db["v"]))
    while acache.stats["singleflight_joins"] < 1:
        await asyncio.sleep(0)  # let the follower run up to its join (before the write)
    db["v"] = "new"
    await acache.invalidate("k")
    go.set()
    e = await leader
    assert e.value == "old" and not e.filled
    assert await follower == "new"
    assert acache.stats["singleflight_retries"] == 1


# a reader that starts after an invalidation returned must not take a value read (or filled) before it: the
# leader's GET or fill ran in Redis before the invalidation, its reply reached the leader only after it returned


def _gated_sync_client(redis_url: str, gate: threading.Event, reached: threading.Event,
                       when: Any) -> redis.Redis:
    client = redis.Redis.from_url(redis_url)
    real = client.execute_command

    def execute_command(*args: Any, **kw: Any) -> Any:
        res = real(*args, **kw)
        if when(args) and threading.current_thread().name == "leader":
            reached.set()  # the command ran in Redis; its reply is held back from the caller
            gate.wait(10)
        return res

    client.execute_command = execute_command  # type: ignore[method-assign]
    return client


def test_follower_that_starts_after_an_invalidation_never_gets_a_fill_accepted_before_it(
        redis_url: str, namespace: str) -> None:
    gate, reached = threading.Event(), threading.Event()
    fill_sha = SCRIPTS["fill"].sha
    client = _gated_sync_client(redis_url, gate, reached, lambda a: a[0] == "EVALSHA" and a[1] == fill_sha)
    c = cachesync.Cache(client=client, namespace=namespace, record_namespace=False)
    db = {"v": "old"}
    try:
        leader_out: list[Any] = []
        lt = threading.Thread(target=lambda: leader_out.append(c.get_entry("k", lambda: db["v"])), name="leader")
        lt.start()
        assert reached.wait(10)  # the leader's fill of "old" was accepted by Redis
        db["v"] = "new"  # the write commits ...
        c.invalidate("k")  # ... and its invalidation returns
        follower_out: list[Any] = []
        ft = threading.Thread(target=lambda: follower_out.append(c.get("k", lambda: db["v"])))
        ft.start()  # this read begins after the invalidation returned
        _until(lambda: c.stats["singleflight_joins"] == 1 or not ft.is_alive(), "the follower to join or finish")
        gate.set()
        lt.join(10)
        ft.join(10)
        assert leader_out[0].value == "old" and leader_out[0].filled  # concurrent with the write: either is right
        assert follower_out == ["new"]
    finally:
        gate.set()
        c.close()
        client.close()


def _gated_async_client(redis_url: str, gate: asyncio.Event, reached: asyncio.Event, when: Any) -> Any:
    import redis.asyncio as aredis

    client = aredis.Redis.from_url(redis_url)
    real = client.execute_command

    async def execute_command(*args: Any, **kw: Any) -> Any:
        res = await real(*args, **kw)
        if when(args) and not reached.is_set():
            reached.set()  # the command ran in Redis; its reply is held back from the caller
            await gate.wait()
        return res

    client.execute_command = execute_command  # type: ignore[method-assign]
    return client


@pytest.mark.parametrize("held", ["hit", "fill"])
@pytest.mark.parametrize("l1", [False, True])
@pytest.mark.parametrize("op", ["invalidate", "set", "write"])
async def test_async_follower_that_starts_after_an_invalidation_never_gets_a_value_read_before_it(
        redis_url: str, namespace: str, held: str, l1: bool, op: str) -> None:
    gate, reached = asyncio.Event(), asyncio.Event()
    fill_sha = SCRIPTS["fill"].sha
    when = (lambda a: a[0] == "GET") if held == "hit" else (lambda a: a[0] == "EVALSHA" and a[1] == fill_sha)
    c0 = cachesync.Cache(redis_url, namespace=namespace, record_namespace=False)
    if held == "hit":
        c0.get("k", lambda: "old")  # cached: the leader's read is a hit
    c0.close()
    client = _gated_async_client(redis_url, gate, reached, when)
    c = cachesync.AsyncCache(client=client, namespace=namespace, record_namespace=False, l1=l1)
    if l1:
        assert c.l1 is not None and await c.l1.wait_ready(5)
    db = {"v": "old"}
    try:
        leader = asyncio.create_task(c.get_entry("k", lambda: db["v"]))
        await asyncio.wait_for(reached.wait(), 10)  # Redis answered the leader's read (or accepted its fill) with "old"
        if op == "write":
            async with c.write("k"):
                db["v"] = "new"
        else:
            db["v"] = "new"  # the write commits ...
            await (c.invalidate("k") if op == "invalidate" else c.set("k", "new"))  # ... and its cache step returns
        follower = asyncio.create_task(c.get("k", lambda: db["v"]))  # begins after the invalidation returned
        while c.stats["singleflight_joins"] < 1 and not follower.done():
            await asyncio.sleep(0)
        gate.set()
        assert (await leader).value == "old"  # concurrent with the write: either is right
        assert await follower == "new"
    finally:
        gate.set()
        await c.aclose()
        await client.aclose()


def test_followers_accept_a_filled_value(cache: cachesync.Cache) -> None:
    go = threading.Event()
    entered = threading.Event()

    def loader() -> str:
        entered.set()
        go.wait(10)
        return "v"

    outs: list[Any] = []
    threads = [threading.Thread(target=lambda: outs.append(cache.get("k", loader))) for _ in range(5)]
    threads[0].start()
    entered.wait(10)
    for t in threads[1:]:
        t.start()
    _until(lambda: cache.stats["singleflight_joins"] == 4, "four followers")
    go.set()
    for t in threads:
        t.join(10)
    assert outs == ["v"] * 5
    assert cache.stats["loads"] == 1 and cache.stats["singleflight_retries"] == 0


# --------------------------------------------------------------------------- close() keeps its word


def test_close_waits_for_the_delayed_delete(redis_url: str, namespace: str, r: redis.Redis) -> None:
    c = cachesync.Cache(redis_url, namespace=namespace, strategy="delayed_double_delete", double_delete_delay=0.2)
    with c.write("k"):
        pass
    c.get("k", lambda: "re-cached in the window")  # a reader in the window re-caches
    assert c.close() == []  # returns only after the second delete ran
    assert hget(r, entry_key(namespace, "k"), "v") is None


def test_close_reports_and_logs_undelivered_delayed_steps(namespace: str, caplog: pytest.LogCaptureFixture) -> None:
    from test_outbox import PrivateRedis

    srv = PrivateRedis()
    srv.start()
    try:
        c = cachesync.Cache(srv.url, namespace=namespace, strategy="delayed_double_delete",
                            double_delete_delay=0.05, socket_timeout=0.5, connect_timeout=0.2)
        with c.write("a", "b"):
            pass
        srv.stop()  # the second delete can no longer be delivered: it is retried ...
        with caplog.at_level(logging.ERROR, logger="cachesync"):
            left = c.close(timeout=0.5)  # ... until close gives up
        assert left == ["a", "b"]
        gave_up = [rec for rec in caplog.records if "NOT delivered" in rec.getMessage()]
        assert len(gave_up) == 1 and "'a'" in gave_up[0].getMessage() and "'b'" in gave_up[0].getMessage()
    finally:
        srv.close()


async def test_aclose_reports_undelivered_delayed_steps(redis_url: str, namespace: str,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    parked: list[Any] = []
    c = cachesync.AsyncCache(redis_url, namespace=namespace, strategy="delayed_double_delete",
                             scheduler=lambda delay, fn: parked.append(fn))  # a scheduler that never runs them
    async with c.write("x"):
        pass
    with caplog.at_level(logging.ERROR, logger="cachesync"):
        assert await c.aclose(timeout=0) == ["x"]
    assert any("NOT delivered" in rec.getMessage() for rec in caplog.records)


# --------------------------------------------------------------------------- validate before mutate


@pytest.mark.parametrize("opts", [dict(default_ttl=math.inf), dict(default_ttl=1e12), dict(lease_ttl=math.nan),
                                  dict(max_wait=-1), dict(double_delete_delay=math.inf), dict(tombstone_ttl=0),
                                  dict(ttl_jitter=math.nan)])
def test_options_beyond_what_redis_accepts_are_refused(opts: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match=next(iter(opts))):
        cachesync.Cache(**opts)


def test_options_are_frozen(cache: cachesync.Cache) -> None:
    with pytest.raises(AttributeError):
        cache.options.lease_ttl = -1  # type: ignore[misc]


@pytest.mark.parametrize("ttl", [math.inf, 1e12, math.nan, -1, 0])
def test_a_ttl_redis_would_refuse_stores_nothing(cache: cachesync.Cache, r: redis.Redis, namespace: str,
                                                 ttl: float) -> None:
    with pytest.raises(ConfigError, match="ttl"):
        cache.set("k", "v", ttl=ttl)
    with pytest.raises(ConfigError, match="ttl"):
        cache.get("k2", lambda: "v", ttl=ttl)
    assert r.exists(entry_key(namespace, "k"), entry_key(namespace, "k2")) == 0


@pytest.mark.parametrize("version", [math.nan, math.inf, Decimal("NaN"), Decimal("Infinity"), "nan", "inf", "1e999",
                                     2**60, "0x10", "", True, "\u0661\u0662"])  # last: Arabic-Indic digits
def test_versions_redis_cannot_compare_are_refused(cache: cachesync.Cache, version: object) -> None:
    with pytest.raises(UsageError, match="version"):
        cache.invalidate("k", version=version)
    with pytest.raises(UsageError, match="version"):
        cache.set("k", "v", version=version)


def _eval(r: redis.Redis, name: str, keys: list[str], args: list[Any]) -> Any:
    return r.eval(SCRIPTS[name].source, len(keys), *keys, *args)


@pytest.mark.parametrize("ttl", ["1e20", "inf", "nan", "-5", "x", ""])
def test_fill_script_validates_before_it_writes(r: redis.Redis, namespace: str, ttl: str) -> None:
    ek = entry_key(namespace, "k")
    with pytest.raises(redis.ResponseError, match="fill.lua"):
        _eval(r, "fill", [ek, ek + ":w"], ["", 10000, b"1", "", ttl, "0"])
    assert r.exists(ek) == 0


def test_fill_script_validates_every_key_before_the_first(r: redis.Redis, namespace: str) -> None:
    a, b = entry_key(namespace, "a"), entry_key(namespace, "b")
    with pytest.raises(redis.ResponseError, match="fill.lua"):
        _eval(r, "fill", [a, a + ":w", b, b + ":w"], ["", 10000, b"1", "", 1000, "0", b"2", "nan", 1000, "0"])
    assert r.exists(a, b) == 0


@pytest.mark.parametrize("args", [[b"v", "", "1e20", "0", 10000, ""], [b"v", "inf", 1000, "0", 10000, ""],
                                  [b"v", "", 1000, "2", 10000, ""], [b"v", "", 1000, "0", "x", ""]])
def test_set_script_validates_before_it_writes(r: redis.Redis, namespace: str, args: list[Any]) -> None:
    ek = entry_key(namespace, "k")
    with pytest.raises(redis.ResponseError, match="set.lua"):
        _eval(r, "set", [ek, ek + ":w"], args)
    assert r.exists(ek) == 0


@pytest.mark.parametrize("args", [["tok", "1e20", "L", 10000], ["tok", 1000, "Z", 10000], ["", 1000, "L", 10000],
                                  ["tok", 1000, "L", "nan"]])
def test_get_script_validates_before_it_writes(r: redis.Redis, namespace: str, args: list[Any]) -> None:
    ek = entry_key(namespace, "k")
    with pytest.raises(redis.ResponseError, match="get.lua"):
        _eval(r, "get", [ek, ek + ":w"], args)
    assert r.exists(ek) == 0


# --------------------------------------------------------------------------- corrupted and foreign entries


@pytest.mark.parametrize("fields", [{"v": b"\xff\xfe not json"}, {"v": b'"ok"', "ver": b"abc"},
                                    {"v": b'"ok"', "ver": b"nan"}])
def test_corrupted_entry_is_read_as_a_miss_and_replaced(cache: cachesync.Cache, r: redis.Redis, namespace: str,
                                                        fields: dict[str, bytes],
                                                        caplog: pytest.LogCaptureFixture) -> None:
    ek = entry_key(namespace, "k")
    hset(r, ek, mapping=fields)
    with caplog.at_level(logging.WARNING, logger="cachesync"):
        assert cache.get("k", lambda: cachesync.Versioned("fresh", 3)) == "fresh"
        assert cache.get("k", lambda: "loader-not-expected") == "fresh"  # replaced by the fill
        hset(r, ek, "v", b"\xff again")
        assert cache.get("k", lambda: "fresh2") == "fresh2"
    assert cache.stats["corrupt_entries"] == 2
    assert len([rec for rec in caplog.records if "corrupted or foreign" in rec.getMessage()]) == 1  # once per key


def test_foreign_key_of_the_wrong_type_is_replaced(cache: cachesync.Cache, r: redis.Redis, namespace: str) -> None:
    ek = entry_key(namespace, "k")
    r.set(ek, "a plain string someone else wrote")
    assert cache.get("k", lambda: "fresh") == "fresh"
    assert hget(r, ek, "v") == b'"fresh"'
    r.delete(ek)
    r.hset(ek, "v", "a hash")  # the wrong Redis type
    assert cache.get("k", lambda: "fresh") == "fresh"
    assert r.type(ek) == b"string" and hget(r, ek, "v") == b'"fresh"'
    r.delete(ek)
    r.rpush(ek, "a list")
    assert cache.set("k", "written") is True
    r.delete(ek)
    r.sadd(ek, "a set")
    cache.invalidate("k")  # never a raw redis error from a public call
    assert cache.get("k", lambda: "fresh") == "fresh"


@pytest.mark.parametrize("fields", [{"lt": b"someone", "ld": b"soon"}, {"fl": b"high"}, {"w": b"many"}])
def test_non_numeric_lease_floor_or_waiter_fields_do_not_break_reads(cache: cachesync.Cache, r: redis.Redis,
                                                                     namespace: str,
                                                                     fields: dict[str, bytes]) -> None:
    ek = entry_key(namespace, "k")
    hset(r, ek, mapping=fields)
    assert cache.get("k", lambda: cachesync.Versioned("fresh", 2)) == "fresh"
    assert cache.get("k", lambda: "loader-not-expected") == "fresh"
    assert cache.set("k", "w", version=5) is True


def test_get_many_repairs_corrupted_entries(cache: cachesync.Cache, r: redis.Redis, namespace: str) -> None:
    cache.set("good", "g")
    hset(r, entry_key(namespace, "bad"), mapping={"v": b"{not json", "ver": b"1"})
    r.set(entry_key(namespace, "foreign"), "x")
    got = cache.get_many(["good", "bad", "foreign"], lambda ks: {k: f"loaded-{k}" for k in ks})
    assert got == {"good": "g", "bad": "loaded-bad", "foreign": "loaded-foreign"}
    assert cache.get_many(["bad", "foreign"], lambda ks: {}) == {"bad": "loaded-bad", "foreign": "loaded-foreign"}


async def test_async_corrupted_entry_is_read_as_a_miss(acache: cachesync.AsyncCache, r: redis.Redis,
                                                       namespace: str) -> None:
    hset(r, entry_key(namespace, "k"), "v", b"\x00\x01")
    r.set(entry_key(namespace, "f"), "x")
    assert await acache.get("k", lambda: "fresh") == "fresh"
    assert await acache.get("f", lambda: "fresh") == "fresh"
    assert acache.stats["corrupt_entries"] == 2


# --------------------------------------------------------------------------- a string where keys belong


def test_a_single_string_is_not_a_sequence_of_keys(cache: cachesync.Cache) -> None:
    with pytest.raises(UsageError, match="single string"):
        cache.get_many("user:1", lambda ks: {})
    with pytest.raises(UsageError, match="separate arguments"):
        cache.invalidate(["a", "b"])  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="separate arguments"):
        with cache.write(["a"]):  # type: ignore[arg-type]
            pass


async def test_async_single_string_is_not_a_sequence_of_keys(acache: cachesync.AsyncCache) -> None:
    with pytest.raises(UsageError, match="single string"):
        await acache.get_many("user:1", lambda ks: {})
    with pytest.raises(UsageError, match="separate arguments"):
        await acache.invalidate(("a",))  # type: ignore[arg-type]


def test_a_key_with_a_lone_surrogate_is_refused_with_a_clear_error(cache: cachesync.Cache) -> None:
    """A str that has no UTF-8 form could never be sent to Redis: refused as an invalid key (naming it), not a
    UnicodeEncodeError from inside redis-py; a relay parks such a row (tests/test_outbox.py)."""
    from cachesync.errors import InvalidKeyError

    for call in (lambda: cache.get("a\ud800", lambda: 1), lambda: cache.invalidate("a\ud800"),
                 lambda: cache.invalidate_many([(["ok", "a\ud800"], None)])):
        with pytest.raises(InvalidKeyError, match="surrogate"):
            call()
    assert cache.get("\u00e9t\u00e9", lambda: 1) == 1  # non-ASCII keys are fine


@pytest.mark.parametrize("held", ["hit", "fill"])
async def test_async_l1_follower_that_starts_after_another_process_write_was_heard_never_gets_the_older_value(
        redis_url: str, namespace: str, held: str) -> None:
    """With an L1 this process hears other processes' invalidations: once its subscriber has applied one, a read
    that starts must not join a flight whose GET (or accepted fill) ran in Redis before that write."""
    gate, reached = asyncio.Event(), asyncio.Event()
    fill_sha = SCRIPTS["fill"].sha
    when = (lambda a: a[0] == "GET") if held == "hit" else (lambda a: a[0] == "EVALSHA" and a[1] == fill_sha)
    other = cachesync.Cache(redis_url, namespace=namespace, record_namespace=False)  # another process
    if held == "hit":
        other.get("k", lambda: "old")
    client = _gated_async_client(redis_url, gate, reached, when)
    c = cachesync.AsyncCache(client=client, namespace=namespace, record_namespace=False, l1=True)
    assert c.l1 is not None and await c.l1.wait_ready(5)
    core = c.l1.core
    db = {"v": "old"}
    try:
        leader = asyncio.create_task(c.get_entry("k", lambda: db["v"]))
        await asyncio.wait_for(reached.wait(), 10)  # Redis answered the leader's read (or accepted its fill)
        heard = core.stats["invalidations"]
        db["v"] = "new"
        other.set("k", "new")  # the other process's write returns
        for _ in range(5000):
            if core.stats["invalidations"] > heard:
                break
            await asyncio.sleep(0.002)  # this process's subscriber applies it
        assert core.stats["invalidations"] > heard
        follower = asyncio.create_task(c.get("k", lambda: db["v"]))
        while c.stats["singleflight_joins"] < 1 and not follower.done():
            await asyncio.sleep(0)
        gate.set()
        assert (await leader).value == "old"
        assert await follower == "new"
    finally:
        gate.set()
        other.close()
        await c.aclose()
        await client.aclose()


def test_l1_follower_that_starts_after_another_process_write_was_heard_never_gets_a_fill_accepted_before_it(
        redis_url: str, namespace: str) -> None:
    gate, reached = threading.Event(), threading.Event()
    fill_sha = SCRIPTS["fill"].sha
    client = _gated_sync_client(redis_url, gate, reached, lambda a: a[0] == "EVALSHA" and a[1] == fill_sha)
    c = cachesync.Cache(client=client, namespace=namespace, record_namespace=False, l1=True)
    other = cachesync.Cache(redis_url, namespace=namespace, record_namespace=False)  # another process
    assert c.l1 is not None and c.l1.wait_ready(5)
    core = c.l1.core
    db = {"v": "old"}
    try:
        leader_out: list[Any] = []
        lt = threading.Thread(target=lambda: leader_out.append(c.get_entry("k", lambda: db["v"])), name="leader")
        lt.start()
        assert reached.wait(10)  # the leader's fill of "old" was accepted by Redis
        heard = core.stats["invalidations"]
        db["v"] = "new"
        other.invalidate("k")  # the other process's write returns ...
        _until(lambda: core.stats["invalidations"] > heard, "this process's subscriber to apply it")
        follower_out: list[Any] = []
        ft = threading.Thread(target=lambda: follower_out.append(c.get("k", lambda: db["v"])))
        ft.start()  # ... and this read begins after it was heard
        _until(lambda: c.stats["singleflight_joins"] == 1 or not ft.is_alive(), "the follower to join or finish")
        gate.set()
        lt.join(10)
        ft.join(10)
        assert leader_out[0].value == "old"
        assert follower_out == ["new"]
    finally:
        gate.set()
        other.close()
        c.close()
        client.close()


def test_followers_of_a_read_that_fell_back_load_side_by_side(hung_url: str) -> None:
    """A hung Redis: every thread's GET times out; the flight's leader loads uncached (fallback), which its
    followers may not take; they then load on their own side by side (at most fallback_concurrency at once),
    not in a chain of flights where each waits for the previous one's load."""
    n = 4
    c = cachesync.Cache(hung_url, socket_timeout=0.2, record_namespace=False)
    leading, go = threading.Event(), threading.Event()
    together = threading.Barrier(n, timeout=10)  # the followers' own loads: all at once, or broken

    def leader_loader() -> str:
        leading.set()
        go.wait(10)
        return "db"

    def follower_loader() -> str:
        together.wait()
        return "db"

    outs: list[Any] = []
    lt = threading.Thread(target=lambda: outs.append(c.get_entry("k", leader_loader)))
    lt.start()
    assert leading.wait(10)
    fts = [threading.Thread(target=lambda: outs.append(c.get_entry("k", follower_loader))) for _ in range(n)]
    for t in fts:
        t.start()
    _until(lambda: c.stats["singleflight_joins"] == n, "the followers to join")
    go.set()
    for t in [lt, *fts]:
        t.join(30)
    assert not together.broken
    assert [(e.value, e.source) for e in outs] == [("db", "fallback")] * (n + 1)
    assert c._flights == {}
    c.close()


# ---------------------------------------------------------------------------- NOSCRIPT that does not go away


def _flush_after_load(cache: Any, r: redis.Redis, times: int) -> list[int]:
    """Make Redis forget the scripts right after each of the cache's next ``times`` SCRIPT LOADs (as a script
    cache flushed again and again would): returns a one-item counter of the loads seen."""
    seen = [0]
    inner = cache._command

    def command(eff: Any) -> Any:
        out = inner(eff)
        if eff.args[:2] == ("SCRIPT", "LOAD"):
            seen[0] += 1
            if seen[0] <= times:
                r.script_flush()
        return out
    cache._command = command
    return seen


def test_a_script_flushed_after_each_load_is_a_named_error_not_the_internal_signal(cache: cachesync.Cache,
                                                                                  r: redis.Redis) -> None:
    # P.NoScript is the driver -> flow signal: it must never reach a caller. A script lost again right after its
    # reload is loaded again (up to P.SCRIPT_LOADS times), then refused with an error that names the script.
    r.script_flush()
    seen = _flush_after_load(cache, r, times=10**6)
    with pytest.raises(cachesync.RedisCommandError, match="get.lua"):
        cache.get("k", lambda: 1)
    assert P.SCRIPT_LOADS <= seen[0] <= 2 * P.SCRIPT_LOADS  # get.lua's loads (and release.lua's, after it)
    r.script_flush()
    seen[0] = 0
    with pytest.raises(cachesync.InvalidationError) as ei:  # an invalidation names its keys
        cache.invalidate("k")
    assert ei.value.keys == ["k"] and "invalidate.lua" in str(ei.value)


def test_a_script_flushed_once_after_its_load_is_loaded_again(cache: cachesync.Cache, r: redis.Redis) -> None:
    r.script_flush()
    seen = _flush_after_load(cache, r, times=1)
    assert cache.get("k", lambda: 1) == 1
    assert seen[0] == 3  # get.lua twice (flushed after its first load), then fill.lua
    assert cache.get("k", lambda: 2) == 1


async def test_async_a_script_flushed_after_each_load_is_a_named_error(redis_url: str, namespace: str,
                                                                       r: redis.Redis) -> None:
    c = cachesync.AsyncCache(redis_url, namespace=namespace)
    try:
        seen = [0]
        inner = c._command

        async def command(eff: Any) -> Any:
            out = await inner(eff)
            if eff.args[:2] == ("SCRIPT", "LOAD"):
                seen[0] += 1
                r.script_flush()
            return out
        c._command = command  # type: ignore[method-assign]
        r.script_flush()
        with pytest.raises(cachesync.RedisCommandError, match="get.lua"):
            await c.get("k", lambda: 1)
        assert P.SCRIPT_LOADS <= seen[0] <= 2 * P.SCRIPT_LOADS
    finally:
        await c.aclose()
