"""The CDC runner's invalidation transport (``cachesync.cdc.direct``): the core invalidation flow on one connection
the runner keeps, checked against ``Cache.invalidate_many`` (the reference) on the same batches -- one script call,
and several pipelined (more than 500 keys) --; the connection reused between batches, a lost connection replaced,
a batch whose reply was never read reported as not invalidated, an unreachable Redis an InvalidationError. Real
Redis (and a port nothing listens on)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import uuid
from typing import Any

import pytest

import cachesync
from cachesync.cdc.direct import DirectInvalidator
from cachesync.errors import InvalidationError

from test_hostile_l1 import frozen_redis  # noqa: F401 - a fixture


def _state(cache: cachesync.Cache, keys: list[str]) -> list[Any]:
    return [((p := cache.peek(k) or {}).get("fl"), bool(p.get("ti")), p.get("v")) for k in keys]


@pytest.mark.parametrize("n", [3, 1201])
def test_direct_matches_invalidate_many(redis_url: str, n: int) -> None:
    results = []
    for direct in (True, False):
        cache = cachesync.Cache(redis_url, namespace="t" + uuid.uuid4().hex[:12], tombstone_ttl=120)
        try:
            keys = [f"k:{i}" for i in range(n)]
            for k in keys[::2]:
                cache.set(k, "x", version=1)
            versions = {k: ("" if i % 3 == 0 else str(i + 1)) for i, k in enumerate(keys)}
            if direct:
                d = DirectInvalidator(cache)
                assert DirectInvalidator.usable(cache)
                had = d.invalidate(versions)
                d.close()
            else:
                had = cache.invalidate_many(([k], None if v == "" else v) for k, v in versions.items())
            results.append((had, _state(cache, keys), cache.ctx.stats["invalidations"]))
        finally:
            cache.close()
    assert results[0] == results[1]
    assert results[0][0] == (n + 1) // 2


def test_direct_keeps_one_connection_and_replaces_a_lost_one(redis_url: str, namespace: str) -> None:
    cache = cachesync.Cache(redis_url, namespace=namespace, tombstone_ttl=120)
    try:
        d = DirectInvalidator(cache)
        d.invalidate({"a": "1"})
        conn = d.conn
        d.invalidate({"b": "2"})
        assert d.conn is conn  # reused
        conn._sock.shutdown(socket.SHUT_RDWR)  # lost (the server closed it, say)
        d.invalidate({"c": "3"})  # sent again at once, on a new connection
        assert d.conn is not None  # (the pool may hand back the same Connection object, reconnected)
        assert [(cache.peek(k) or {}).get("fl") for k in "abc"] == [b"1", b"2", b"3"]
        assert cache.stats["invalidations_failed"] == 0  # delivered on the second try: not a failed key
        d.close()
    finally:
        cache.close()


def test_direct_writes_the_keys_redis_py_writes_on_a_pool_with_another_encoding(redis_url: str,
                                                                                namespace: str) -> None:
    """encoding="latin-1": hiredis would write the key in UTF-8 (another key, never invalidated); the invalidator
    packs with redis-py there, as the cache does."""
    import redis

    from cachesync.keys import entry_key

    client = redis.Redis.from_url(redis_url, encoding="latin-1")
    cache = cachesync.Cache(client=client, namespace=namespace, tombstone_ttl=120, record_namespace=False)
    raw = redis.Redis.from_url(redis_url)
    try:
        d = DirectInvalidator(cache)
        assert d._pack is None
        d.invalidate({"caf\u00e9": "7"})
        assert raw.get(entry_key(namespace, "caf\u00e9").encode("latin-1")) is not None  # its tombstone, floor 7
        assert raw.get(entry_key(namespace, "caf\u00e9").encode()) is None
        d.close()
    finally:
        cache.close()
        client.close()
        raw.close()


def test_a_started_batch_is_not_invalidated_until_its_reply_is_read(redis_url: str, namespace: str) -> None:
    """start() sends; anything else sent on the connection before finish() drops the connection, and finish() of
    the unread batch then raises InvalidationError (the caller sends it again), never a wrong reply."""
    cache = cachesync.Cache(redis_url, namespace=namespace, tombstone_ttl=120)
    try:
        d = DirectInvalidator(cache)
        p1 = d.start({"a": "1"})
        assert d.invalidate({"b": "2"}) == 0  # on a new connection
        with pytest.raises(InvalidationError):
            d.finish(p1)
        p2 = d.start({"c": "3"})
        assert d.finish(p2) == 0
        assert [(cache.peek(k) or {}).get("fl") for k in "abc"] == [b"1", b"2", b"3"]
        d.close()
    finally:
        cache.close()


def test_direct_with_redis_unreachable_raises_invalidation_error() -> None:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there
    cache = cachesync.Cache(f"redis://127.0.0.1:{port}/0", namespace="t" + uuid.uuid4().hex[:12])
    try:
        d = DirectInvalidator(cache)
        with pytest.raises(InvalidationError) as e:
            d.invalidate({"a": "1", "b": ""})
        assert set(e.value.keys) == {"a", "b"}
        p = d.start({"c": "1"})
        with pytest.raises(InvalidationError):
            d.finish(p)
    finally:
        cache.close()


def test_a_frozen_redis_times_out_a_started_batch_and_it_is_sent_again_after_the_thaw(
        frozen_redis: tuple[str, subprocess.Popen[bytes]]) -> None:  # noqa: F811
    """Redis freezes after a batch was sent ahead (SIGSTOP: the connection stays open, nothing answers): reading its
    reply gives up after socket_timeout (InvalidationError, the connection dropped: no reply of it can be read as
    another batch's) instead of hanging the runner; after the thaw the batch sent again is applied."""
    url, proc = frozen_redis
    cache = cachesync.Cache(url, namespace="t" + uuid.uuid4().hex[:12], tombstone_ttl=120, socket_timeout=0.3)
    try:
        d = DirectInvalidator(cache)
        assert d.invalidate({"a": "1"}) == 0  # connected, the script loaded
        os.kill(proc.pid, signal.SIGSTOP)
        p = d.start({"b": "2"})
        with pytest.raises(InvalidationError):
            d.finish(p)
        assert d.conn is None and d._pending is None
        os.kill(proc.pid, signal.SIGCONT)
        assert d.invalidate({"b": "2", "c": "3"}) == 0
        assert [(cache.peek(k) or {}).get("fl") for k in "abc"] == [b"1", b"2", b"3"]
        d.close()
    finally:
        cache.close()



@pytest.mark.parametrize("n", [3, 1201])
def test_a_batch_started_after_a_script_flush_reloads_and_applies(
        frozen_redis: tuple[str, subprocess.Popen[bytes]], n: int) -> None:  # noqa: F811
    """The scripts were flushed (a Redis restart, SCRIPT FLUSH) before a batch is sent ahead: its replies, read by
    finish(), are NOSCRIPT; the flow loads the script on the same connection and runs the calls again (one call,
    and several pipelined); every key invalidated, the connection still in use."""
    url, _ = frozen_redis
    cache = cachesync.Cache(url, namespace="t" + uuid.uuid4().hex[:12], tombstone_ttl=120)
    try:
        d = DirectInvalidator(cache)
        d.invalidate({"x": "1"})
        conn = d.conn
        cache.redis.script_flush()
        keys = [f"k:{i}" for i in range(n)]
        p = d.start({k: "7" for k in keys})
        assert d.finish(p) == 0
        assert d.conn is conn
        assert {(cache.peek(k) or {}).get("fl") for k in keys} == {b"7"}
        d.close()
    finally:
        cache.close()


def _kill(cache: cachesync.Cache, conn: Any) -> None:
    """Close ``conn`` from the server side (CLIENT KILL by its address), as Redis's idle ``timeout`` does."""
    host, port = conn._sock.getsockname()[:2]
    assert cache.redis.client_kill_filter(addr=f"{host}:{port}") == 1


def test_a_kept_connection_the_server_closed_while_idle_is_replaced_at_once(redis_url: str, namespace: str) -> None:
    """The runner keeps its connection between batches; when the server closed it meanwhile (its idle ``timeout``, a
    proxy's idle limit), the next batch -- sent directly, or sent ahead -- goes out again at once on a new
    connection, as the pool's own callers get a fresh one: no InvalidationError, so no retry after a backoff."""
    cache = cachesync.Cache(redis_url, namespace=namespace, tombstone_ttl=120)
    try:
        d = DirectInvalidator(cache)
        d.invalidate({"a": "1"})
        _kill(cache, d.conn)
        assert d.invalidate({"b": "2"}) == 0
        _kill(cache, d.conn)
        p = d.start({"c": "3"})
        assert d.finish(p) == 0
        assert [(cache.peek(k) or {}).get("fl") for k in "abc"] == [b"1", b"2", b"3"]
        d.close()
    finally:
        cache.close()
