"""The asyncio driver runs the same protocol flows: the same behaviour, awaited."""

from __future__ import annotations

import asyncio
import socket

import pytest

import cachesync
from cachesync import protocol as P
from cachesync import NOT_FOUND, Versioned


async def test_reader_write_back_after_writer_delete_is_refused(acache):
    db = {"k": Versioned("100", 1)}
    loaded, go = asyncio.Event(), asyncio.Event()

    async def loader():
        v = db["k"]
        loaded.set()
        await go.wait()
        return v

    task = asyncio.create_task(acache.get_entry("k", loader))
    await loaded.wait()
    db["k"] = Versioned("99", 2)
    await acache.invalidate("k")
    go.set()
    e = await task
    assert e.value == "100" and e.filled is False
    assert (await acache.peek("k")).get("v") is None
    assert await acache.get("k", lambda: db["k"]) == "99"


async def test_stampede_singleflight(acache):
    calls = []
    release = asyncio.Event()

    async def loader():
        calls.append(1)
        await release.wait()
        return "v"

    tasks = [asyncio.create_task(acache.get("k", loader)) for _ in range(100)]
    await asyncio.sleep(0)
    release.set()
    assert await asyncio.gather(*tasks) == ["v"] * 100
    assert calls == [1]


async def test_stampede_across_clients(redis_url, namespace):
    a = cachesync.AsyncCache(redis_url, namespace=namespace)
    b = cachesync.AsyncCache(redis_url, namespace=namespace)
    loaded, go = asyncio.Event(), asyncio.Event()

    async def slow():
        loaded.set()
        await go.wait()
        return "v"

    ta = asyncio.create_task(a.get_entry("k", slow))
    await loaded.wait()
    tb = asyncio.create_task(b.get_entry("k", lambda: pytest.fail("b must wait, not load")))
    for _ in range(1000):
        p = await a.peek("k")
        if p and p.get("w") == b"1":
            break
        await asyncio.sleep(0.005)
    go.set()
    ea, eb = await ta, await tb
    assert ea.filled and eb.value == "v" and eb.source == "cache"
    await a.aclose()
    await b.aclose()


async def test_write_strategies(acache):
    async with acache.write("k", strategy="db_then_set_versioned", value="B", version=2):
        pass
    async with acache.write("k", strategy="db_then_set_versioned", value="A", version=1):
        pass
    assert (await acache.peek("k"))["value"] == "B"
    async with acache.write("k"):
        pass
    assert "v" not in (await acache.peek("k"))


async def test_delayed_double_delete_with_scheduler(redis_url, namespace):
    pending = []
    c = cachesync.AsyncCache(redis_url, namespace=namespace, scheduler=lambda d, fn: pending.append((d, fn)))
    await c.set("k", "old")
    async with c.write("k", strategy="delayed_double_delete", delay=0.3):
        await c.get("k", lambda: "stale")
    assert (await c.peek("k"))["value"] == "stale" and pending[0][0] == 0.3
    await pending[0][1]()
    assert "v" not in (await c.peek("k"))
    await c.aclose()


async def test_get_many_and_negative(acache):
    async def loader_many(keys):
        return {k: k.upper() for k in keys if k != "c"}

    assert await acache.get_many(["a", "b", "c"], loader_many) == {"a": "A", "b": "B", "c": NOT_FOUND}
    assert await acache.get_many(["a", "c"], lambda ks: pytest.fail("hit")) == {"a": "A", "c": NOT_FOUND}


async def test_cached_decorator(acache):
    calls = []

    @acache.cached("user:{uid}")
    async def user(uid: int):
        calls.append(uid)
        return {"id": uid}

    assert await user(1) == {"id": 1} and await user(1) == {"id": 1} and calls == [1]
    await user.invalidate(1)
    await user(1)
    assert calls == [1, 1]
    with pytest.raises(cachesync.UsageError, match="coroutine"):
        acache.cached("x")(lambda: 1)


def _dead_url() -> str:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"redis://:pw@127.0.0.1:{port}/0"


async def test_redis_down_policies():
    url = _dead_url()
    c = cachesync.AsyncCache(url, connect_timeout=0.2)
    e = await c.get_entry("k", lambda: "db")
    assert e.source == "fallback" and e.value == "db"
    with pytest.raises(cachesync.InvalidationError, match="user:1"):
        await c.invalidate("user:1")
    f = cachesync.AsyncCache(url, on_redis_error="fail", connect_timeout=0.2)
    with pytest.raises(cachesync.CacheUnavailableError) as ei:
        await f.get("k", lambda: 1)
    assert "pw" not in str(ei.value)
    await c.aclose()
    await f.aclose()


async def test_bad_input(acache):
    with pytest.raises(cachesync.InvalidKeyError):
        await acache.get("", lambda: 1)
    with pytest.raises(cachesync.SerializationError):
        await acache.get("k", lambda: object())
    with pytest.raises(cachesync.ConfigError):
        await acache.get("k", lambda: 1, ttl=0)


async def test_sync_and_async_share_state(acache, redis_url, namespace):
    s = cachesync.Cache(redis_url, namespace=namespace)
    assert await acache.get("k", lambda: {"a": 1}) == {"a": 1}
    assert s.get("k", lambda: pytest.fail("must hit")) == {"a": 1}
    s.invalidate("k")
    assert await acache.get("k", lambda: 2) == 2
    s.close()


async def test_hung_redis_times_out_instead_of_hanging(hung_url: str):
    """A server that accepts connections and never answers (a hung Redis): socket_timeout bounds each command."""
    url = hung_url
    c = cachesync.AsyncCache(url, socket_timeout=0.2)
    e = await c.get_entry("k", lambda: "db")
    assert e.source == "fallback" and e.value == "db"
    f = cachesync.AsyncCache(url, socket_timeout=0.2, on_redis_error="fail")
    with pytest.raises(cachesync.CacheUnavailableError, match="socket_timeout"):
        await f.get("k", lambda: 1)
    s = cachesync.Cache(url, socket_timeout=0.2, on_redis_error="fail")
    with pytest.raises(cachesync.CacheUnavailableError):
        s.get("k", lambda: 1)
    s.close()
    await c.aclose()
    await f.aclose()


async def test_hung_redis_bounds_pipelined_batches_ping_and_scans_too(hung_url: str):
    """A pipelined batch (an audit's peek of many keys, a batch of several invalidate.lua calls), ping() and
    keys_with_prefix() are bounded by socket_timeout like a single command: an error naming the timeout, not a
    hang."""
    url = hung_url
    c = cachesync.AsyncCache(url, socket_timeout=0.2, record_namespace=False)
    with pytest.raises(cachesync.CacheUnavailableError, match="socket_timeout"):
        await asyncio.wait_for(c.run(P.peek_values_flow(c.ctx, ["a", "b"])), 10)
    keys = [f"k{i}" for i in range(P.INVALIDATE_CHUNK + 1)]
    with pytest.raises(cachesync.InvalidationError, match="socket_timeout") as ei:
        await asyncio.wait_for(c.invalidate_many([(keys, 1)]), 10)
    assert list(ei.value.keys) == keys
    # the health check and a prefix scan are bounded too (both used to hang)
    with pytest.raises(cachesync.CacheUnavailableError, match="socket_timeout"):
        await asyncio.wait_for(c.ping(), 10)

    async def scan() -> list[str]:
        return [k async for k in c.keys_with_prefix("user:")]
    with pytest.raises(cachesync.InvalidationError, match="socket_timeout"):
        await asyncio.wait_for(scan(), 10)
    assert c._watchdog.inflight == {}
    await c.aclose()


async def test_cancelled_leader_of_a_hung_hit_lets_its_followers_read_again_and_leaves_no_flight(hung_url: str):
    """The hit fast path leads the key's flight itself: when the leader is cancelled while its GET hangs, its
    followers read again (one of them leads, the watchdog ends its GET), and no flight or in-flight command is
    left behind; an error of the GET is the flow's (fallback), a cancellation the caller's."""
    url = hung_url
    c = cachesync.AsyncCache(url, socket_timeout=0.3, record_namespace=False)
    leader = asyncio.create_task(c.get_entry("k", lambda: "db"))
    while "k" not in c._flights or not c._watchdog.inflight:
        await asyncio.sleep(0)  # the leader is inside its GET
    followers = [asyncio.create_task(c.get_entry("k", lambda: "db")) for _ in range(3)]
    while c.stats["singleflight_joins"] < 3:
        await asyncio.sleep(0)
    leader.cancel()
    with pytest.raises(asyncio.CancelledError):
        await leader
    got = await asyncio.gather(*followers)
    assert [e.value for e in got] == ["db"] * 3 and {e.source for e in got} == {"fallback"}
    assert c.stats["singleflight_retries"] >= 1
    assert c._flights == {} and c._watchdog.inflight == {} and c._watchdog.expired == set()
    await c.aclose()


async def test_async_hit_fast_path_one_get_shared_by_concurrent_hits_and_reused_by_a_miss(redis_url, namespace):
    """AsyncCache.get sends the flow's first command (the fast-path GET) itself inside the flight: a hit is
    that one command, 50 concurrent hits of one key share it, and a miss hands the reply to the flow (no second
    HMGET); a foreign key is still repaired by the flow."""
    import redis.asyncio as aredis

    client = aredis.Redis.from_url(redis_url)
    sent: list[str] = []
    real = client.execute_command

    async def execute_command(*args, **kw):
        sent.append(str(args[0]))
        return await real(*args, **kw)

    client.execute_command = execute_command  # type: ignore[method-assign]
    c = cachesync.AsyncCache(client=client, namespace=namespace)
    try:
        assert await c.get("k", lambda: "v1") == "v1"
        await asyncio.sleep(0)  # the namespace record (its own task) may run now
        sent[:] = [x for x in sent if x != "SET"]
        assert sent == ["GET", "EVALSHA", "EVALSHA"]
        sent.clear()
        results = await asyncio.gather(*(c.get_entry("k", lambda: "unused") for _ in range(50)))
        assert {(e.value, e.source) for e in results} == {("v1", "cache")}
        assert sent == ["GET"]
        sent.clear()
        await client.delete(c.ctx.ekey("k"))
        await client.set(c.ctx.ekey("k"), "foreign")
        sent.clear()
        assert await c.get("k", lambda: "v2") == "v2"
        assert sent == ["GET", "DEL", "EVALSHA", "EVALSHA"]
    finally:
        await c.aclose()
        await client.aclose()


async def test_cached_not_found_answer_async(acache) -> None:
    @acache.cached("nfa:{i}", not_found=KeyError)
    async def lookup(i: int) -> object:
        return cachesync.NOT_FOUND

    @acache.cached("nfb:{i}", not_found=lambda: "none")
    async def lookup2(i: int) -> object:
        return cachesync.NOT_FOUND

    with pytest.raises(KeyError):
        await lookup(1)
    assert await lookup2(1) == "none"


async def test_followers_of_a_hit_that_fell_back_do_not_queue_one_timeout_each_on_a_hung_redis(hung_url: str):
    """A hung Redis: the leader's GET times out and it loads uncached (fallback), which its followers may not take
    (read-your-writes); they read again on their own, side by side: one more socket_timeout for all of them, not
    a chain of flights each waiting socket_timeout in turn (the last of 6 readers waited 6 timeouts)."""
    import redis.asyncio as aredis

    client = aredis.Redis.from_url(hung_url)
    sent: list[str] = []
    pending = [0, 0]  # GETs unanswered now, most at once
    real = client.execute_command

    async def execute_command(*args, **kw):
        sent.append(str(args[0]))
        pending[0] += 1
        pending[1] = max(pending)
        try:
            return await real(*args, **kw)
        finally:
            pending[0] -= 1

    client.execute_command = execute_command  # type: ignore[method-assign]
    c = cachesync.AsyncCache(client=client, socket_timeout=0.3, record_namespace=False)
    try:
        leader = asyncio.create_task(c.get_entry("k", lambda: "db"))
        while "k" not in c._flights or not c._watchdog.inflight:
            await asyncio.sleep(0)  # the leader is inside its GET
        followers = [asyncio.create_task(c.get_entry("k", lambda: "db")) for _ in range(5)]
        while c.stats["singleflight_joins"] < 5:
            await asyncio.sleep(0)
        assert (await leader).source == "fallback"
        got = await asyncio.gather(*followers)
        assert [(e.value, e.source) for e in got] == [("db", "fallback")] * 5
        # the followers' own GETs were all sent at once, when the leader landed (not one after another)
        assert sent == ["GET"] * 6 and pending[1] == 5 and c.stats["singleflight_retries"] == 5
        assert c._flights == {} and c._watchdog.inflight == {}
    finally:
        await c.aclose()
        await client.aclose()


async def test_a_cancellation_that_meets_the_watchdogs_is_not_swallowed(hung_url: str):
    """The caller cancels a read (a request timeout, a shutdown) at the very moment the watchdog cancels its hung
    GET: the task must end cancelled, not turn both into one TimeoutError and go on to load (fallback)."""
    c = cachesync.AsyncCache(hung_url, socket_timeout=0.2, record_namespace=False)

    class CancelledToo(set):  # the caller's cancel() lands in the same tick as the watchdog's
        def add(self, t: asyncio.Task) -> None:
            super().add(t)
            t.cancel()

    c._watchdog.expired = CancelledToo()
    loads: list[int] = []
    task = asyncio.create_task(c.get_entry("k", lambda: loads.append(1) or "db"))
    with pytest.raises(asyncio.CancelledError):
        await task
    assert loads == [] and c._flights == {} and c._watchdog.inflight == {}
    c._watchdog.expired = set()
    # alone, the watchdog's cancellation is still the timeout (the flow falls back)
    e = await c.get_entry("k", lambda: "db")
    assert e.source == "fallback"
    await c.aclose()


async def test_the_watchdog_comes_back_after_its_task_was_cancelled(hung_url: str):
    """A shutdown that cancels every task of the loop (or any stray cancel) also ends the watchdog task: the
    next command starts a new one instead of running unbounded (against a hung Redis: a hang)."""
    c = cachesync.AsyncCache(hung_url, socket_timeout=0.2, record_namespace=False)
    assert (await c.get_entry("k", lambda: "db")).source == "fallback"
    wd = c._watchdog.task
    assert wd is not None
    wd.cancel()
    with pytest.raises(asyncio.CancelledError):
        await wd
    e = await asyncio.wait_for(c.get_entry("k", lambda: "db"), 10)  # (the bound only keeps a hang from lasting)
    assert e.source == "fallback" and c._watchdog.task is not wd
    await c.aclose()
