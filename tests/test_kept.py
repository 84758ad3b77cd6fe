"""Kept connections (cachesync._sync.conns): the sync cache's GET/MGET/EVALSHA on connections kept checked out of
the pool. Real Redis; the failures are real ones (CLIENT KILL, a paused private server, a fork), and one hook
(a connection class that raises between a command's send and its read) forces the interleaving that the pool's
"unread data" check exists for."""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import redis

import cachesync
from test_hostile_core import _in_child


def _client_id(conn: Any) -> int:
    conn.send_command("CLIENT", "ID")
    return int(conn.read_response())


def test_the_default_cache_keeps_its_connection_and_serves_every_read_on_it(redis_url: str, namespace: str) -> None:
    cache = cachesync.Cache(redis_url, namespace=namespace, record_namespace=False)
    assert cache._kept is not None
    assert cache.get("a", lambda: 1) == 1  # miss: GET, get.lua, fill.lua
    for _ in range(20):
        assert cache.get("a", lambda: 2) == 1
    assert cache.get_many(["a", "b"], lambda ks: {k: 3 for k in ks}) == {"a": 1, "b": 3}
    cache.invalidate("a")
    assert len(cache._kept.free) == 1  # one caller at a time: one connection, kept
    pool = cache.redis.connection_pool
    # (a SCRIPT LOAD after another test flushed the script cache goes through the pool: it may hold one more)
    assert pool._in_use_connections == set(cache._kept.free) and len(pool._available_connections) <= 1
    cache.close()


def test_concurrent_callers_each_get_a_connection_of_their_own(cache: cachesync.Cache) -> None:
    """Three threads inside a read at once (held by their loaders) use three connections; afterwards all three are
    kept, and each reply went to the caller that asked for it."""
    inside = threading.Barrier(4)
    results: dict[str, object] = {}

    def read(k: str) -> None:
        def loader() -> str:
            inside.wait(10)
            return "v" + k
        results[k] = cache.get(k, loader)

    ts = [threading.Thread(target=read, args=(k,)) for k in "xyz"]
    for t in ts:
        t.start()
    inside.wait(10)
    for t in ts:
        t.join(10)
    assert results == {"x": "vx", "y": "vy", "z": "vz"}
    assert cache._kept is not None and len(cache._kept.free) == 3
    assert {cache.get(k, lambda: "reloaded") for k in "xyz"} == {"vx", "vy", "vz"}


def test_a_kept_connection_the_server_closed_is_sent_again_not_failed(cache: cachesync.Cache,
                                                                      r: redis.Redis) -> None:
    """The pool's check catches a connection the server closed while idle (its timeout, a restart, CLIENT KILL);
    a kept connection must recover the same way: the invalidation after a kill succeeds (it raised
    InvalidationError without the retry), and the read after it is served from Redis, not by a fallback load."""
    assert cache.get("k", lambda: "v1") == "v1"
    assert cache._kept is not None
    [conn] = cache._kept.free
    r.client_kill_filter(_id=_client_id(conn))
    assert cache.invalidate("k") == 1  # sent again through the pool
    assert cache.get("k", lambda: "v2") == "v2"  # a miss on a connection of the pool's, kept now
    r.client_kill_filter(_id=_client_id(cache._kept.free[0]))
    assert cache.get("k", lambda: "v3") == "v2"  # a hit, sent again on a fresh connection
    assert cache.stats["redis_errors"] == 0 and cache.stats["fallback_loads"] == 0


class _Interrupting(redis.Connection):
    """Raises KeyboardInterrupt once, after a command was sent and before its reply is read (a signal landing
    between the two)."""

    armed = False

    def read_response(self, *args: Any, **kwargs: Any) -> Any:
        if _Interrupting.armed:
            _Interrupting.armed = False
            raise KeyboardInterrupt
        return super().read_response(*args, **kwargs)


def test_an_interrupt_between_send_and_read_never_leaves_a_reply_for_the_next_command(
        redis_url: str, namespace: str) -> None:
    """Without the disconnect, the next read on that connection would take the interrupted GET's reply: the
    value of another key."""
    pool = redis.ConnectionPool.from_url(redis_url, connection_class=_Interrupting, max_connections=2**31)
    client = redis.Redis(connection_pool=pool)
    c = cachesync.Cache(client=client, namespace=namespace, record_namespace=False)
    try:
        assert c._kept is not None
        c.set("a", "value of a")
        c.set("b", "value of b")
        _Interrupting.armed = True
        with pytest.raises(KeyboardInterrupt):
            c.get("a", lambda: "loaded a")
        assert c.get("b", lambda: "loaded b") == "value of b"
        assert c.get("a", lambda: "loaded a") == "value of a"
    finally:
        _Interrupting.armed = False
        c.close()
        client.close()
        pool.disconnect()  # a pool given explicitly is not closed with its client


def test_the_cache_keeps_no_connection_where_the_pool_must_get_them_back(redis_url: str, namespace: str) -> None:
    """A blocking or bounded pool (another caller would wait for a kept connection; redis-py's default pool holds
    at most 100), RESP3 (push messages), a
    single-connection client, and kept_connections=False all use execute_command."""
    import redis.asyncio as aredis

    acases = [cachesync.AsyncCache(redis_url, namespace=namespace, max_connections=4),
              cachesync.AsyncCache(redis_url, namespace=namespace, kept_connections=False),
              cachesync.AsyncCache(client=aredis.Redis.from_url(redis_url, protocol=3), namespace=namespace)]
    assert all(c._kept is None for c in acases)
    cases: list[cachesync.Cache] = [
        cachesync.Cache(redis_url, namespace=namespace, max_connections=4),
        cachesync.Cache(redis_url, namespace=namespace, kept_connections=False),
        cachesync.Cache(client=redis.Redis.from_url(redis_url, protocol=3), namespace=namespace),
        cachesync.Cache(client=redis.Redis.from_url(redis_url, single_connection_client=True), namespace=namespace),
        cachesync.Cache(client=redis.Redis.from_url(redis_url), namespace=namespace),  # redis-py's default: 100
    ]
    try:
        for c in cases:
            assert c._kept is None
            assert c.get("k", lambda: "v") == "v"
            assert c.get("k", lambda: "other") == "v"
    finally:
        for c in cases:
            c.close()


def test_close_hands_the_kept_connections_back_to_a_given_clients_pool(redis_url: str, namespace: str) -> None:
    client = redis.Redis.from_url(redis_url, max_connections=2**31)  # redis-py's default (100) is never kept
    c = cachesync.Cache(client=client, namespace=namespace, record_namespace=False)
    assert c.get("k", lambda: "v") == "v"
    pool = client.connection_pool
    assert c._kept is not None
    [kept] = c._kept.free
    assert pool._in_use_connections == {kept}
    c.close()
    assert len(pool._in_use_connections) == 0 and kept in pool._available_connections
    assert client.ping()  # the client goes on working on the connection it got back
    client.close()


def test_a_forked_child_never_sends_on_its_parents_connections(cache: cachesync.Cache) -> None:
    """gunicorn --preload: the parent used the cache (one kept connection) before forking. The child must read on
    a connection of its own (a shared socket would interleave the two processes' replies), while the parent keeps
    reading on its own at the same time."""
    cache.set("p", "parent's")
    cache.set("c", "child's")
    assert cache.get("p", lambda: "x") == "parent's"
    assert cache._kept is not None
    [parent_conn] = cache._kept.free
    parent_id = _client_id(parent_conn)

    def child() -> bytes:
        assert cache._kept is not None and cache._kept.free == []
        ok = all(cache.get("c", lambda: "x") == "child's" for _ in range(300))
        return f"{int(ok)},{_client_id(cache._kept.free[0])}".encode()

    box: list[bytes | None] = []
    t = threading.Thread(target=lambda: box.append(_in_child(child)))
    t.start()
    parent_ok = all(cache.get("p", lambda: "x") == "parent's" for _ in range(300))
    t.join(20)
    assert box and box[0] is not None
    ok, child_id = box[0].decode().split(",")
    assert ok == "1" and parent_ok
    assert int(child_id) != parent_id
    assert _client_id(cache._kept.free[0]) == parent_id  # the parent still owns its connection


# --------------------------------------------------------------------------- a paused (timing-out) server


@pytest.fixture
def paused_redis() -> Iterator[str]:
    """A private redis-server on a free loopback port (CLIENT PAUSE there stalls nobody else)."""
    from test_health import PrivateRedis

    if shutil.which("redis-server") is None:
        if os.environ.get("CI"):
            pytest.fail("redis-server is needed on PATH")
        pytest.skip("redis-server not installed")
    srv = PrivateRedis()
    srv.start()
    yield srv.url
    srv.close()


def _counting_resends(client: Any) -> list[tuple[Any, ...]]:
    """Record every command sent through ``client.execute_command``: a kept connection's command sent again goes
    there (and nothing else of a read does)."""
    sent: list[tuple[Any, ...]] = []
    real = client.execute_command

    def spy(*args: Any, **kw: Any) -> Any:
        sent.append(args)
        return real(*args, **kw)

    client.execute_command = spy
    return sent


def test_a_timed_out_read_never_hands_its_late_reply_to_the_next_command(paused_redis: str,
                                                                         namespace: str) -> None:
    """The server stalls (CLIENT PAUSE) past the socket timeout: the read falls back to the loader; its GET's reply
    arrives later on that socket. The next reads must get their own replies (the timed-out connection is
    disconnected, never kept) and the timeout is not sent again (a hung server would double the wait)."""
    c = cachesync.Cache(paused_redis, namespace=namespace, socket_timeout=0.3)
    admin = redis.Redis.from_url(paused_redis)
    try:
        c.set("a", "value of a")
        c.set("b", "value of b")
        assert c.get("a", lambda: "x") == "value of a"
        resent = _counting_resends(c.redis)
        admin.client_pause(1000, all=True)
        assert c.get("a", lambda: "fallback a") == "fallback a"
        assert resent == []  # one attempt: a timeout is not sent again (a hung server would double the wait)
        assert c.stats["fallback_loads"] == 1
        admin.client_unpause()
        assert c.get("b", lambda: "loaded b") == "value of b"
        assert c.get("a", lambda: "loaded a") == "value of a"
    finally:
        c.close()
        admin.close()


# --------------------------------------------------------------------------- asyncio (cachesync._async.conns)


async def _aclient_id(conn: Any) -> int:
    await conn.send_command("CLIENT", "ID")
    return int(await conn.read_response())


async def test_async_cache_keeps_its_connection_and_concurrent_tasks_get_their_own(redis_url: str,
                                                                                   namespace: str) -> None:
    import asyncio

    c = cachesync.AsyncCache(redis_url, namespace=namespace, record_namespace=False)
    try:
        assert c._kept is not None
        assert await c.get("a", lambda: 1) == 1
        for _ in range(20):
            assert await c.get("a", lambda: 2) == 1
        assert await c.get_many(["a", "b"], lambda ks: {k: 3 for k in ks}) == {"a": 1, "b": 3}
        await c.invalidate("a")
        assert len(c._kept.free) == 1
        inside = asyncio.Barrier(3)

        async def loader(k: str) -> str:
            await inside.wait()
            return "v" + k

        got = await asyncio.gather(*(c.get(k, lambda k=k: loader(k)) for k in "xyz"))
        assert got == ["vx", "vy", "vz"] and len(c._kept.free) == 3
        assert [await c.get(k, lambda: "reloaded") for k in "xyz"] == ["vx", "vy", "vz"]
    finally:
        await c.aclose()


async def test_async_kept_connection_the_server_closed_is_sent_again(acache: cachesync.AsyncCache,
                                                                     r: redis.Redis) -> None:
    assert await acache.get("k", lambda: "v1") == "v1"
    assert acache._kept is not None
    r.client_kill_filter(_id=await _aclient_id(acache._kept.free[0]))
    assert await acache.invalidate("k") == 1  # sent again through the pool (InvalidationError without it)
    assert await acache.get("k", lambda: "v2") == "v2"
    r.client_kill_filter(_id=await _aclient_id(acache._kept.free[0]))
    assert await acache.get("k", lambda: "v3") == "v2"  # a hit, sent again on a fresh connection
    assert acache.stats["redis_errors"] == 0 and acache.stats["fallback_loads"] == 0


def _async_interrupting() -> type:
    import redis.asyncio as aredis

    class Interrupting(aredis.Connection):
        """Raises CancelledError once, after a command was sent and before its reply is read (a cancellation
        landing between the two, the way a caller's timeout does)."""

        armed = False

        async def read_response(self, *args: Any, **kwargs: Any) -> Any:
            import asyncio

            if Interrupting.armed:
                Interrupting.armed = False
                raise asyncio.CancelledError
            return await super().read_response(*args, **kwargs)

    return Interrupting


async def test_async_cancellation_between_send_and_read_never_leaves_a_reply_for_the_next_command(
        redis_url: str, namespace: str) -> None:
    import asyncio

    import redis.asyncio as aredis

    conn_cls = _async_interrupting()
    pool = aredis.ConnectionPool.from_url(redis_url, connection_class=conn_cls, max_connections=2**31)
    client = aredis.Redis(connection_pool=pool)
    c = cachesync.AsyncCache(client=client, namespace=namespace, record_namespace=False)
    try:
        assert c._kept is not None
        await c.set("a", "value of a")
        await c.set("b", "value of b")
        conn_cls.armed = True  # type: ignore[attr-defined]
        with pytest.raises(asyncio.CancelledError):
            await c.get("a", lambda: "loaded a")
        assert await c.get("b", lambda: "loaded b") == "value of b"
        assert await c.get("a", lambda: "loaded a") == "value of a"
    finally:
        await c.aclose()
        await client.aclose()
        await pool.disconnect()  # a pool given explicitly is not closed with its client


def test_async_cache_used_on_a_second_event_loop_reads_on_connections_of_that_loop(redis_url: str,
                                                                                  namespace: str) -> None:
    """asyncio.run twice (a CLI command per run, a test per loop): the first loop's kept connection is bound to a
    closed loop; the second run must read on a connection of its own, from Redis (no fallback, no error). (Through
    redis.asyncio's pool alone the second run fails too: "got Future attached to a different loop".)"""
    import asyncio
    import gc
    import warnings

    c = cachesync.AsyncCache(redis_url, namespace=namespace, record_namespace=False)

    async def first() -> object:
        return await c.get("k", lambda: "v")

    assert asyncio.run(first()) == "v"
    assert c._kept is not None
    old = list(c._kept.free)

    async def second() -> tuple[object, object]:
        got = await c.get("k", lambda: "reloaded"), await c.get_many(["k"], lambda ks: {})
        for conn in old:  # the closed loop's connection: nothing can close it now (redis.asyncio's pool neither)
            c.redis.connection_pool._in_use_connections.discard(conn)
        await c.aclose()
        return got

    assert asyncio.run(second()) == ("v", {"k": "v"})
    assert c.stats["fallback_loads"] == 0 and c.stats["redis_errors"] == 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        old.clear()
        gc.collect()


async def test_async_timed_out_read_never_hands_its_late_reply_to_the_next_command(paused_redis: str,
                                                                                   namespace: str) -> None:
    import asyncio

    import redis.asyncio as aredis

    c = cachesync.AsyncCache(paused_redis, namespace=namespace, socket_timeout=0.3)
    admin = aredis.Redis.from_url(paused_redis)
    try:
        await c.set("a", "value of a")
        await c.set("b", "value of b")
        assert await c.get("a", lambda: "x") == "value of a"
        sent: list[tuple[Any, ...]] = []
        real = c.redis.execute_command

        async def spy(*args: Any, **kw: Any) -> Any:  # where a kept connection's command sent again goes
            sent.append(args)
            return await real(*args, **kw)

        c.redis.execute_command = spy
        await admin.client_pause(1000, all=True)
        assert await c.get("a", lambda: "fallback a") == "fallback a"
        assert sent == []  # one attempt: the watchdog's timeout is not sent again
        assert c.stats["fallback_loads"] == 1
        await admin.client_unpause()
        await asyncio.sleep(0)
        assert await c.get("b", lambda: "loaded b") == "value of b"
        assert await c.get("a", lambda: "loaded a") == "value of a"
    finally:
        await c.aclose()
        await admin.aclose()


# --------------------------------------------------------------------------- packing and batches


def test_hiredis_packing_writes_the_bytes_redis_py_writes() -> None:
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from cachesync._driver import kept_packer

    pool = redis.ConnectionPool.from_url("redis://127.0.0.1:6379/0")
    pack = kept_packer(pool)
    assert pack is not None
    conn = pool.make_connection()
    arg = st.one_of(st.text(st.characters(blacklist_categories=["Cs"])), st.binary(), st.integers(),
                    st.floats(allow_nan=False))

    @settings(max_examples=300, deadline=None)
    @given(st.sampled_from(["GET", "MGET", "EVALSHA"]), st.lists(arg, max_size=8))
    def same(cmd: str, rest: list[Any]) -> None:
        args = (cmd, *rest)
        assert pack(args) == b"".join(conn._command_packer.pack(*args))

    same()
    with pytest.raises(TypeError):  # a bool is refused (redis-py names it: the caller packs with redis-py then)
        pack(("GET", True))


def test_a_pool_with_another_encoding_is_packed_by_redis_py(redis_url: str, namespace: str,
                                                            r: redis.Redis) -> None:
    """encoding="latin-1": redis-py writes str arguments in latin-1, hiredis would write UTF-8 (another key)."""
    from cachesync._driver import kept_packer
    from cachesync.keys import entry_key

    client = redis.Redis.from_url(redis_url, encoding="latin-1", max_connections=2**31)
    assert kept_packer(client.connection_pool) is None
    c = cachesync.Cache(client=client, namespace=namespace, record_namespace=False)
    try:
        assert c._kept is not None and c._kept.pack is None
        assert c.get("caf\u00e9", lambda: "v") == "v"
        assert r.exists(entry_key(namespace, "caf\u00e9").encode("latin-1"))
        assert c.get("caf\u00e9", lambda: "other") == "v"
    finally:
        c.close()
        client.close()


def test_a_batch_goes_over_the_kept_connection_and_survives_a_server_closed_one(cache: cachesync.Cache,
                                                                                r: redis.Redis) -> None:
    """invalidate_many of three chunks is one Batch (pipelined invalidate.lua calls): on the kept connection, and
    when the server closed that connection while idle, sent again through redis-py's pipeline (not failed)."""
    import cachesync.protocol as P

    keys = [f"k{i}" for i in range(2 * P.INVALIDATE_CHUNK + 5)]
    for k in keys[:3]:
        cache.set(k, "v")
    assert cache._kept is not None
    [conn] = cache._kept.free
    assert cache.invalidate_many([(keys, 3)]) == 3
    assert cache._kept.free == [conn]  # the batch went over the kept connection
    cache.set(keys[0], "w")
    assert cache._kept.free == [conn]
    r.client_kill_filter(_id=_client_id(conn))
    assert cache.invalidate_many([(keys, 4)]) == 1  # sent again through the pipeline
    assert cache.stats["invalidations_failed"] == 0
    assert r.get(cache.ctx.ekey(keys[-1])) is not None  # the last chunk was applied (its floor)


async def test_async_batch_goes_over_the_kept_connection(acache: cachesync.AsyncCache, r: redis.Redis) -> None:
    import cachesync.protocol as P

    keys = [f"k{i}" for i in range(2 * P.INVALIDATE_CHUNK + 5)]
    for k in keys[:3]:
        await acache.set(k, "v")
    assert acache._kept is not None
    [conn] = acache._kept.free
    assert await acache.invalidate_many([(keys, 3)]) == 3
    assert acache._kept.free == [conn]
    await acache.set(keys[0], "w")
    r.client_kill_filter(_id=await _aclient_id(conn))
    assert await acache.invalidate_many([(keys, 4)]) == 1  # sent again through the pipeline
    assert acache.stats["invalidations_failed"] == 0


def test_async_cache_shared_by_threads_with_a_loop_each_keeps_a_free_list_per_loop(redis_url: str,
                                                                                  namespace: str) -> None:
    """Two threads, each running its own event loop, take turns on one AsyncCache (forced by a barrier). Each
    loop reads on connections of its own, and a turn never drops the other loop's connections: the pool holds
    two, however many turns there are. (With one free list replaced at each switch, every turn left the other
    loop's idle connections checked out for good: one leaked socket per turn.)"""
    import asyncio

    c = cachesync.AsyncCache(redis_url, namespace=namespace, record_namespace=False)
    turn = threading.Barrier(2)
    got: dict[str, list[object]] = {"a": [], "b": []}
    in_use: list[int] = []
    errors: list[BaseException] = []

    def run(name: str, first: bool) -> None:
        async def main() -> None:
            for _ in range(6):  # a, b, a, b ...
                if not first:
                    turn.wait(10)
                got[name].append(await c.get(name, lambda: "v" + name))
                if first:
                    turn.wait(10)
            turn.wait(10)  # both done
            if first:
                in_use.append(len(c.redis.connection_pool._in_use_connections))
            turn.wait(10)
            assert c._kept is not None
            for conn in c._kept._lists[asyncio.get_running_loop()]:  # this loop's, closed on it
                await conn.disconnect()
        try:
            asyncio.run(main())
        except BaseException as e:  # reported by the test below
            errors.append(e)

    ta = threading.Thread(target=run, args=("a", True))
    tb = threading.Thread(target=run, args=("b", False))
    ta.start()
    tb.start()
    ta.join(30)
    tb.join(30)
    assert not errors, errors
    assert got == {"a": ["va"] * 6, "b": ["vb"] * 6}
    assert c.stats["fallback_loads"] == 0
    assert in_use == [2]  # one per loop, kept
    asyncio.run(c.aclose())
