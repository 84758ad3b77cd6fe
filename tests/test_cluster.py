"""cachesync on a REAL 3-master Redis Cluster (started by tests/redis_cluster.py), sync and asyncio clients.

Checks the cluster promises: a key's hash and wake list share a slot, batches run one script per slot group,
BLPOP waits only on keys of one slot, NOSCRIPT is recovered on the node that owns the keys, keys with braces
are tagged by digest, and invalidations published from Lua reach subscribers on every node.
"""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from typing import Any

import pytest
import redis
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.cluster import RedisCluster
from redis_cluster import ClusterServers, redis_cluster_fixture  # noqa: F401  (the redis_cluster fixture)

import cachesync
from cachesync import protocol as P
from cachesync.keys import channel, entry_key, slot, wake_key
from cachesync.scripts import SCRIPTS
from entries import hexists, hget, hgetall, hset  # noqa: F401

# --------------------------------------------------------------------------- helpers

BRACE_KEYS = ["user:{42}", "{42}", "a}b", "{", "}{", "x{}y", "{tag}1", "{tag}2"]


def _keys_with_shared_slot(n_other: int) -> list[str]:
    """Two keys that land in one slot (a real multi-key slot group) followed by ``n_other`` keys."""
    seen: dict[int, str] = {}
    i = 0
    while True:
        k = f"k{i}"
        s = slot(entry_key("x", k))  # the namespace is outside the hash tag: the slot depends on the key only
        if s in seen:
            pair = [seen[s], k]
            break
        seen[s] = k
        i += 1
    rest = [f"m{j}" for j in range(n_other)]
    return pair + rest


KEYS = _keys_with_shared_slot(40)


_BY_SHA = {sc.sha: name for name, sc in SCRIPTS.items()}


def _wrap_commands(cache: Any, record: Any) -> None:
    """Wrap the driver's command executor (sync or async) so every command it sends is recorded."""
    orig = cache._command
    if asyncio.iscoroutinefunction(orig):
        async def acommand(eff: P.Cmd) -> Any:
            out = await orig(eff)  # a command answered NOSCRIPT (then retried) is not recorded
            record(eff.args)
            return out
        cache._command = acommand
    else:
        def command(eff: P.Cmd) -> Any:
            out = orig(eff)  # a command answered NOSCRIPT (then retried) is not recorded
            record(eff.args)
            return out
        cache._command = command


def spy(cache: Any, mget: bool = False) -> list[tuple[str, list[str]]]:
    """Record every script a (sync or async) cache runs: (script name, KEYS); with ``mget``, also every MGET
    ("MGET", keys)."""
    calls: list[tuple[str, list[str]]] = []

    def record(args: tuple[Any, ...]) -> None:
        if args[0] == "EVALSHA":
            calls.append((_BY_SHA[args[1]], list(args[3:3 + int(args[2])])))
        elif mget and args[0] == "MGET":
            calls.append(("MGET", list(args[1:])))

    _wrap_commands(cache, record)
    return calls


def spy_waits(cache: Any) -> list[list[str]]:
    """Record the wake keys of every BLPOP a cache sends."""
    waits: list[list[str]] = []

    def record(args: tuple[Any, ...]) -> None:
        if args[0] == "BLPOP":
            waits.append(list(args[1:-1]))

    _wrap_commands(cache, record)
    return waits


def assert_one_slot_per_call(calls: list[tuple[str, list[str]]]) -> None:
    for name, keys in calls:
        assert len({slot(k) for k in keys}) == 1, (name, keys)


def slots_of(ns: str, keys: list[str]) -> set[int]:
    return {slot(entry_key(ns, k)) for k in keys}


def background(fn: Any) -> tuple[threading.Thread, dict[str, Any]]:
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["result"] = fn()
        except BaseException as e:  # surfaced by the test
            out["error"] = e

    t = threading.Thread(target=run)
    t.start()
    return t, out


def until(cond: Any, what: str) -> None:
    """Poll a condition observable in Redis (bounded), e.g. "the other reader registered as a waiter"."""
    for _ in range(2000):
        if cond():
            return
        threading.Event().wait(0.005)
    raise AssertionError(f"never happened: {what}")


async def auntil(cond: Any, what: str) -> None:
    for _ in range(2000):
        if await cond():
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"never happened: {what}")


# --------------------------------------------------------------------------- fixtures


@pytest.fixture
def rc(redis_cluster: ClusterServers) -> Any:
    c = RedisCluster(host=redis_cluster.host, port=redis_cluster.ports[0])
    yield c
    c.close()


@pytest.fixture
def ccache(rc: RedisCluster, namespace: str) -> Any:
    c = cachesync.Cache(client=rc, namespace=namespace, ttl_jitter=0.0)
    yield c
    c.close()


@pytest.fixture
def other(redis_cluster: ClusterServers, namespace: str) -> Any:
    """A second cache on its own cluster client (as another process)."""
    client = RedisCluster(host=redis_cluster.host, port=redis_cluster.ports[1])
    c = cachesync.Cache(client=client, namespace=namespace, ttl_jitter=0.0)
    yield c
    c.close()
    client.close()


@pytest.fixture
async def arc(redis_cluster: ClusterServers) -> Any:
    c = AsyncRedisCluster(host=redis_cluster.host, port=redis_cluster.ports[0])
    yield c
    await c.aclose()


@pytest.fixture
async def acc(arc: AsyncRedisCluster, namespace: str) -> Any:
    c = cachesync.AsyncCache(client=arc, namespace=namespace, ttl_jitter=0.0)
    yield c
    await c.aclose()


@pytest.fixture
async def aother(redis_cluster: ClusterServers, namespace: str) -> Any:
    client = AsyncRedisCluster(host=redis_cluster.host, port=redis_cluster.ports[2])
    c = cachesync.AsyncCache(client=client, namespace=namespace, ttl_jitter=0.0)
    yield c
    await c.aclose()
    await client.aclose()


# --------------------------------------------------------------------------- the cluster itself


def test_cluster_is_real_and_keys_spread(redis_cluster: ClusterServers, rc: RedisCluster, ccache: Any) -> None:
    info = rc.cluster_info()
    assert info["cluster_state"] == "ok" and int(info["cluster_known_nodes"]) == 3
    assert len(rc.get_primaries()) == 3
    assert ccache.ctx.cluster is True
    assert ccache.url.startswith("redis-cluster://") and str(redis_cluster.ports[0]) in ccache.url
    ccache.ping()
    ns = ccache.options.namespace
    nodes = {rc.get_node_from_key(entry_key(ns, k)).name for k in KEYS}
    assert len(nodes) == 3, "the test keys must cover every master"
    assert len(slots_of(ns, KEYS)) == len(KEYS) - 1  # exactly one shared slot


def test_slot_function_matches_the_server(rc: RedisCluster) -> None:
    for k in KEYS[:10] + BRACE_KEYS:
        ek = entry_key("ns", k)
        server = rc.cluster_keyslot(ek)
        assert slot(ek) == server == slot(wake_key(ek)) == rc.cluster_keyslot(wake_key(ek)), k


# --------------------------------------------------------------------------- sync reads


def test_get_miss_lease_fill_hit(rc: RedisCluster, ccache: Any) -> None:
    ns = ccache.options.namespace
    ek = entry_key(ns, "user:1")
    owner = rc.get_node_from_key(ek)
    seen: dict[str, Any] = {}

    def loader() -> Any:
        seen["during"] = ccache.peek("user:1")  # the lease is in the hash, on the node that owns the slot
        return P.Versioned({"name": "ann"}, 3)

    e = ccache.get_entry("user:1", loader)
    assert e.source == "loader" and e.filled and e.value == {"name": "ann"} and e.version == 3
    assert seen["during"] is not None and "lt" in seen["during"]
    assert rc.execute_command("EXISTS", ek, target_nodes=owner) == 1
    e2 = ccache.get_entry("user:1", lambda: pytest.fail("hit expected"))
    assert e2.source == "cache" and e2.value == {"name": "ann"} and e2.version == 3
    assert ccache.get("gone", lambda: cachesync.NOT_FOUND) is cachesync.NOT_FOUND
    assert ccache.get("gone", lambda: pytest.fail("negative hit expected")) is cachesync.NOT_FOUND
    assert ccache.stats["hits"] == 1 and ccache.stats["negative_hits"] == 1 and ccache.stats["fills"] == 2


def test_fill_refused_after_invalidate(ccache: Any, other: Any) -> None:
    def loader() -> Any:
        other.invalidate("k", version=7)  # a write commits while this reader is loading
        return P.Versioned("old", 6)

    e = ccache.get_entry("k", loader)
    assert e.value == "old" and e.filled is False
    assert ccache.stats["fills_refused"] == 1
    assert ccache.get_entry("k", lambda: P.Versioned("older", 5)).filled is False  # below the version floor
    assert ccache.get_entry("k", lambda: P.Versioned("new", 7)).filled is True
    assert other.get("k", lambda: pytest.fail("hit expected")) == "new"


def test_get_many_one_script_per_slot_group(rc: RedisCluster, ccache: Any) -> None:
    ns = ccache.options.namespace
    calls = spy(ccache, mget=True)
    loads: list[list[str]] = []

    def loader_many(keys: list[str]) -> dict[str, Any]:
        loads.append(keys)
        return {k: P.Versioned(k.upper(), 1) for k in keys if k != "m3"}  # m3 is missing -> NOT_FOUND

    out = ccache.get_many(KEYS, loader_many)
    assert len(loads) == 1 and sorted(loads[0]) == sorted(KEYS)
    assert out["m3"] is cachesync.NOT_FOUND and out["m4"] == "M4" and out[KEYS[0]] == KEYS[0].upper()
    assert_one_slot_per_call(calls)
    n_groups = len(slots_of(ns, KEYS))
    names = Counter(n for n, _ in calls)
    assert names == {"MGET": n_groups, "get": n_groups, "fill": n_groups}
    shared = [keys for n, keys in calls if n == "get" and len(keys) == 4]
    assert len(shared) == 1 and set(shared[0]) == {entry_key(ns, KEYS[0]), wake_key(entry_key(ns, KEYS[0])),
                                                     entry_key(ns, KEYS[1]), wake_key(entry_key(ns, KEYS[1]))}
    calls.clear()
    again = ccache.get_many_entries(KEYS, lambda ks: pytest.fail(f"all hits expected, loaded {ks}"))
    assert all(e.source == "cache" for e in again.values())
    assert Counter(n for n, _ in calls) == {"MGET": n_groups}  # hits: one MGET per slot group, no script
    # the values really live on the node that owns each key's slot
    for k in KEYS[:6]:
        ek = entry_key(ns, k)
        assert hget(rc, ek, "v") is not None


def test_invalidate_many_keys_across_slots(ccache: Any, other: Any) -> None:
    ns = ccache.options.namespace
    ccache.get_many(KEYS, lambda ks: {k: P.Versioned(k, 1) for k in ks})
    calls = spy(other)
    assert other.invalidate(*KEYS, "not-cached", version=2) == len(KEYS)
    assert_one_slot_per_call(calls)
    assert [n for n, _ in calls] == ["invalidate"] * len(slots_of(ns, KEYS + ["not-cached"]))
    for k in KEYS:
        entry = ccache.peek(k)
        assert entry is not None and "v" not in entry and entry["fl"] == b"2"
    refused = ccache.get_many_entries(KEYS[:5], lambda ks: {k: P.Versioned("stale", 1) for k in ks})
    assert all(e.filled is False for e in refused.values())


@pytest.mark.parametrize("strategy", sorted(P.STRATEGIES))
def test_write_strategies(ccache: Any, strategy: str) -> None:
    keys = KEYS[2:6]  # four keys on different slots
    ccache.get_many(keys, lambda ks: {k: P.Versioned("v1", 1) for k in ks})
    delayed: list[Any] = []
    c = cachesync.Cache(client=ccache.redis, namespace=ccache.options.namespace, ttl_jitter=0.0,
                        scheduler=lambda delay, fn: delayed.append(fn))
    calls = spy(c)
    with c.write(*keys, strategy=strategy, value="v2", version=2) as w:
        w.set_value("v2", version=2)
    for fn in delayed:
        fn()
    assert_one_slot_per_call(calls)
    s = P.STRATEGIES[strategy]
    steps = set(s.before + s.after + s.delayed)
    for k in keys:
        got = c.get_entry(k, lambda: P.Versioned("db", 2))
        if steps & {P.Step.SET_VERSIONED, P.Step.SET_PLAIN}:
            assert got.value == "v2" and got.source == "cache", (strategy, k, got)
        else:
            assert got.value == "db" and got.source == "loader" and got.filled, (strategy, k, got)
    c.close()


def test_stampede_waits_on_the_lease_holder(ccache: Any, other: Any) -> None:
    loaded, go = threading.Event(), threading.Event()

    def slow() -> Any:
        loaded.set()
        assert go.wait(10)
        return "v"

    waits = spy_waits(other)
    t, out = background(lambda: ccache.get_entry("hot", slow))
    assert loaded.wait(10)
    t2, out2 = background(lambda: other.get_entry("hot", lambda: pytest.fail("the waiter must not load")))
    until(lambda: (ccache.peek("hot") or {}).get("w") == b"1", "the second reader waits on the lease")
    go.set()
    t.join()
    t2.join()
    assert "error" not in out and "error" not in out2, (out, out2)
    assert out["result"].filled is True
    assert out2["result"].value == "v" and out2["result"].source == "cache"
    assert other.stats["waits"] >= 1
    assert waits and all(len({slot(k) for k in ks}) == 1 for ks in waits)


def test_get_many_waits_only_on_one_slot_group(ccache: Any, other: Any) -> None:
    """The waiter's BLPOP covers one slot group (both keys of the shared slot); it then re-reads every key."""
    ns = ccache.options.namespace
    keys = KEYS[:4]  # slot group {KEYS[0], KEYS[1]} + two other slots
    loaded, go = threading.Event(), threading.Event()

    def slow(ks: list[str]) -> dict[str, Any]:
        loaded.set()
        assert go.wait(10)
        return {k: "v:" + k for k in ks}

    waits = spy_waits(other)
    t, out = background(lambda: ccache.get_many(keys, slow))
    assert loaded.wait(10)
    t2, out2 = background(lambda: other.get_many_entries(keys, lambda ks: pytest.fail(f"must not load {ks}")))
    until(lambda: all((ccache.peek(k) or {}).get("w") == b"1" for k in keys), "the second reader waits on all")
    go.set()
    t.join()
    t2.join()
    assert "error" not in out and "error" not in out2, (out, out2)
    assert {k: e.value for k, e in out2["result"].items()} == {k: "v:" + k for k in keys}
    assert all(e.source == "cache" for e in out2["result"].values())
    assert waits, "the waiter blocked at least once"
    for ks in waits:
        assert len({slot(k) for k in ks}) == 1
    first_group = {wake_key(entry_key(ns, k)) for k in KEYS[:2]}
    assert set(waits[0]) == first_group or len(waits[0]) == 1


def test_noscript_is_reloaded_on_the_owning_node(rc: RedisCluster, ccache: Any) -> None:
    ns = ccache.options.namespace
    ccache.get("warm", lambda: 1)  # scripts are cached somewhere
    assert rc.execute_command("SCRIPT", "FLUSH", target_nodes=RedisCluster.ALL_NODES)
    sha = cachesync.scripts.SCRIPTS["get"].sha
    owner = rc.get_node_from_key(entry_key(ns, "fresh"))
    assert ccache.get_entry("fresh", lambda: 2).filled is True
    for node in rc.get_primaries():
        [exists] = rc.execute_command("SCRIPT", "EXISTS", sha, target_nodes=node)
        assert bool(exists) == (node.name == owner.name), node.name  # loaded only where it ran
    assert rc.execute_command("SCRIPT", "FLUSH", target_nodes=RedisCluster.ALL_NODES)
    out = ccache.get_many(KEYS, lambda ks: {k: 1 for k in ks})  # every node needs it again
    assert set(out.values()) == {1}
    assert ccache.invalidate(*KEYS) == len(KEYS)


def test_keys_with_braces(rc: RedisCluster, ccache: Any, other: Any) -> None:
    ns = ccache.options.namespace
    for k in BRACE_KEYS:
        ek = entry_key(ns, k)
        assert rc.cluster_keyslot(ek) == rc.cluster_keyslot(wake_key(ek))
    # "{tag}1" and "{tag}2" are tagged by their digest, not by "tag"
    assert slot(entry_key(ns, "{tag}1")) != slot(entry_key(ns, "{tag}2"))
    calls = spy(ccache)
    out = ccache.get_many(BRACE_KEYS, lambda ks: {k: "v" + k for k in ks})
    assert out == {k: "v" + k for k in BRACE_KEYS}
    assert_one_slot_per_call(calls)
    for k in BRACE_KEYS:
        assert other.get(k, lambda: pytest.fail("hit expected")) == "v" + k
    assert other.invalidate(*BRACE_KEYS) == len(BRACE_KEYS)
    assert ccache.get_entry("a}b", lambda: "again").source == "loader"


def test_invalidation_broadcast_reaches_every_node(redis_cluster: ClusterServers, ccache: Any) -> None:
    ns = ccache.options.namespace
    subs = []
    for i in range(3):
        node = redis_cluster.node(i)
        ps = node.pubsub()
        ps.subscribe(channel(ns))
        msg = ps.get_message(timeout=5)
        assert msg is not None and msg["type"] == "subscribe"
        subs.append((node, ps))
    try:
        keys = KEYS[:8]
        ccache.invalidate(*keys)
        ccache.set("written", 1)
        expected = {entry_key(ns, k) for k in keys + ["written"]}
        for _, ps in subs:
            got: set[str] = set()
            for _ in range(100):
                if got >= expected:
                    break
                m = ps.get_message(timeout=5)
                assert m is not None, f"no broadcast; got {got}"
                if m["type"] == "message":
                    got.update(m["data"].decode().split("\n"))
            assert got == expected
    finally:
        for node, ps in subs:
            ps.close()
            node.close()


def test_bloom_filter_keys_share_one_slot(rc: RedisCluster, ccache: Any) -> None:
    from cachesync.bloom import BloomFilter

    bf = BloomFilter(ccache, "users", expected_items=1000, fp_rate=0.01)
    calls = spy(ccache)
    assert bf.rebuild([f"u{i}" for i in range(1000)])
    assert all(bf.might_contain_many([f"u{i}" for i in range(1000)]))
    assert bf.add("new") and bf.might_contain("new")
    assert calls and {n for n, _ in calls} == {"bloom_rebuild", "bloom_check", "bloom_add"}
    assert_one_slot_per_call(calls)


def _spread_keys(n: int = 3) -> list[str]:
    """Keys whose slots fall on each of the 3 masters (slot ranges 0-5460, 5461-10922, 10923-16383)."""
    out: dict[int, list[str]] = {0: [], 1: [], 2: []}
    i = 0
    while min(len(v) for v in out.values()) < n:
        k = f"l1:{i}"
        part = min(2, slot(entry_key("x", k).replace("cs:x:", "")) // 5462)
        if len(out[part]) < n:
            out[part].append(k)
        i += 1
    return [k for v in out.values() for k in v]


def _wait(cond: Any, what: str, timeout: float = 10.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.005)


def test_l1_on_the_cluster_hears_invalidations_of_every_master(rc: RedisCluster, other: Any,
                                                                namespace: str) -> None:
    """The L1's one subscription (on one node) hears invalidations published by scripts on every master."""
    a = cachesync.Cache(client=rc, namespace=namespace, ttl_jitter=0.0, l1=True)
    try:
        assert a.l1 is not None and a.l1.wait_ready(10)
        keys = _spread_keys()
        assert len({slot(entry_key(namespace, k)) // 5462 for k in keys}) == 3  # all three masters
        for k in keys:
            assert a.get(k, lambda k=k: "v-" + k) == "v-" + k
            assert a.l1.core.lookup(k) is not None  # held in the L1
        for k in keys:
            other.invalidate(k)  # another process (its own cluster client)
        _wait(lambda: all(a.l1.core.lookup(k) is None for k in keys), "every L1 copy to be dropped")
        assert a.get(keys[0], lambda: "new") == "new"
    finally:
        a.close()


async def test_async_l1_on_the_cluster(arc: AsyncRedisCluster, aother: Any, namespace: str) -> None:
    a = cachesync.AsyncCache(client=arc, namespace=namespace, ttl_jitter=0.0, l1=True)
    try:
        keys = _spread_keys(2)
        for k in keys:
            assert await a.get(k, lambda k=k: _value("v-" + k)) == "v-" + k
        assert a.l1 is not None and await a.l1.wait_ready(10)
        for k in keys:
            await a.get(k, lambda k=k: _value("v-" + k))
            assert a.l1.core.lookup(k) is not None
        for k in keys:
            await aother.invalidate(k)
        for _ in range(2000):
            if all(a.l1.core.lookup(k) is None for k in keys):
                break
            await asyncio.sleep(0.005)
        assert all(a.l1.core.lookup(k) is None for k in keys)
    finally:
        await a.aclose()


async def _value(v: str) -> str:
    return v


def test_unreachable_node_reports_the_cluster_url(tmp_path: Any, namespace: str) -> None:
    """A cluster whose nodes are gone: ping raises CacheUnavailableError naming the cluster; reads fall back."""
    from redis_cluster import start_cluster, stop_cluster

    cs = start_cluster(tmp_path)
    client = RedisCluster(host=cs.host, port=cs.ports[0], socket_timeout=2, socket_connect_timeout=1)
    try:
        c = cachesync.Cache(client=client, namespace=namespace, on_redis_error="load")
        assert c.get("k", lambda: 1) == 1
        stop_cluster(cs.procs)
        with pytest.raises(cachesync.errors.CacheUnavailableError) as ei:
            c.ping()
        assert "redis-cluster://" in str(ei.value)
        e = c.get_entry("k2", lambda: 2)
        assert e.value == 2 and e.source == "fallback"
    finally:
        stop_cluster(cs.procs)
        client.close()


def test_one_master_down(tmp_path: Any, namespace: str) -> None:
    """One master dies (no replicas, full coverage not required): its keys fall back to the loader, the other
    masters keep serving, an invalidation names exactly the keys it could not reach, ping reports the cluster."""
    from redis_cluster import start_cluster, stop_cluster

    cs = start_cluster(tmp_path, extra=("--cluster-require-full-coverage", "no"))
    client = RedisCluster(host=cs.host, port=cs.ports[0], socket_timeout=2, socket_connect_timeout=1)
    try:
        c = cachesync.Cache(client=client, namespace=namespace, ttl_jitter=0.0)
        dead_port = cs.ports[2]
        on = {k: client.get_node_from_key(entry_key(namespace, k)).port for k in KEYS}
        dead = [k for k in KEYS if on[k] == dead_port][:2]
        alive = [k for k in KEYS if on[k] != dead_port][:2]
        assert len(dead) == 2 and len(alive) == 2
        assert c.get_many(dead + alive, lambda ks: {k: "v" for k in ks}) == dict.fromkeys(dead + alive, "v")
        stop_cluster([cs.procs[2]])
        assert c.get_entry(dead[0], lambda: "db").source == "fallback"
        assert c.get_entry(alive[0], lambda: pytest.fail("hit expected")).source == "cache"
        out = c.get_many_entries(alive + dead, lambda ks: {k: "db" for k in ks})
        assert {k: e.source for k, e in out.items()} == {**dict.fromkeys(alive, "cache"),
                                                           **dict.fromkeys(dead, "fallback")}
        with pytest.raises(cachesync.errors.InvalidationError) as ei:
            c.invalidate(*alive, *dead)
        assert ei.value.keys == dead
        with pytest.raises(cachesync.errors.CacheUnavailableError, match="redis-cluster://"):
            c.ping()
        strict = cachesync.Cache(client=client, namespace=namespace, on_redis_error="fail")
        with pytest.raises(cachesync.errors.CacheUnavailableError):
            strict.get(dead[1], lambda: "db")
    finally:
        stop_cluster(cs.procs)
        client.close()


def test_l1_resubscribes_on_another_node_when_its_node_dies(tmp_path: Any, namespace: str) -> None:
    """The node holding the L1's subscription dies: the L1 is flushed (bypassed), resubscribes on another node
    and hears the remaining masters' invalidations again."""
    from redis_cluster import start_cluster, stop_cluster

    cs = start_cluster(tmp_path, extra=("--cluster-require-full-coverage", "no"))
    client = RedisCluster(host=cs.host, port=cs.ports[0], socket_timeout=2, socket_connect_timeout=1)
    writer_client = RedisCluster(host=cs.host, port=cs.ports[1], socket_timeout=2, socket_connect_timeout=1)
    try:
        a = cachesync.Cache(client=client, namespace=namespace, ttl_jitter=0.0, l1=True)
        w = cachesync.Cache(client=writer_client, namespace=namespace, ttl_jitter=0.0)
        assert a.l1 is not None and a.l1.wait_ready(10)
        sub_port = int(a.l1._conn.port)
        key = next(k for k in KEYS if client.get_node_from_key(entry_key(namespace, k)).port != sub_port)
        assert a.get(key, lambda: "v1") == "v1" and a.l1.core.lookup(key) is not None
        losses = a.l1.stats["subscription_losses"]
        stop_cluster([cs.procs[cs.ports.index(sub_port)]])
        _wait(lambda: a.l1.stats["subscription_losses"] > losses, "the subscription loss")
        assert a.l1.core.lookup(key) is None  # flushed: nothing served while it could miss invalidations
        assert a.l1.wait_ready(20) and int(a.l1._conn.port) != sub_port  # resubscribed elsewhere
        assert a.get(key, lambda: "v2") == "v1"  # from Redis (the entry survived on its live master)
        assert a.l1.core.lookup(key) is not None
        w.invalidate(key)
        _wait(lambda: a.l1.core.lookup(key) is None, "the invalidation to reach the new subscription")
        a.close()
        w.close()
    finally:
        stop_cluster(cs.procs)
        client.close()
        writer_client.close()


def test_slot_migration_no_stale_read_and_invalidation_fails_loudly_until_done(tmp_path: Any,
                                                                              namespace: str) -> None:
    """Resharding: while a key's slot migrates, a hit (plain GET) is still served and never stale; a script that
    declares the entry hash and its (absent) wake list gets TRYAGAIN, so an invalidation raises InvalidationError
    naming the key instead of being lost; once the slot has moved, everything works again."""
    from redis_cluster import start_cluster, stop_cluster

    cs = start_cluster(tmp_path)
    client = RedisCluster(host=cs.host, port=cs.ports[0], socket_timeout=2, socket_connect_timeout=1)
    try:
        c = cachesync.Cache(client=client, namespace=namespace, ttl_jitter=0.0)
        key = "mig:1"
        ek = entry_key(namespace, key)
        s = slot(ek)
        src = client.get_node_from_key(ek)
        dst = next(n for n in client.get_primaries() if n.port != src.port)
        rs, rd = redis.Redis(host=src.host, port=src.port), redis.Redis(host=dst.host, port=dst.port)
        sid = rs.execute_command("CLUSTER", "MYID").decode()
        did = rd.execute_command("CLUSTER", "MYID").decode()
        assert c.get(key, lambda: "v1") == "v1"
        rd.execute_command("CLUSTER", "SETSLOT", s, "IMPORTING", sid)
        rs.execute_command("CLUSTER", "SETSLOT", s, "MIGRATING", did)
        assert c.get_entry(key, lambda: pytest.fail("hit expected")).source == "cache"  # GET: one key
        with pytest.raises(cachesync.errors.InvalidationError) as ei:
            c.invalidate(key)  # invalidate.lua: hash + wake list, one present, one absent -> TRYAGAIN
        assert ei.value.keys == [key]
        assert c.get_entry(key, lambda: "db").value == "v1"  # unchanged, not half-applied
        # move the keys of the slot, then the slot itself
        for k in rs.execute_command("CLUSTER", "GETKEYSINSLOT", s, 100):
            rs.execute_command("MIGRATE", dst.host, dst.port, k, 0, 5000)
        for r in (rs, rd):
            r.execute_command("CLUSTER", "SETSLOT", s, "NODE", did)
        third = next(n for n in client.get_primaries() if n.port not in (src.port, dst.port))
        redis.Redis(host=third.host, port=third.port).execute_command("CLUSTER", "SETSLOT", s, "NODE", did)
        assert c.invalidate(key) == 1  # the retry (e.g. the relay's) succeeds on the new owner
        assert c.get(key, lambda: "v2") == "v2"
        assert client.get_node_from_key(ek).port == dst.port
        rs.close()
        rd.close()
    finally:
        stop_cluster(cs.procs)
        client.close()


# --------------------------------------------------------------------------- asyncio


async def test_async_get_hit_miss_refused(arc: AsyncRedisCluster, acc: Any, aother: Any) -> None:
    assert acc.ctx.cluster is True and acc.url.startswith("redis-cluster://")
    await acc.ping()
    e = await acc.get_entry("user:1", lambda: P.Versioned("ann", 1))
    assert e.source == "loader" and e.filled

    async def hit() -> Any:
        pytest.fail("hit expected")

    assert (await aother.get_entry("user:1", hit)).source == "cache"

    async def loader() -> Any:
        await aother.invalidate("user:2", version=5)
        return P.Versioned("old", 4)

    e2 = await acc.get_entry("user:2", loader)
    assert e2.value == "old" and e2.filled is False


async def test_async_get_many_invalidate_across_slots(acc: Any, aother: Any) -> None:
    ns = acc.options.namespace
    calls = spy(acc)
    loads: list[list[str]] = []

    async def loader_many(ks: list[str]) -> dict[str, Any]:
        loads.append(ks)
        return {k: k for k in ks}

    assert await acc.get_many(KEYS, loader_many) == {k: k for k in KEYS}
    assert len(loads) == 1
    n_groups = len(slots_of(ns, KEYS))
    assert Counter(n for n, _ in calls) == {"get": n_groups, "fill": n_groups}
    assert_one_slot_per_call(calls)
    ocalls = spy(aother)
    assert await aother.invalidate(*KEYS) == len(KEYS)
    assert Counter(n for n, _ in ocalls) == {"invalidate": n_groups}
    assert_one_slot_per_call(ocalls)
    again = await acc.get_many_entries(KEYS, lambda ks: {k: "new" for k in ks})
    assert all(e.source == "loader" and e.filled for e in again.values())


async def test_async_write_strategy(acc: Any) -> None:
    keys = KEYS[2:5]
    async with acc.write(*keys, strategy="db_then_set_versioned") as w:
        w.set_value("v2", version=2)
    for k in keys:
        assert (await acc.get_entry(k, lambda: "db")).value == "v2"
    async with acc.write(*keys):
        pass
    for k in keys:
        assert (await acc.get_entry(k, lambda: "db")).source == "loader"


async def test_async_stampede_and_get_many_wait(acc: Any, aother: Any) -> None:
    keys = KEYS[:4]
    loaded, go = asyncio.Event(), asyncio.Event()

    async def slow(ks: list[str]) -> dict[str, Any]:
        loaded.set()
        await go.wait()
        return {k: "v:" + k for k in ks}

    async def must_not_load(ks: list[str]) -> dict[str, Any]:
        pytest.fail(f"must not load {ks}")

    waits = spy_waits(aother)
    t = asyncio.create_task(acc.get_many(keys, slow))
    await asyncio.wait_for(loaded.wait(), 10)
    t2 = asyncio.create_task(aother.get_many_entries(keys, must_not_load))

    async def all_waiting() -> bool:
        entries = [await acc.peek(k) for k in keys]
        return all((e or {}).get("w") == b"1" for e in entries)

    await auntil(all_waiting, "the second reader waits on all keys")
    go.set()
    await asyncio.wait_for(t, 10)
    res = await asyncio.wait_for(t2, 10)
    assert {k: e.value for k, e in res.items()} == {k: "v:" + k for k in keys}
    assert all(e.source == "cache" for e in res.values())
    assert waits and all(len({slot(k) for k in ks}) == 1 for ks in waits)


async def test_async_noscript_and_braces(arc: AsyncRedisCluster, acc: Any) -> None:
    assert await arc.execute_command("SCRIPT", "FLUSH", target_nodes=arc.get_nodes())
    out = await acc.get_many(KEYS + BRACE_KEYS, lambda ks: {k: "v" + k for k in ks})
    assert out == {k: "v" + k for k in KEYS + BRACE_KEYS}
    assert await arc.execute_command("SCRIPT", "FLUSH", target_nodes=arc.get_nodes())
    assert (await acc.get_entry("{x}y", lambda: 1)).filled
    assert await acc.invalidate(*BRACE_KEYS, "{x}y") == len(BRACE_KEYS) + 1


def test_plain_redis_url_is_shown(redis_cluster: ClusterServers) -> None:
    """A given plain client's URL names host, port and db (no password)."""
    client = redis.Redis(host=redis_cluster.host, port=redis_cluster.ports[0], password=None)
    try:
        c = cachesync.Cache(client=client)
        assert c.url == f"redis://{redis_cluster.host}:{redis_cluster.ports[0]}/0"
    finally:
        client.close()


def test_auditor_on_the_cluster(ccache: Any, tmp_path: Any) -> None:
    """cachesync audit walks every master (SCAN per node) and judges entries spread over all slots."""
    from cachesync.audit import Auditor
    from cachesync.db import connect
    from cachesync.protocol import Versioned
    from cachesync.rules import Rules

    url = f"sqlite:///{tmp_path}/a.db"
    conn = connect(url)
    conn.execute("CREATE TABLE users (id INTEGER PRIMARY KEY, version INTEGER)")
    conn.executemany("INSERT INTO users VALUES (?, 1)", [(i,) for i in range(60)])
    conn.commit()
    for i in range(60):
        ccache.get(f"u:{i}", lambda: Versioned(i, 1))
    auditor = Auditor(ccache, url, Rules({"users": {"keys": ["u:{id}"], "version": "version"}}), grace=0)
    assert auditor.run().consistent == 60
    conn.execute("UPDATE users SET version = 2 WHERE id % 10 = 0")
    conn.commit()
    r = auditor.run(repair=True)
    assert sorted(f.key for f in r.stale) == sorted(f"u:{i}" for i in range(0, 60, 10))
    assert auditor.run().ok  # repaired: invalidated, nothing stale left
    conn.close()
