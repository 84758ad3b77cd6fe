"""The in-process L1: cross-process invalidation, the fill race, subscription loss, bounds (real Redis)."""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable, Iterator

import pytest
import redis

import cachesync
from cachesync import protocol as P
from cachesync.errors import ConfigError
from cachesync.keys import entry_key
from cachesync.l1 import L1, L1Options

POLL_LIMIT = 10.0  # upper bound of every poll; a poll returns as soon as its condition holds


def wait_for(cond: Callable[[], bool], what: str, limit: float = POLL_LIMIT) -> None:
    deadline = time.monotonic() + limit
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.002)


@pytest.fixture
def l1cache(redis_url: str, namespace: str) -> Iterator[cachesync.Cache]:
    c = cachesync.Cache(redis_url, namespace=namespace, ttl_jitter=0.0, l1=True)
    assert c.l1 is not None and c.l1.wait_ready(5)
    yield c
    c.close()


# --------------------------------------------------------------------------- core rules, fake clock


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def _core(clock: FakeClock, **kw: object) -> L1:
    core = L1(L1Options(**kw), "ns", clock=clock, size_of=lambda k, v: 100)  # type: ignore[arg-type]
    core.on_subscribed()
    return core


def _fill(core: L1, key: str, value: object, ttl: float | None = None) -> bool:
    tok = core.begin(key)
    return core.finish(key, tok, P.Entry(value), ttl)


def test_ttl_and_max_staleness_with_fake_clock() -> None:
    clock = FakeClock()
    core = _core(clock, ttl=10.0, max_staleness=30.0)
    assert _fill(core, "a", 1)
    clock.t += 9.99
    assert core.lookup("a").value == 1
    clock.t += 0.01
    assert core.lookup("a") is None  # ttl
    # a per-read ttl lowers the lifetime of that entry
    assert _fill(core, "b", 2, ttl=1.0)
    clock.t += 1.0
    assert core.lookup("b") is None


def test_max_staleness_counts_from_before_the_redis_read() -> None:
    clock = FakeClock()
    core = _core(clock, ttl=100.0, max_staleness=5.0)
    tok = core.begin("a")  # the Redis read starts
    clock.t += 3.0  # a slow read
    assert core.finish("a", tok, P.Entry("v"))
    clock.t += 1.99
    assert core.lookup("a").value == "v"
    clock.t += 0.01  # 5 s after the read began: never served, even with no invalidation at all
    assert core.lookup("a") is None


def test_bounded_by_entries_and_bytes_lru() -> None:
    clock = FakeClock()
    core = _core(clock, max_entries=3)
    for k in "abc":
        _fill(core, k, k)
    core.lookup("a")  # a is now most recently used
    _fill(core, "d", "d")
    assert "b" not in core and {"a", "c", "d"} <= {k for k in "abcd" if k in core}
    core2 = _core(clock, max_bytes=250)  # 100 bytes per entry
    for k in "abc":
        _fill(core2, k, k)
    assert len(core2) == 2 and core2.bytes == 200 and core2.stats["evictions"] == 1


def test_fill_dropped_when_invalidated_or_flushed_during_the_read() -> None:
    core = _core(FakeClock())
    tok = core.begin("a")
    core.invalidate(["a"])
    assert not core.finish("a", tok, P.Entry("old"))
    assert "a" not in core and core.stats["fills_dropped"] == 1
    tok = core.begin("a")
    core.invalidate(["other"])  # another key does not void this fill
    assert core.finish("a", tok, P.Entry("v"))
    tok = core.begin("b")
    core.clear()
    assert not core.finish("b", tok, P.Entry("old"))
    tok = core.begin("c")
    core.on_subscription_lost("test")
    assert core.begin("c") is None  # bypassed while down
    assert not core.finish("c", tok, P.Entry("old"))


def test_only_values_redis_agreed_with_are_filled() -> None:
    core = _core(FakeClock())
    for e in (P.Entry(1, stale=True), P.Entry(1, source="fallback"), P.Entry(1, source="loader", filled=False)):
        assert not core.finish("k", core.begin("k"), e)
    assert core.finish("k", core.begin("k"), P.Entry(1, source="loader", filled=True))


def test_options_validated_naming_the_option() -> None:
    for kw, name in (({"max_entries": 0}, "l1.max_entries"), ({"ttl": -1}, "l1.ttl"),
                     ({"max_staleness": "x"}, "l1.max_staleness"), ({"bogus": 1}, "l1.bogus")):
        with pytest.raises(ConfigError, match=name):
            L1Options.build(kw)
    with pytest.raises(ConfigError, match="'l1'"):
        L1Options.build(3)
    with pytest.raises(ConfigError, match="broadcast_invalidations"):
        cachesync.Cache("redis://127.0.0.1:6379/15", namespace="x", l1=True, broadcast_invalidations=False)


def test_lookups_bypass_while_the_subscriber_is_behind_fake_clock() -> None:
    """Rule 5 with a fake probe and clock: data waiting on the subscription (the subscriber starved) makes
    lookups bypass from the next check on, until the subscriber has caught up; the check runs at most every
    lag_check_interval."""
    clock = FakeClock()
    core = _core(clock, lag_check_interval=0.001)
    assert _fill(core, "k", "v")
    waiting = [False]
    probes = [0]

    def probe() -> bool:
        probes[0] += 1
        return waiting[0]

    core.set_probe(probe)
    assert core.lookup("k") is not None and probes[0] == 1
    waiting[0] = True  # an invalidation reached the socket; the subscriber has not run yet
    assert core.lookup("k") is not None and probes[0] == 1  # not checked again within the interval
    clock.t += 0.001
    assert core.lookup("k") is None and probes[0] == 2  # checked: bypass
    assert core.lookup("k") is None and core.stats["lag_bypasses"] == 2  # stays behind without probing
    assert probes[0] == 2
    core.behind()  # the subscriber read the data and applies it
    waiting[0] = False
    assert core.lookup("k") is None
    core.caught_up()  # applied, and its connection found empty
    assert core.lookup("k") is not None and probes[0] == 3
    # a probe that saw data the subscriber applied meanwhile does not leave the L1 behind
    core.set_probe(lambda: core.caught_up() is None)
    assert core.lookup("k") is not None
    assert not core._behind
    core.set_probe(lambda: 1 / 0 > 0)  # a probe that fails counts as behind
    assert core.lookup("k") is None


def test_options_validated_lag_check_interval() -> None:
    with pytest.raises(ConfigError, match="l1.lag_check_interval"):
        L1Options.build({"lag_check_interval": 0})


# --------------------------------------------------------------------------- one process, real Redis


def test_hit_then_local_invalidate_and_set(l1cache: cachesync.Cache) -> None:
    n = [0]

    def loader() -> dict[str, int]:
        n[0] += 1
        return {"v": n[0]}

    assert l1cache.get_entry("k", loader).source == "loader"
    assert l1cache.get_entry("k", loader).source == "l1"
    l1cache.invalidate("k")  # read-your-writes: dropped at once, not when the message comes back
    assert l1cache.get_entry("k", loader).value == {"v": 2}
    l1cache.set("k", {"v": 99})
    assert l1cache.get("k", loader) == {"v": 99}
    with l1cache.write("k"):
        pass
    assert "k" not in l1cache.l1.core  # type: ignore[union-attr]


def test_fill_race_loader_blocked_while_another_client_invalidates(l1cache: cachesync.Cache, redis_url: str,
                                                                   namespace: str) -> None:
    db = {"k": "v1"}
    entered, release = threading.Event(), threading.Event()

    def loader() -> str:
        v = db["k"]
        entered.set()
        release.wait(10)
        return v

    out: list[P.Entry] = []
    t = threading.Thread(target=lambda: out.append(l1cache.get_entry("k", loader)))
    t.start()
    assert entered.wait(10)
    other = cachesync.Cache(redis_url, namespace=namespace)
    try:
        db["k"] = "v2"
        msgs = l1cache.l1.core.messages  # type: ignore[union-attr]
        other.invalidate("k")
        wait_for(lambda: l1cache.l1.core.messages > msgs, "the invalidation to reach the L1")  # type: ignore
    finally:
        other.close()
    release.set()
    t.join(10)
    assert out[0].value == "v1" and not out[0].filled  # the loader returned the old row; nobody kept it
    assert "k" not in l1cache.l1.core  # type: ignore[union-attr]
    assert l1cache.get("k", lambda: db["k"]) == "v2"


def test_fill_race_redis_hit_then_invalidation_before_the_l1_fill(l1cache: cachesync.Cache, redis_url: str,
                                                                  namespace: str) -> None:
    """The epoch check itself: the Redis read returned the old value, a writer's set lands, then the L1 fill."""
    l1 = l1cache.l1
    assert l1 is not None
    other = cachesync.Cache(redis_url, namespace=namespace)
    try:
        other.set("k", "old")
        read_done, release = threading.Event(), threading.Event()

        def fetch() -> P.Entry:
            e = l1cache.run(P.get_flow(l1cache.ctx, "k", None), lambda: "unused")
            read_done.set()
            release.wait(10)
            return e  # type: ignore[no-any-return]

        out: list[P.Entry] = []
        t = threading.Thread(target=lambda: out.append(l1.load("k", None, fetch)))
        t.start()
        assert read_done.wait(10)
        msgs = l1.core.messages
        other.set("k", "new")
        wait_for(lambda: l1.core.messages > msgs, "the set's announcement")
        release.set()
        t.join(10)
        assert out[0].value == "old" and out[0].source == "cache"
        assert "k" not in l1.core and l1.stats["fills_dropped"] == 1
        assert l1cache.get("k", lambda: "unused") == "new"
    finally:
        other.close()


# --------------------------------------------------------------------------- several processes

CHILD = textwrap.dedent("""
    import sys, cachesync, redis
    url, ns = sys.argv[1], sys.argv[2]
    db = redis.Redis.from_url(url)
    c = cachesync.Cache(url, namespace=ns, ttl_jitter=0.0, l1=True)
    assert c.l1.wait_ready(10)
    print("ready", flush=True)
    for line in sys.stdin:
        cmd = line.split()
        if cmd[0] == "get":
            e = c.get_entry(cmd[1], lambda: db.get("db:" + ns + ":" + cmd[1]).decode())
            print(e.value, e.source, flush=True)
        elif cmd[0] == "has":
            print(int(cmd[1] in c.l1.core), flush=True)
        elif cmd[0] == "quit":
            break
    c.close()
""")


class Child:
    def __init__(self, url: str, ns: str) -> None:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
        self.p = subprocess.Popen([sys.executable, "-c", CHILD, url, ns], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True, env=env)
        assert self.ask(None) == "ready"

    def ask(self, cmd: str | None) -> str:
        assert self.p.stdin and self.p.stdout
        if cmd is not None:
            self.p.stdin.write(cmd + "\n")
            self.p.stdin.flush()
        return self.p.stdout.readline().strip()

    def close(self) -> None:
        try:
            self.ask("quit")
        except (BrokenPipeError, OSError):
            pass
        self.p.wait(10)
        for f in (self.p.stdin, self.p.stdout):
            if f is not None:
                f.close()


def test_paused_subscriber_makes_lookups_bypass_the_l1(l1cache: cachesync.Cache, redis_url: str,
                                                       namespace: str) -> None:
    """Rule 5 on a real subscription: the subscriber is held (as a GIL-starved thread would be) before it reads
    an invalidation from its socket; lookups see the data waiting there, bypass the L1 and read the new value
    from Redis. Released, the subscriber applies it and the L1 serves again."""
    assert l1cache.l1 is not None
    core = l1cache.l1.core
    assert l1cache.get("k", lambda: "old") == "old"
    assert l1cache.get_entry("k", lambda: "old").source == "l1"
    sub = l1cache.l1
    gate, held = threading.Event(), threading.Event()
    real_wait = sub._wait_readable  # the subscriber's wait for bytes on its socket (it takes none off)

    def paused_wait(sock: object, timeout: float) -> bool:
        held.set()
        gate.wait(POLL_LIMIT)
        return bool(real_wait(sock, timeout))

    sub._wait_readable = paused_wait  # type: ignore[method-assign]
    try:
        wait_for(held.is_set, "the subscriber to reach its next read")
        writer = cachesync.Cache(redis_url, namespace=namespace)
        writer.set("k", "new")  # publishes; the subscriber cannot read it
        writer.close()
        wait_for(lambda: l1cache.l1 is not None and l1cache.l1.core._probe is not None
                 and l1cache.l1.core._probe(), "the invalidation to wait on the subscription's socket")
        wait_for(lambda: l1cache.get_entry("k", lambda: "loader").source != "l1", "a lookup to bypass")
        e = l1cache.get_entry("k", lambda: "loader")
        assert (e.value, e.source) == ("new", "cache")  # read from Redis, not the stale L1 copy
        assert core.stats["lag_bypasses"] >= 1
        assert core.stats["messages"] == 0  # the subscriber has not read the invalidation
    finally:
        del sub._wait_readable  # the class's again
        gate.set()
    wait_for(lambda: not core._behind, "the subscriber to catch up")
    assert l1cache.get("k", lambda: "loader") == "new"
    wait_for(lambda: l1cache.get_entry("k", lambda: "loader").source == "l1", "the L1 to serve again")


def test_invalidation_in_one_process_reaches_the_l1_of_the_others(redis_url: str, namespace: str,
                                                                   r: redis.Redis) -> None:
    dbkey = f"db:{namespace}:cfg"
    r.set(dbkey, "v1")
    children = [Child(redis_url, namespace) for _ in range(2)]
    try:
        for ch in children:
            ch.ask("get cfg")
            assert ch.ask("get cfg") == "v1 l1"
        writer = cachesync.Cache(redis_url, namespace=namespace)
        try:
            with writer.write("cfg"):  # db_then_invalidate, the default
                r.set(dbkey, "v2")
            for ch in children:
                wait_for(lambda ch=ch: ch.ask("has cfg") == "0", "the other process to drop its copy")
                assert ch.ask("get cfg").startswith("v2")
            writer.set("cfg", "v3")  # a writer's set is announced too
            for ch in children:
                wait_for(lambda ch=ch: ch.ask("get cfg").startswith("v3"), "the set to reach the other process")
        finally:
            writer.close()
    finally:
        for ch in children:
            ch.close()


# --------------------------------------------------------------------------- subscription loss


def _kill_subscription(r: redis.Redis, ns: str) -> None:
    killed = 0
    for c in r.client_list():
        if c.get("name") == f"cachesync-l1:{ns}":
            r.execute_command("CLIENT", "KILL", "ID", c["id"])
            killed += 1
    assert killed == 1


def test_subscription_killed_flushes_bypasses_and_resubscribes(l1cache: cachesync.Cache, r: redis.Redis,
                                                               namespace: str,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    l1 = l1cache.l1
    assert l1 is not None
    l1cache.get("k", lambda: "v")
    assert l1cache.get_entry("k", lambda: "v").source == "l1"
    seen: list[tuple[bool, int, str]] = []

    def on_state(up: bool) -> None:
        # runs in the subscriber thread before it reconnects: the L1 must already be flushed and bypassed
        if not up:
            e = l1cache.get_entry("k", lambda: "v")
            seen.append((up, len(l1.core), e.source))

    l1.core.add_state_listener(on_state)
    with caplog.at_level(logging.WARNING, logger="cachesync.l1"):
        _kill_subscription(r, namespace)
        wait_for(lambda: l1.stats["subscribes"] >= 2 and l1.stats["enabled"], "the resubscribe")
    assert seen and all(s == (False, 0, "cache") for s in seen)
    st = l1.stats
    assert (st["subscribes"], st["subscription_losses"]) == (2, 1), st
    assert st["bypassed"] >= 1 and st["state"] == "up"
    assert "subscription lost" in caplog.text and "is back" in caplog.text
    l1cache.get("k", lambda: "v")
    assert l1cache.get_entry("k", lambda: "v").source == "l1"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PrivateRedis:
    """A throwaway redis-server (never restart the shared one)."""

    def __init__(self) -> None:
        self.port = _free_port()
        self.dir = tempfile.mkdtemp(prefix="cs-l1-redis-")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            pytest.skip("redis-server not on PATH")
        self.proc = subprocess.Popen([exe, "--port", str(self.port), "--save", "", "--appendonly", "no",
                                      "--dir", self.dir, "--bind", "127.0.0.1"], stdout=subprocess.DEVNULL)
        wait_for(self._up, "the private redis-server to start")

    def _up(self) -> bool:
        try:
            return bool(redis.Redis(port=self.port, socket_connect_timeout=0.2).ping())
        except redis.ConnectionError:
            return False

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def test_redis_restart_flushes_bypasses_and_resubscribes(namespace: str) -> None:
    srv = PrivateRedis()
    srv.start()
    try:
        c = cachesync.Cache(f"redis://127.0.0.1:{srv.port}/0", namespace=namespace, ttl_jitter=0.0,
                            socket_timeout=0.5, connect_timeout=0.2, l1={"reconnect_max_delay": 0.1})
        l1 = c.l1
        assert l1 is not None and l1.wait_ready(5)
        c.get("k", lambda: "v1")
        assert c.get_entry("k", lambda: "v1").source == "l1"
        srv.stop()
        wait_for(lambda: l1.stats["state"] == "down", "the L1 to notice the restart")
        assert len(l1.core) == 0
        e = c.get_entry("k", lambda: "v2")  # Redis is down: fallback load, never the old L1 copy
        assert (e.value, e.source) == ("v2", "fallback")
        assert l1.stats["bypassed"] >= 1 and l1.stats["subscription_losses"] == 1
        srv.start()
        assert l1.wait_ready(10)
        assert c.get_entry("k", lambda: "v3").value == "v3"  # the restarted Redis is empty
        assert c.get_entry("k", lambda: "v3").source == "l1"
        c.close()
    finally:
        srv.cleanup()


# --------------------------------------------------------------------------- asyncio


async def test_async_l1_cross_instance_invalidation_and_fill_race(redis_url: str, namespace: str) -> None:
    import asyncio

    a = cachesync.AsyncCache(redis_url, namespace=namespace, ttl_jitter=0.0, l1=True)
    b = cachesync.AsyncCache(redis_url, namespace=namespace, ttl_jitter=0.0)
    try:
        assert a.l1 is not None and await a.l1.wait_ready(5)
        await a.get("k", lambda: "v1")
        assert (await a.get_entry("k", lambda: "v1")).source == "l1"
        await b.set("k", "v2")
        for _ in range(5000):
            if "k" not in a.l1.core:
                break
            await asyncio.sleep(0.002)
        assert await a.get("k", lambda: "x") == "v2"
        # the fill race, forced: the loader waits on an event while b invalidates
        await b.invalidate("j")
        entered, release = asyncio.Event(), asyncio.Event()

        async def loader() -> str:
            entered.set()
            await release.wait()
            return "old"

        task = asyncio.create_task(a.get_entry("j", loader))
        await entered.wait()
        msgs = a.l1.core.messages
        await b.invalidate("j")
        for _ in range(5000):
            if a.l1.core.messages > msgs:
                break
            await asyncio.sleep(0.002)
        release.set()
        assert (await task).value == "old"
        assert "j" not in a.l1.core
    finally:
        await a.aclose()
        await b.aclose()


# --------------------------------------------------------------------------- get_many through the L1


def test_get_many_serves_l1_hits_and_fills_the_rest_per_key(l1cache: cachesync.Cache) -> None:
    l1 = l1cache.l1
    assert l1 is not None
    asked: list[list[str]] = []

    def load_many(keys: list[str]) -> dict[str, str]:
        asked.append(list(keys))
        return {k: f"v-{k}" for k in keys if k != "gone"}

    assert l1cache.get_many(["a", "b", "gone"], load_many) == {"a": "v-a", "b": "v-b", "gone": P.NOT_FOUND}
    assert asked == [["a", "b", "gone"]]
    e = l1cache.get_many_entries(["b", "a", "gone"], load_many)
    assert list(e) == ["b", "a", "gone"] and {x.source for x in e.values()} == {"l1"}
    assert asked == [["a", "b", "gone"]]  # all served from the L1
    l1cache.invalidate("a")
    # our own invalidation also arrives on the subscription: until the subscriber has applied it, lookups bypass
    # the L1 (rule 5), so wait for that (an observable condition) before expecting "b" from the L1
    wait_for(lambda: l1.core.lookup("b") is not None, "the subscriber to apply its own invalidation")
    e = l1cache.get_many_entries(["a", "b"], load_many)
    assert asked[-1] == ["a"] and e["a"].source == "loader" and e["b"].source == "l1"

    # the fill race, per key: an invalidation message for "x" (as from a peer, via the channel) arrives while
    # the batch is read; Redis accepts both fills, the L1 keeps only "y" (the same per-key check as get)
    def racing(keys: list[str]) -> dict[str, str]:
        l1.core.on_message(entry_key(l1.core.ns, "x").encode())
        return {k: f"v-{k}" for k in keys}

    dropped = l1.stats["fills_dropped"]
    l1cache.get_many(["x", "y"], racing)
    assert "x" not in l1.core and "y" in l1.core
    assert l1.stats["fills_dropped"] == dropped + 1


async def test_async_get_many_through_l1(redis_url: str, namespace: str) -> None:
    c = cachesync.AsyncCache(redis_url, namespace=namespace, ttl_jitter=0.0, l1=True)
    try:
        assert c.l1 is not None and await c.l1.wait_ready(5)
        calls: list[list[str]] = []

        async def load_many(keys: list[str]) -> dict[str, str]:
            calls.append(list(keys))
            return {k: k.upper() for k in keys}

        assert await c.get_many(["p", "q"], load_many) == {"p": "P", "q": "Q"}
        e = await c.get_many_entries(["q", "p", "r"], load_many)
        assert calls == [["p", "q"], ["r"]] and (e["p"].source, e["q"].source) == ("l1", "l1")
    finally:
        await c.aclose()


# --------------------------------------------------------------------------- listeners that raise


def test_a_listener_that_raises_never_stops_the_subscriber(l1cache: cachesync.Cache, redis_url: str,
                                                           namespace: str) -> None:
    """An invalidation listener raising on every call (invalidations and flushes): the L1 still drops the keys, the
    subscription stays up (no death, no bypass), and later invalidations still arrive. Before, the first one ended
    the subscription and the flush after it raised again and ended the subscriber thread: the L1 stayed off."""
    assert l1cache.l1 is not None
    core = l1cache.l1.core

    def broken(keys: object) -> None:
        raise RuntimeError("listener bug")

    core.add_listener(broken)
    other = cachesync.Cache(redis_url, namespace=namespace)
    try:
        for n in range(1, 4):
            assert l1cache.get("k", lambda n=n: f"v{n}") == f"v{n}"
            assert l1cache.get_entry("k", lambda: "x").source == "l1"
            msgs = core.messages
            other.invalidate("k")
            wait_for(lambda: core.messages > msgs, "the invalidation message")
            assert "k" not in core
            assert core.state == "up" and core.stats["subscriber_deaths"] == 0
        assert core.stats["listener_errors"] >= 3
    finally:
        other.close()


async def test_async_a_listener_that_raises_never_stops_the_subscriber(redis_url: str, namespace: str) -> None:
    import asyncio

    a = cachesync.AsyncCache(redis_url, namespace=namespace, ttl_jitter=0.0, l1=True)
    b = cachesync.AsyncCache(redis_url, namespace=namespace)
    try:
        assert a.l1 is not None and await a.l1.wait_ready(5)
        core = a.l1.core

        def broken(keys: object) -> None:
            raise RuntimeError("listener bug")

        core.add_listener(broken)
        for n in range(1, 4):
            assert await a.get("k", lambda n=n: f"v{n}") == f"v{n}"
            msgs = core.messages
            await b.invalidate("k")
            for _ in range(5000):
                if core.messages > msgs:
                    break
                await asyncio.sleep(0.002)
            assert "k" not in core
            assert core.state == "up" and core.stats["subscriber_deaths"] == 0
        assert core.stats["listener_errors"] >= 3
    finally:
        await a.aclose()
        await b.aclose()


async def test_async_l1_aclose_passes_on_its_callers_cancellation(redis_url: str, namespace: str) -> None:
    """A shutdown that cancels the task closing the cache (a timeout around aclose()) must see its cancellation:
    aclose() used to swallow every CancelledError while it waited for the subscriber task to end."""
    import asyncio

    a = cachesync.AsyncCache(redis_url, namespace=namespace, l1=True)
    assert a.l1 is not None and await a.l1.wait_ready(5)
    closing = asyncio.create_task(a.l1.aclose())
    await asyncio.sleep(0)  # it has cancelled the subscriber task and waits for it to end
    closing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await closing
    assert a.l1.core.closed
    await a.aclose()
