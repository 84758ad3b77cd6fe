"""An L1 that cannot go deaf: malformed channel messages, a subscriber that dies, a fork (real Redis)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from typing import Any

import pytest
import redis
from hypothesis import given, settings
from hypothesis import strategies as st

import cachesync
from cachesync.keys import channel, entry_key
from cachesync.l1 import L1, L1Options
from cachesync.serializers import JsonSerializer
from redis._parsers import _RESP2Parser
from redis._parsers.socket import SocketBuffer

from private_servers import free_port


def _until(cond: Any, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.002)


MALFORMED = [b"\xff\xfe\xfd", "cs:{ns}:{#abcdef", b"cs:{ns}:{#" + b"\x80" * 10, b"\x00" * 70000]


def test_malformed_messages_never_deafen_the_l1(l1cache: cachesync.Cache, r: redis.Redis, namespace: str,
                                                redis_url: str) -> None:
    assert l1cache.l1 is not None
    core = l1cache.l1.core
    l1cache.get("a", lambda: "v1")
    assert "a" in core
    seen = core.messages
    for m in MALFORMED:
        r.publish(channel(namespace), m.replace("{ns}", namespace) if isinstance(m, str)
                  else m.replace(b"{ns}", namespace.encode()))
    _until(lambda: core.messages == seen + len(MALFORMED), "the malformed messages to be read")
    assert core.stats["malformed_messages"] == 2  # the two that are not UTF-8; the others name no entry of ours
    assert "a" not in core  # flushed to be safe
    assert core.stats["state"] == "up" and core.stats["subscriber_deaths"] == 0
    # still hears genuine invalidations
    l1cache.get("b", lambda: "v1")
    other = cachesync.Cache(redis_url, namespace=namespace, ttl_jitter=0.0)
    other.set("b", "v2")
    _until(lambda: "b" not in core, "the genuine invalidation after the malformed ones")
    assert l1cache.get("b", lambda: "x") == "v2"
    other.close()


def test_a_dying_subscriber_bypasses_the_l1_and_restarts(l1cache: cachesync.Cache, redis_url: str,
                                                         namespace: str) -> None:
    """A bug in the subscriber itself (forced: its socket wait raises once; a raising invalidation listener no
    longer kills it, see test_l1.py)."""
    assert l1cache.l1 is not None
    core = l1cache.l1.core
    boom = [True]
    real_wait = l1cache.l1._wait_readable

    def wait(sock: Any, timeout: float) -> bool:
        if boom:
            boom.clear()
            raise RuntimeError("a bug kills the subscriber")
        return real_wait(sock, timeout)

    l1cache.get("k", lambda: "v1")
    other = cachesync.Cache(redis_url, namespace=namespace, ttl_jitter=0.0)
    l1cache.l1._wait_readable = wait  # type: ignore[method-assign]
    other.invalidate("unrelated")
    _until(lambda: core.stats["subscriber_deaths"] == 1, "the subscriber to die")
    assert "k" not in core  # flushed: nothing served while it could miss invalidations
    _until(lambda: core.stats["state"] == "up", "the restarted subscription")
    l1cache.get("k", lambda: "v1")
    other.set("k", "v2")
    _until(lambda: "k" not in core, "an invalidation heard by the restarted subscriber")
    other.close()


def test_a_forked_child_never_serves_from_the_inherited_l1(l1cache: cachesync.Cache, redis_url: str,
                                                           namespace: str) -> None:
    l1cache.get("k", lambda: "v1")
    rd, wr = os.pipe()
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(rd)
            os.read(go_r, 1)  # the parent has written v2 (the child's L1 has no subscriber to hear it)
            e = l1cache.get_entry("k", lambda: "loader")
            assert l1cache.l1 is not None
            os.write(wr, f"{e.value}|{e.source}|{l1cache.l1.core.stats['state']}".encode())
        finally:
            os._exit(0)
    os.close(wr)
    other = cachesync.Cache(redis_url, namespace=namespace, ttl_jitter=0.0)
    other.set("k", "v2")
    os.write(go_w, b"g")
    out = os.read(rd, 1000).decode()
    os.waitpid(pid, 0)
    assert out == "v2|cache|closed", out
    other.close()


async def test_async_malformed_messages_never_deafen_the_l1(redis_url: str, namespace: str,
                                                            r: redis.Redis) -> None:
    a = cachesync.AsyncCache(redis_url, namespace=namespace, ttl_jitter=0.0, l1=True)
    b = cachesync.AsyncCache(redis_url, namespace=namespace, ttl_jitter=0.0)
    try:
        assert a.l1 is not None and await a.l1.wait_ready(5)
        core = a.l1.core
        await a.get("k", lambda: "v1")
        r.publish(channel(namespace), b"\xff\xfe")
        r.publish(channel(namespace), b"cs:" + namespace.encode() + b":{#\x80\x81")
        for _ in range(5000):
            if core.stats["malformed_messages"] == 2:
                break
            await asyncio.sleep(0.002)
        assert core.stats["malformed_messages"] == 2 and core.stats["state"] == "up"
        await a.get("k", lambda: "v1")
        await b.set("k", "v2")
        for _ in range(5000):
            if "k" not in core:
                break
            await asyncio.sleep(0.002)
        assert await a.get("k", lambda: "x") == "v2"
    finally:
        await a.aclose()
        await b.aclose()


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=300), st.text(max_size=300)))
def test_any_message_applies_or_counts_as_malformed(data: bytes | str) -> None:
    core = L1(L1Options.build(True), "ns")  # type: ignore[arg-type]
    core.on_message(data)  # never raises
    assert core.messages == 1
    core.on_message(entry_key("ns", "k"))
    assert core.stats["invalidations"] >= 1


# --------------------------------------------------------------------------- a frozen Redis (SIGSTOP)


@pytest.fixture
def frozen_redis() -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A private redis-server that the test can freeze (SIGSTOP: connections stay open, nothing answers)."""
    exe = shutil.which("redis-server")
    if exe is None:
        pytest.skip("redis-server not installed")
    port = free_port()
    d = tempfile.mkdtemp(prefix="cs-frozen-")
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", d], stdout=subprocess.DEVNULL)
    try:
        _until(lambda: _answers(port), "private redis-server")
        yield f"redis://127.0.0.1:{port}/0", proc
    finally:
        os.kill(proc.pid, signal.SIGCONT)
        proc.kill()
        proc.wait()
        shutil.rmtree(d, ignore_errors=True)


def _answers(port: int) -> bool:
    try:
        return bool(redis.Redis(port=port, socket_timeout=0.5).ping())
    except redis.RedisError:
        return False


def test_a_frozen_redis_stops_the_l1_serving_and_reads_fall_back(
        frozen_redis: tuple[str, subprocess.Popen[bytes]], namespace: str) -> None:
    """Redis freezes (no invalidation can arrive, nothing answers): within two ping intervals the L1 stops serving
    its copies (it cannot know they are current) and reads go to the loader; after the thaw the L1 serves again."""
    url, proc = frozen_redis
    c = cachesync.Cache(url, namespace=namespace, socket_timeout=0.3, l1={"ping_interval": 0.1})
    try:
        assert c.l1 is not None and c.l1.wait_ready(10)
        assert c.get("k", lambda: "cached") == "cached"
        assert c.get_entry("k", lambda: "db").source == "l1"
        os.kill(proc.pid, signal.SIGSTOP)
        _until(lambda: c.get_entry("k", lambda: "db").source != "l1", "the L1 to stop serving", timeout=10)
        e = c.get_entry("k", lambda: "db")
        assert e.source == "fallback" and e.value == "db"
        os.kill(proc.pid, signal.SIGCONT)
        _until(lambda: c.get_entry("k", lambda: "db").source in ("l1", "cache"), "reads through Redis again")
    finally:
        os.kill(proc.pid, signal.SIGCONT)
        c.close()


async def test_async_a_frozen_redis_stops_the_l1_serving_and_reads_fall_back(
        frozen_redis: tuple[str, subprocess.Popen[bytes]], namespace: str) -> None:
    url, proc = frozen_redis
    c = cachesync.AsyncCache(url, namespace=namespace, socket_timeout=0.3, l1={"ping_interval": 0.1})
    try:
        assert await c.get("k", lambda: "cached") == "cached"
        assert c.l1 is not None and await c.l1.wait_ready(10)
        assert await c.get("k", lambda: "cached") == "cached"
        assert (await c.get_entry("k", lambda: "db")).source == "l1"
        os.kill(proc.pid, signal.SIGSTOP)
        deadline = time.monotonic() + 10
        while (await asyncio.wait_for(c.get_entry("k", lambda: "db"), 5)).source == "l1":
            assert time.monotonic() < deadline, "the L1 kept serving after Redis froze"
            await asyncio.sleep(0.005)
        e = await asyncio.wait_for(c.get_entry("k", lambda: "db"), 5)  # bounded by socket_timeout, not a hang
        assert e.source == "fallback" and e.value == "db"
        assert await asyncio.wait_for(c.get("other", lambda: "db2"), 5) == "db2"
    finally:
        os.kill(proc.pid, signal.SIGCONT)
        await c.aclose()


async def test_async_an_invalidation_already_in_the_connection_buffer_is_not_served_past(
        redis_url: str, namespace: str) -> None:
    """asyncio moves arrived data from the subscription's socket into its StreamReader before the subscriber task
    runs; a reader scheduled first found the socket empty and served the old copy (the L1 coherence benchmark saw
    it in up to 22 of 100 rounds). The probe counts data waiting in that buffer: here an invalidation is put in
    the buffer exactly as the transport would, and the next lookup, before the subscriber has run, bypasses."""
    a = cachesync.AsyncCache(redis_url, namespace=namespace, ttl_jitter=0.0, l1={"lag_check_interval": 1e-9})
    try:
        assert a.l1 is not None and await a.l1.wait_ready(5)
        core = a.l1.core
        await a.get("k", lambda: "v1")
        assert (await a.get_entry("k", lambda: "db")).source == "l1"
        ch, payload = channel(namespace).encode(), entry_key(namespace, "k").encode()
        msg = b"*3\r\n$7\r\nmessage\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n" % (len(ch), ch, len(payload), payload)
        reader = a.l1._conn._reader  # type: ignore[union-attr]
        reader.feed_data(msg)  # what the transport's read callback does; the subscriber task has not run yet
        time.sleep(0.001)  # past lag_check_interval by any clock's resolution (not a synchronisation)
        assert core.lookup("k") is None and core.stats["lag_bypasses"] >= 1
        for _ in range(5000):  # the subscriber applies the real message once it runs
            if "k" not in core:
                break
            await asyncio.sleep(0.001)
        assert "k" not in core and core.stats["malformed_messages"] == 0 and core.stats["state"] == "up"
    finally:
        await a.aclose()


class _GatedJson(JsonSerializer):
    """JSON whose ``dumps`` of one marked value, in one thread, stops until released (the L1 sizes a filled value
    with it: a thread switch there lands between the L1's fill checks)."""

    def __init__(self) -> None:
        super().__init__()
        self.armed: Any = None
        self.entered, self.release = threading.Event(), threading.Event()

    def dumps(self, value: Any) -> bytes:
        if self.armed is not None and self.armed is threading.current_thread() and value == "old":
            self.armed = None
            self.entered.set()
            assert self.release.wait(10)
        return super().dumps(value)


def test_an_invalidation_while_a_fill_is_sized_drops_the_fill(redis_url: str, namespace: str) -> None:
    """The fill race inside finish(): the value was read, the fill passed its first check, and the invalidation's
    message is applied while the value is being sized. The fill must not land (it did: the key had already left
    the in-flight set, so the invalidation left no mark and the second check let the old value in)."""
    ser = _GatedJson()
    c = cachesync.Cache(redis_url, namespace=namespace, ttl_jitter=0.0, l1=True, serializer=ser)
    other = cachesync.Cache(redis_url, namespace=namespace, ttl_jitter=0.0)
    try:
        assert c.l1 is not None and c.l1.wait_ready(5)
        core = c.l1.core
        heard = threading.Event()
        core.add_listener(lambda keys: heard.set() if keys and "k" in keys else None)
        other.set("k", "old")
        assert heard.wait(10)  # (its own announcement, before the read)
        heard.clear()
        out: list[Any] = []
        t = threading.Thread(target=lambda: out.append(c.get_entry("k", lambda: "unused")))
        ser.armed = t
        t.start()
        assert ser.entered.wait(10)  # the Redis read returned "old"; finish() is sizing it
        other.set("k", "new")
        assert heard.wait(10)  # the subscriber applied the invalidation
        ser.release.set()
        t.join(10)
        assert out[0].value == "old" and out[0].source == "cache"
        assert "k" not in core, "the old value was filled after its invalidation had been applied"
        assert c.get("k", lambda: "unused") == "new"
    finally:
        other.close()
        c.close()


def test_close_while_the_subscriber_confirms_a_resubscribe_keeps_the_l1_closed(redis_url: str, namespace: str,
                                                                               r: redis.Redis) -> None:
    """close() lands while the subscriber thread is inside on_subscribed (after the SUBSCRIBE confirmation): the
    L1 must stay closed. (It came up again: "up", enabled, with no subscriber left, filling and serving copies
    that no invalidation reaches.)"""
    c = cachesync.Cache(redis_url, namespace=namespace, ttl_jitter=0.0, l1=True)
    other = cachesync.Cache(redis_url, namespace=namespace, ttl_jitter=0.0)
    try:
        assert c.l1 is not None and c.l1.wait_ready(5)
        l1, core = c.l1, c.l1.core
        entered, release = threading.Event(), threading.Event()
        sub: list[threading.Thread] = []

        def listener(keys: Any) -> None:  # on_subscribed flushes first: hold the subscriber there
            if keys is None and core.state == "down" and not entered.is_set():
                sub.append(threading.current_thread())
                entered.set()
                assert release.wait(10)

        core.add_listener(listener)
        killed = [cl for cl in r.client_list() if cl.get("name") == f"cachesync-l1:{namespace}"]
        assert len(killed) == 1
        r.execute_command("CLIENT", "KILL", "ID", killed[0]["id"])
        assert entered.wait(10)  # the resubscribe is confirmed; on_subscribed has not enabled the L1 yet
        closer = threading.Thread(target=l1.close)
        closer.start()
        _until(lambda: core.closed, "close() to mark the L1 closed")
        release.set()
        closer.join(10)
        sub[0].join(10)
        assert not sub[0].is_alive()
        assert core.stats["state"] == "closed" and not core.enabled, core.stats
        other.set("k", "v1")
        assert c.get("k", lambda: "unused") == "v1"
        other.set("k", "v2")
        assert c.get_entry("k", lambda: "unused").value == "v2"  # nothing kept by a deaf L1
    finally:
        other.close()
        c.close()


def test_a_url_asking_for_resp3_still_subscribes_the_l1_over_resp2(redis_url: str, namespace: str) -> None:
    """``?protocol=3`` (or ``health_check_interval``) in the cache's URL must not reach the
    L1's subscription, which reads RESP2 pub/sub replies. (URL query options override from_url's keywords: the
    subscription spoke RESP3, never saw its SUBSCRIBE confirmed, and the L1 stayed "connecting", bypassed, with
    no log line.)"""
    sep = "&" if "?" in redis_url else "?"
    url = f"{redis_url}{sep}protocol=3&health_check_interval=1"
    c = cachesync.Cache(url, namespace=namespace, ttl_jitter=0.0, l1=True)
    other = cachesync.Cache(redis_url, namespace=namespace, ttl_jitter=0.0)
    try:
        assert c.l1 is not None and c.l1.wait_ready(10), c.l1.stats
        assert c.get("k", lambda: "v1") == "v1"
        assert c.get_entry("k", lambda: "unused").source == "l1"
        other.set("k", "v2")
        _until(lambda: "k" not in c.l1.core, "the invalidation to reach the L1")  # type: ignore[union-attr]
        assert c.get("k", lambda: "unused") == "v2"
    finally:
        other.close()
        c.close()


class _GatedSocketBuffer(SocketBuffer):
    """redis-py's buffer of the pure-Python parser, stopped (as a GIL-starved thread would be) right after a read
    of the L1's subscriber thread took bytes off the socket, while armed."""

    armed = False
    consumed = threading.Event()
    release = threading.Event()

    def _read_from_socket(self, *args: Any, **kwargs: Any) -> bool:
        got = super()._read_from_socket(*args, **kwargs)
        cls = _GatedSocketBuffer
        if got and cls.armed and threading.current_thread().name.startswith("cachesync-l1-"):
            cls.armed = False
            cls.consumed.set()
            assert cls.release.wait(10)
        return bool(got)


class _GatedParser(_RESP2Parser):
    def on_connect(self, connection: Any) -> None:
        super().on_connect(connection)
        self._buffer.__class__ = _GatedSocketBuffer


def test_an_invalidation_read_off_the_socket_but_not_applied_is_not_served(redis_url: str, namespace: str) -> None:
    """Rule 5 when the subscriber's read moved the invalidation from the socket into redis-py's buffer and the
    thread then stalls (the pure-Python parser, and hiredis before redis-py 8, read the socket in can_read): the
    lookups' probe sees an empty socket, so the subscriber must already count as behind. (It marked itself behind
    only after can_read returned: a stall there served the old copy.)"""
    pool = redis.ConnectionPool.from_url(redis_url, parser_class=_GatedParser, protocol=2)
    client = redis.Redis(connection_pool=pool)
    c = cachesync.Cache(client=client, namespace=namespace, ttl_jitter=0.0,
                        l1=L1Options(ping_interval=60.0, lag_check_interval=1e-9))
    other = cachesync.Cache(redis_url, namespace=namespace, ttl_jitter=0.0)
    try:
        assert c.l1 is not None and c.l1.wait_ready(5)
        core = c.l1.core
        heard = threading.Event()
        core.add_listener(lambda keys: heard.set() if keys and "k" in keys else None)
        other.set("k", "old")
        assert heard.wait(10)
        assert c.get("k", lambda: "unused") == "old"
        _until(lambda: c.get_entry("k", lambda: "unused").source == "l1", "the subscriber to catch up")
        _GatedSocketBuffer.armed = True
        other.set("k", "new")
        assert _GatedSocketBuffer.consumed.wait(10)  # the subscriber holds the message, not applied yet
        e = c.get_entry("k", lambda: "unused")
        _GatedSocketBuffer.release.set()
        assert e.value == "new" and e.source != "l1", e
    finally:
        _GatedSocketBuffer.armed = False
        _GatedSocketBuffer.release.set()
        other.close()
        c.close()
        client.close()


def test_a_subscription_socket_above_fd_1024_still_serves_hits(redis_url: str, namespace: str) -> None:
    """A busy process holds more than 1024 descriptors, so the subscription's socket lands above FD_SETSIZE: the
    lookups' lag check must still work there. (It used select.select, which raises ValueError for such a
    descriptor; the lookup counted that as "behind", so the L1 bypassed every read, only lag_bypasses told.)"""
    import resource

    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 1200:
        pytest.skip("needs RLIMIT_NOFILE >= 1200")
    import gc
    import warnings

    fds: list[int] = []
    try:
        for _attempt in range(10):  # a descriptor freed meanwhile (a collected socket) is the lowest: try again
            with warnings.catch_warnings():  # another test's connection left to the collector is not this test's
                warnings.simplefilter("ignore", ResourceWarning)  # failure (it made this test flaky: 1 CI run in 4)
                gc.collect()
            while True:  # the lowest free descriptors taken, up to 1030
                fds.append(os.dup(0))
                if fds[-1] >= 1030:
                    break
            c = cachesync.Cache(redis_url, namespace=namespace, ttl_jitter=0.0,
                                l1=L1Options(lag_check_interval=1e-9))
            assert c.l1 is not None and c.l1.wait_ready(5)
            if c.l1._conn is not None and c.l1._conn._sock.fileno() > 1024:
                break
            c.close()
        try:
            assert c.l1._conn is not None and c.l1._conn._sock.fileno() > 1024
            assert c.get("k", lambda: "v1") == "v1"
            _until(lambda: c.get_entry("k", lambda: "unused").source == "l1", "an L1 hit")
        finally:
            c.close()
    finally:
        for fd in fds:
            os.close(fd)


async def test_async_a_cancelled_subscriber_task_is_not_up_and_restarts(redis_url: str, namespace: str) -> None:
    """A shutdown that cancels every task of the loop (or a stray cancel) ends the L1's subscriber task: the L1
    must not stay "up" (``wait_ready`` true, copies kept) with nobody applying invalidations or pinging; it is
    flushed and bypassed like a subscriber that died, and the next read starts a new subscriber."""
    a = cachesync.AsyncCache(redis_url, namespace=namespace, ttl_jitter=0.0, l1=True)
    b = cachesync.Cache(redis_url, namespace=namespace, ttl_jitter=0.0, record_namespace=False)
    try:
        assert a.l1 is not None and await a.l1.wait_ready(5)
        core = a.l1.core
        await a.get("k", lambda: "v1")
        assert "k" in core
        sub = a.l1._task
        assert sub is not None
        sub.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sub
        assert core.stats["state"] != "up" and "k" not in core and core.stats["subscriber_deaths"] == 1
        b.set("k", "v2")
        assert await a.get("k", lambda: "x") == "v2"  # read from Redis; it starts a new subscriber
        assert await a.l1.wait_ready(5) and a.l1._task is not sub
        await a.get("k", lambda: "x")
        assert "k" in core
        b.set("k", "v3")
        for _ in range(5000):  # the new subscriber hears the write
            if "k" not in core:
                break
            await asyncio.sleep(0.002)
        assert await a.get("k", lambda: "x") == "v3"
    finally:
        b.close()
        await a.aclose()
