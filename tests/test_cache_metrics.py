"""Cache metrics (``metrics=``), per-request ``stats`` under single-flight, the namespace record, and the daemons'
warning about a namespace no cache uses."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Any

import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

import cachesync
from cachesync import health
from cachesync.cache_metrics import seen_key
from cachesync.errors import ConfigError
from cachesync.metrics import NOOP, PrometheusMetrics
from entries import hexists, hget, hgetall, hset  # noqa: F401


def samples(m: PrometheusMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for fam in text_string_to_metric_families(m.render().decode()):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


class CountingLock:
    """Wraps a flight's lock; counts the followers that reached it."""

    def __init__(self, real: threading.Lock) -> None:
        self.real, self.entered = real, 0
        self.cond = threading.Condition()

    def __enter__(self) -> None:
        with self.cond:
            self.entered += 1
            self.cond.notify_all()
        self.real.acquire()

    def __exit__(self, *a: object) -> None:
        self.real.release()

    def release(self) -> None:
        self.real.release()


def test_stats_count_requests_that_share_a_singleflight(redis_url, namespace):
    m = PrometheusMetrics()
    c = cachesync.Cache(redis_url, namespace=namespace, metrics=m, ttl_jitter=0.0)
    n = 100
    results: list[object] = []
    threads: list[threading.Thread] = []

    def follower() -> None:
        results.append(c.get("k", lambda: pytest.fail("a follower must not load")))

    def loader() -> str:
        fl = c._flights["k"]
        lock = fl.lock = CountingLock(fl.lock)  # type: ignore[assignment]
        threads.extend(threading.Thread(target=follower) for _ in range(n - 1))
        for t in threads:
            t.start()
        with lock.cond:  # every follower is blocked on this flight before the leader finishes (forced)
            assert lock.cond.wait_for(lambda: lock.entered == n - 1, 30)
        return "v"

    try:
        assert c.get("k", loader) == "v"
        for t in threads:
            t.join(30)
        assert results == ["v"] * (n - 1)
        st = c.stats
        assert st["misses"] == n  # one load, but n requests that missed
        assert st["loads"] == 1 and st["singleflight_joins"] == n - 1 and st["hits"] == 0
        got = samples(m)
        lab = ("namespace", namespace)
        assert got[("cachesync_cache_requests_total", (lab, ("outcome", "miss")))] == n
        assert got[("cachesync_cache_singleflight_joins_total", (lab,))] == n - 1
        assert got[("cachesync_cache_loads_total", (lab,))] == 1
        assert got[("cachesync_cache_load_seconds_count", (lab,))] == 1
        assert got[("cachesync_cache_fills_total", (lab, ("outcome", "accepted")))] == 1
        c.get("k", lambda: "other")  # a plain hit
        c.invalidate("k")
        got = samples(m)
        assert got[("cachesync_cache_requests_total", (lab, ("outcome", "hit")))] == 1
        assert got[("cachesync_cache_invalidations_total", (lab,))] == 1
    finally:
        c.redis.delete(seen_key(namespace))
        c.invalidate("k")
        c.close()


async def test_async_followers_count_per_request(redis_url, namespace):
    m = PrometheusMetrics()
    c = cachesync.AsyncCache(redis_url, namespace=namespace, metrics=m)
    gate = asyncio.Event()

    async def loader() -> str:
        await gate.wait()
        return "v"

    try:
        lead = asyncio.ensure_future(c.get("k", loader))
        while "k" not in c._flights:
            await asyncio.sleep(0)
        followers = [asyncio.ensure_future(c.get("k", loader)) for _ in range(9)]
        while len(c._flights["k"]) < 9:  # every follower has joined (forced, not timed)
            await asyncio.sleep(0)
        gate.set()
        assert await lead == "v" and await asyncio.gather(*followers) == ["v"] * 9
        assert c.stats["misses"] == 10 and c.stats["singleflight_joins"] == 9 and c.stats["loads"] == 1
        lab = ("namespace", namespace)
        assert samples(m)[("cachesync_cache_requests_total", (lab, ("outcome", "miss")))] == 10
        r = redis.Redis.from_url(redis_url)
        assert r.exists(seen_key(namespace))  # recorded by the first read
        r.delete(seen_key(namespace))
        r.close()
    finally:
        await c.invalidate("k")
        await c.aclose()


def test_metrics_off_keeps_a_plain_dict(redis_url, namespace):
    c = cachesync.Cache(redis_url, namespace=namespace, record_namespace=False)
    try:
        assert type(c.ctx.stats) is dict and c._metrics is None
    finally:
        c.close()
    with pytest.raises(ConfigError, match="metrics"):
        cachesync.Cache(redis_url, namespace=namespace, metrics="prometheus")
    c = cachesync.Cache(redis_url, namespace=namespace, metrics=NOOP, record_namespace=False)
    c.close()


def test_l1_metrics_exported(redis_url, namespace):
    m = PrometheusMetrics()
    c = cachesync.Cache(redis_url, namespace=namespace, metrics=m, l1=True, record_namespace=False)
    try:
        c.get("a", lambda: 1)
        lab = (("namespace", namespace),)
        got = samples(m)
        for name in ("cachesync_l1_hits_total", "cachesync_l1_misses_total", "cachesync_l1_evictions_total",
                     "cachesync_l1_flushes_total", "cachesync_l1_bypassed_total", "cachesync_l1_subscribed",
                     "cachesync_l1_entries"):
            assert (name, lab) in got, name
    finally:
        c.invalidate("a")
        c.close()


def wait_recorded(r: redis.Redis, key: str) -> None:
    import time

    deadline = time.monotonic() + 10
    while not r.exists(key):
        assert time.monotonic() < deadline, "the cache did not record its namespace"
        time.sleep(0.01)


def test_cache_records_namespace_and_daemons_warn_otherwise(redis_url, namespace, caplog):
    r = redis.Redis.from_url(redis_url)
    m = PrometheusMetrics()
    log = logging.getLogger("cachesync.test")
    try:
        with caplog.at_level(logging.WARNING, logger="cachesync.test"):
            assert not health.check_namespace(r, namespace, m, log, "relay")
        assert f"no cache has used namespace {namespace!r}" in caplog.text
        assert samples(m)[("cachesync_namespace_seen", (("namespace", namespace),))] == 0
        c = cachesync.Cache(redis_url, namespace=namespace)
        wait_recorded(r, seen_key(namespace))
        assert 0 < r.ttl(seen_key(namespace)) <= 7 * 86400
        c.close()
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="cachesync.test"):
            assert health.check_namespace(r, namespace, PrometheusMetrics(), log, "relay")
        assert caplog.text == ""
        assert samples(m)[("cachesync_namespace_seen", (("namespace", namespace),))] == 1
    finally:
        r.delete(seen_key(namespace))
        r.close()


def test_deliveries_to_an_unused_namespace_are_counted_and_warned(redis_url, namespace, caplog):
    r = redis.Redis.from_url(redis_url)
    m = PrometheusMetrics()
    log = logging.getLogger("cachesync.test")
    delivered = {"n": 0}
    lab = (("namespace", namespace),)
    try:
        with caplog.at_level(logging.WARNING, logger="cachesync.test"):
            health.check_namespace(r, namespace, m, log, "worker", lambda: delivered["n"])
            delivered["n"] = 5
            assert samples(m)[("cachesync_unused_namespace_deliveries_total", lab)] == 5
        assert f"delivered 5 invalidation(s) to namespace {namespace!r}, which no cache has used" in caplog.text
        r.set(seen_key(namespace), "1")  # a cache starts using it: later deliveries do not count
        delivered["n"] = 9
        assert samples(m)[("cachesync_unused_namespace_deliveries_total", lab)] == 5
        r.delete(seen_key(namespace))
        delivered["n"] = 10
        assert samples(m)[("cachesync_unused_namespace_deliveries_total", lab)] == 6
    finally:
        r.delete(seen_key(namespace))
        r.close()


def test_rules_naming_missing_tables_warn(tmp_path, caplog, namespace):
    from cachesync.db import connect

    url = f"sqlite:///{tmp_path}/t.db"
    conn = connect(url)
    conn.execute("CREATE TABLE present (id INTEGER PRIMARY KEY)")
    conn.commit()
    conn.close()
    m = PrometheusMetrics()
    log = logging.getLogger("cachesync.test")
    with caplog.at_level(logging.WARNING, logger="cachesync.test"):
        assert health.check_tables(url, ["present", "absent"], m, namespace, log, "cdc") == ["absent"]
    assert "the rules name tables that" in caplog.text and "absent" in caplog.text
    assert samples(m)[("cachesync_rules_missing_tables", (("namespace", namespace),))] == 1


def test_two_caches_share_one_registry(redis_url, namespace):
    m = PrometheusMetrics()
    a = cachesync.Cache(redis_url, namespace=namespace + "a", metrics=m, record_namespace=False)
    b = cachesync.Cache(redis_url, namespace=namespace + "b", metrics=m, record_namespace=False)
    try:
        a.get("k", lambda: 1)
        b.get("k", lambda: 1)
        b.get("k", lambda: 1)
        got = samples(m)
        assert got[("cachesync_cache_requests_total", (("namespace", namespace + "a"), ("outcome", "miss")))] == 1
        assert got[("cachesync_cache_requests_total", (("namespace", namespace + "b"), ("outcome", "hit")))] == 1
    finally:
        a.invalidate("k")
        b.invalidate("k")
        a.close()
        b.close()


# ---------------------------------------------------------------------------------------------- refusal reasons,
# lease waits, failed invalidations, serializer errors, L1 bypass time


def test_fills_refused_by_reason(redis_url, namespace):
    m = PrometheusMetrics()
    c = cachesync.Cache(redis_url, namespace=namespace, metrics=m, ttl_jitter=0.0, max_value_bytes=100)
    m2 = PrometheusMetrics()  # one cache per registry: two sources of one series would both be exported
    plain = cachesync.Cache(redis_url, namespace=namespace, metrics=m2, ttl_jitter=0.0, leases=False)
    try:
        def voided() -> str:  # a write lands while this reader loads: its lease is voided, its fill refused
            c.invalidate("a")
            return "old"

        assert c.get("a", voided) == "old"
        plain.invalidate("b", version=9)  # plain mode: no lease, the version floor alone refuses
        assert plain.get("b", lambda: cachesync.Versioned("v5", 5)) == "v5"
        with pytest.raises(cachesync.ValueTooLargeError):
            c.get("c", lambda: "x" * 500)
        s, s2 = samples(m), samples(m2)
        refused = {r: s[("cachesync_cache_fills_refused_total", (("namespace", namespace), ("reason", r)))]
                   for r in ("lease_voided", "older_version", "too_large")}
        assert refused == {"lease_voided": 1.0, "older_version": 0.0, "too_large": 1.0}
        assert s2[("cachesync_cache_fills_refused_total", (("namespace", namespace), ("reason", "older_version")))] \
            == 1.0
        assert s[("cachesync_cache_fills_total", (("namespace", namespace), ("outcome", "refused")))] == 1.0
        assert c.stats["fills_refused_lease"] == 1 and plain.stats["fills_refused_older"] == 1
    finally:
        c.close()
        plain.close()


def test_lease_wait_duration_is_observed_per_waiting_read(redis_url, namespace):
    m = PrometheusMetrics()
    holder = cachesync.Cache(redis_url, namespace=namespace, ttl_jitter=0.0)
    waiter = cachesync.Cache(redis_url, namespace=namespace, metrics=m, ttl_jitter=0.0)
    loading, release = threading.Event(), threading.Event()
    got: list[object] = []

    def slow() -> str:
        loading.set()
        assert release.wait(10)
        return "v"

    t = threading.Thread(target=lambda: got.append(holder.get("k", slow)))
    t.start()
    try:
        assert loading.wait(10)  # the holder has the lease
        w = threading.Thread(target=lambda: got.append(waiter.get("k", lambda: pytest.fail("must not load"))))
        w.start()
        deadline = time.monotonic() + 10
        while waiter.stats["waits"] == 0:  # counted just before its BLPOP
            assert time.monotonic() < deadline
            time.sleep(0.001)
        release.set()
        t.join(10)
        w.join(10)
        assert got == ["v", "v"]
        s = samples(m)
        lab = (("namespace", namespace),)
        assert s[("cachesync_cache_lease_wait_seconds_count", lab)] == 1.0
        assert s[("cachesync_cache_lease_wait_seconds_sum", lab)] > 0
        assert s[("cachesync_cache_lease_waits_total", lab)] == 1.0
    finally:
        release.set()
        holder.close()
        waiter.close()


def test_failed_invalidations_are_counted(namespace):
    m = PrometheusMetrics()
    c = cachesync.Cache("redis://127.0.0.1:1/0", namespace=namespace, metrics=m, record_namespace=False,
                        connect_timeout=0.5)
    try:
        with pytest.raises(cachesync.InvalidationError):
            c.invalidate("a", "b")
        with pytest.raises(cachesync.InvalidationError):
            c.set("c", 1)
        s = samples(m)
        assert s[("cachesync_cache_invalidations_failed_total", (("namespace", namespace),))] == 3.0
        assert s[("cachesync_cache_invalidations_total", (("namespace", namespace),))] == 0.0
    finally:
        c.close()


def test_serializer_errors_by_operation(redis_url, namespace, r):
    m = PrometheusMetrics()
    c = cachesync.Cache(redis_url, namespace=namespace, metrics=m, ttl_jitter=0.0)
    try:
        with pytest.raises(cachesync.SerializationError):
            c.get("a", lambda: object())  # JSON cannot encode it
        from cachesync.keys import entry_key

        hset(r, entry_key(namespace, "b"), mapping={"v": b"\xff{not json", "n": "0"})
        assert c.get("b", lambda: "fresh") == "fresh"  # the unreadable entry is deleted and reloaded
        s = samples(m)
        lab = ("namespace", namespace)
        assert s[("cachesync_cache_serializer_errors_total", (lab, ("operation", "dumps")))] == 1.0
        assert s[("cachesync_cache_serializer_errors_total", (lab, ("operation", "loads")))] == 1.0
        assert s[("cachesync_cache_corrupt_entries_total", (lab,))] == 1.0
    finally:
        c.close()


def test_l1_bypass_time_counts_only_while_bypassed(redis_url, namespace):
    m = PrometheusMetrics()
    c = cachesync.Cache(redis_url, namespace=namespace, metrics=m, ttl_jitter=0.0, l1=True)
    try:
        assert c.l1 is not None and c.l1.wait_ready(5)
        core = c.l1.core
        up = core.bypass_seconds  # the time before the first SUBSCRIBE was confirmed
        assert up > 0 and core.bypass_seconds == up  # not counting while up
        core.on_subscription_lost("test: forced")
        t0 = time.monotonic()
        while time.monotonic() == t0:  # let the monotonic clock move
            pass
        assert core.bypass_seconds > up
        core.on_subscribed()
        after = core.bypass_seconds
        assert after > up and core.bypass_seconds == after and core.stats["bypass_seconds"] == after
        s = samples(m)
        assert s[("cachesync_l1_bypass_seconds_total", (("namespace", namespace),))] == after
    finally:
        c.close()


def test_with_an_l1_every_read_is_an_l1_hit_or_a_cache_request(redis_url, namespace):
    m = PrometheusMetrics()
    c = cachesync.Cache(redis_url, namespace=namespace, metrics=m, ttl_jitter=0.0, l1=True)
    try:
        assert c.l1 is not None and c.l1.wait_ready(5)
        for i in range(10):
            c.get(f"k{i % 3}", lambda: "v")  # 3 misses, then L1 hits
        c.invalidate("k0")
        c.get("k0", lambda: "v")  # a miss again
        c.get("none", lambda: cachesync.NOT_FOUND)
        s = samples(m)
        lab = ("namespace", namespace)
        requests = sum(v for (n, labels), v in s.items() if n == "cachesync_cache_requests_total"
                       and lab in labels)
        l1_hits = s[("cachesync_l1_hits_total", (lab,))]
        assert l1_hits + requests == 12
        assert requests == 5 and l1_hits == 7
    finally:
        c.close()


def test_reads_that_raise_count_as_error_requests(redis_url, namespace):
    m = PrometheusMetrics()
    c = cachesync.Cache(redis_url, namespace=namespace, metrics=m, ttl_jitter=0.0)
    down = cachesync.Cache("redis://127.0.0.1:1/0", namespace=namespace, record_namespace=False,
                           on_redis_error="fail", connect_timeout=0.5)
    try:
        with pytest.raises(ZeroDivisionError):
            c.get("a", lambda: 1 / 0)
        with pytest.raises(ZeroDivisionError):
            c.get_many(["b", "c"], lambda ks: 1 / 0)
        assert c.get("d", lambda: 1) == 1
        lab = ("namespace", namespace)
        s = samples(m)
        assert s[("cachesync_cache_requests_total", (lab, ("outcome", "error")))] == 3
        assert s[("cachesync_cache_requests_total", (lab, ("outcome", "miss")))] == 4  # every read that loaded
        with pytest.raises(cachesync.CacheUnavailableError):
            down.get("x", lambda: 1)
        assert down.stats["read_errors"] == 1
    finally:
        c.close()
        down.close()


async def test_async_reads_that_raise_count_as_error_requests(redis_url, namespace):
    c = cachesync.AsyncCache(redis_url, namespace=namespace, ttl_jitter=0.0)
    try:
        with pytest.raises(ZeroDivisionError):
            await c.get("a", lambda: 1 / 0)
        with pytest.raises(ZeroDivisionError):
            await c.get_many(["b", "c"], lambda ks: 1 / 0)
        assert c.stats["read_errors"] == 3
    finally:
        await c.aclose()


def test_close_waits_for_the_namespace_record(redis_url: str, namespace: str, r: redis.Redis) -> None:
    """The namespace record (one SET on a background thread) lands before ``close()`` returns: a caller that
    deletes the namespace's keys after closing (the lab does) finds nothing written behind it. The SET is held at a
    gate while ``close()`` runs; the order of the two events is what is checked."""
    gate, entered = threading.Event(), threading.Event()
    order: list[str] = []

    class Gated(redis.Redis):
        def set(self, *a: Any, **kw: Any) -> Any:
            entered.set()
            gate.wait(10)
            out = super().set(*a, **kw)
            order.append("recorded")
            return out

    client = Gated.from_url(redis_url)
    c = cachesync.Cache(client=client, namespace=namespace)
    assert entered.wait(10)
    t = threading.Thread(target=lambda: (c.close(), order.append("closed")))
    t.start()
    t.join(0.2)  # without the wait in close(), "closed" is appended here, before the gate opens
    gate.set()
    t.join(10)
    assert order == ["recorded", "closed"] and r.exists(seen_key(namespace))
    client.close()
