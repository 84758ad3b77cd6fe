"""A cache's metrics (``Cache(metrics=...)``): the cache's ``stats`` are exported as counters read at collection
time, so the protocol counts once, in one place, and a hit costs nothing more with metrics on; the load-duration
histogram is observed per loader call.

``stats`` counts per request: a caller that joins another caller's single-flight (same key, same process) adds
its own outcome (``hits``, ``misses``, ``negative_hits``, ``stale_served``, ``fallback_loads``; the cache counts
``singleflight_joins`` itself);
the per-operation counters (``loads``, ``fills``, ``waits``, ...) count the work done once for all of them.
"""

from __future__ import annotations

from typing import Any

from .metrics import Histogram, Metrics

# stats key -> (metric name, help, extra label name, extra label value)
_SINKS: dict[str, tuple[str, str, str, str]] = {
    "hits": ("cachesync_cache_requests_total", "Cache reads by outcome (per request)", "outcome", "hit"),
    "misses": ("cachesync_cache_requests_total", "", "outcome", "miss"),
    "negative_hits": ("cachesync_cache_requests_total", "", "outcome", "negative"),
    "stale_served": ("cachesync_cache_requests_total", "", "outcome", "stale"),
    "fallback_loads": ("cachesync_cache_requests_total", "", "outcome", "fallback"),
    "read_errors": ("cachesync_cache_requests_total", "", "outcome", "error"),
    "singleflight_joins": ("cachesync_cache_singleflight_joins_total", "Reads that shared another caller's in-flight read",
              "", ""),
    "loads": ("cachesync_cache_loads_total", "Loader calls", "", ""),
    "fills": ("cachesync_cache_fills_total", "Write-backs of loaded values by outcome", "outcome", "accepted"),
    "fills_refused": ("cachesync_cache_fills_total", "", "outcome", "refused"),
    "waits": ("cachesync_cache_lease_waits_total", "Waits for another reader's lease", "", ""),
    "invalidations": ("cachesync_cache_invalidations_total", "Keys invalidated (sent to Redis)", "", ""),
    "redis_errors": ("cachesync_cache_redis_errors_total", "Redis commands that failed (Redis down or timed out)",
                     "", ""),
    "sets": ("cachesync_cache_sets_total", "set() writes by outcome", "outcome", "accepted"),
    "sets_refused": ("cachesync_cache_sets_total", "", "outcome", "refused"),
    "fills_refused_lease": ("cachesync_cache_fills_refused_total", "Write-backs (or values) refused, by reason",
                            "reason", "lease_voided"),
    "fills_refused_older": ("cachesync_cache_fills_refused_total", "", "reason", "older_version"),
    "values_too_large": ("cachesync_cache_fills_refused_total", "", "reason", "too_large"),
    "invalidations_failed": ("cachesync_cache_invalidations_failed_total",
                             "Keys whose invalidation (or set) failed: Redis down, InvalidationError raised", "", ""),
    "serialize_errors": ("cachesync_cache_serializer_errors_total", "Values the serializer could not encode "
                         "(dumps) or decode (loads)", "operation", "dumps"),
    "deserialize_errors": ("cachesync_cache_serializer_errors_total", "", "operation", "loads"),
    "corrupt_entries": ("cachesync_cache_corrupt_entries_total", "Unreadable entries found in Redis and deleted",
                        "", ""),
}

def export_stats(stats: dict[str, int], metrics: Metrics, namespace: str) -> None:
    """Export the cache's ``stats`` as the counters of :data:`_SINKS`, read at collection time: the hit path
    pays nothing for metrics (the protocol already counts in ``stats``)."""
    groups: dict[str, list[tuple[str, str, str]]] = {}
    helps: dict[str, str] = {}
    for key, (name, doc, extra, value) in _SINKS.items():
        groups.setdefault(name, []).append((key, extra, value))
        helps[name] = helps.get(name) or doc
    for name, members in groups.items():
        extra = members[0][1]
        names = ("namespace", extra) if extra else ("namespace",)

        def read(members: list[tuple[str, str, str]] = members) -> list[tuple[tuple[str, ...], float]]:
            return [((namespace, value) if extra_ else (namespace,), float(stats.get(key, 0)))
                    for key, extra_, value in members]

        metrics.observe(name, helps[name], "counter", names, read)


def joined(stats: dict[str, int], entry: Any) -> None:
    """Count a request that got ``entry`` by joining another caller's single-flight."""
    src = entry.source
    if src == "fallback":
        k = "fallback_loads"
    elif src == "loader":
        k = "misses"
    elif entry.stale:
        k = "stale_served"
    elif not entry.found:
        k = "negative_hits"
    else:
        k = "hits"
    stats[k] = stats.get(k, 0) + 1


def instrument(cache: Any) -> CacheMetrics | None:
    """When ``cache.options.metrics`` is set or ``tracing=True``: export the cache's stats and its L1 and return
    the :class:`CacheMetrics` (else None, and nothing changes: the drivers test for None)."""
    m = cache.options.metrics
    traced = bool(cache.options.tracing)
    if m is None and not traced:
        return None
    if traced:  # invalidations carry the current span's traceparent to the L1s (core imports no tracer)
        from .tracing import current_traceparent, require

        require()
        cache.ctx.traceparent = current_traceparent
    ns = cache.options.namespace
    if m is None:
        from .metrics import NOOP

        m = NOOP
    export_stats(cache.ctx.stats, m, ns)
    cm = CacheMetrics(m, ns, traced)
    cm.export_l1(cache)
    return cm


class CacheMetrics:
    """What a cache keeps when ``metrics=`` or ``tracing=True`` is given: the load and lease-wait histograms, the
    L1 exports, and the attributes the drivers set on the current ``cachesync.get`` span."""

    def __init__(self, metrics: Metrics, namespace: str, traced: bool = False) -> None:
        self.metrics, self.labels, self.traced = metrics, (namespace,), traced
        self.load_seconds: Histogram = metrics.histogram("cachesync_cache_load_seconds", "Loader call duration",
                                                         ("namespace",))
        self.wait_seconds: Histogram = metrics.histogram(
            "cachesync_cache_lease_wait_seconds", "Time one read spent waiting for another reader's lease (per "
            "read that waited)", ("namespace",))

    def loaded(self, seconds: float) -> None:
        """One loader call took ``seconds``."""
        self.load_seconds.observe(seconds, self.labels)
        if self.traced:
            from .tracing import set_attribute

            set_attribute("cachesync.load_seconds", seconds)

    def waited(self, seconds: float) -> None:
        """One read waited ``seconds`` in total for other readers' leases."""
        self.wait_seconds.observe(seconds, self.labels)
        if self.traced:
            from .tracing import set_attribute

            set_attribute("cachesync.lease_wait_seconds", seconds)

    def export_l1(self, cache: Any) -> None:
        """Export the L1's counters and subscription state, read at collection time."""
        lab = self.labels

        def stat(name: str) -> Any:
            return lambda: [] if cache.l1 is None else [(lab, float(cache.l1.core.stats[name]))]

        for key, name, doc in (("hits", "cachesync_l1_hits_total", "L1 hits"),
                               ("misses", "cachesync_l1_misses_total", "L1 misses (read through to Redis)"),
                               ("bypassed", "cachesync_l1_bypassed_total",
                                "Reads that bypassed the L1 while its subscription was down"),
                               ("evictions", "cachesync_l1_evictions_total", "L1 entries evicted (size bound)"),
                               ("flushes", "cachesync_l1_flushes_total", "Whole-L1 flushes (subscription lost, ...)"),
                               ("invalidations", "cachesync_l1_invalidations_total",
                                "L1 entries dropped by invalidation messages"),
                               ("bypass_seconds", "cachesync_l1_bypass_seconds_total",
                                "Seconds the L1 was bypassed (its subscription down; reads went to Redis)")):
            self.metrics.observe(name, doc, "counter", ("namespace",), stat(key))
        self.metrics.observe("cachesync_l1_subscribed", "1 while the L1's invalidation subscription is up",
                             "gauge", ("namespace",), lambda: [] if cache.l1 is None else [
                                 (lab, 1.0 if cache.l1.core.stats["state"] == "up" else 0.0)])
        self.metrics.observe("cachesync_l1_entries", "Entries held by the L1", "gauge", ("namespace",),
                             stat("entries"))


SEEN_TTL = 7 * 86400
"""Seconds the namespace record ``cs:{namespace}:seen`` lives; every cache start refreshes it."""


def seen_key(namespace: str) -> str:
    """The Redis key a cache sets when it starts, so that daemons can tell a namespace nobody uses."""
    return f"cs:{namespace}:seen"


def record_namespace_sync(cache: Any) -> Any:
    """Record the cache's namespace in Redis (one SET with a TTL, on a background thread; errors ignored).
    Returns the thread (``close()`` waits for it, so that nothing is written after a cache is closed)."""
    import threading
    import time

    def run() -> None:
        try:
            cache.redis.set(seen_key(cache.options.namespace), str(int(time.time())), ex=SEEN_TTL)
        except Exception as e:  # Redis down at start: the daemons may warn, nothing else changes
            import logging

            logging.getLogger("cachesync").debug("cachesync: could not record namespace: %s", e)

    t = threading.Thread(target=run, name="cachesync-seen", daemon=True)
    t.start()
    return t


async def record_namespace_async(cache: Any) -> None:
    """The asyncio twin of :func:`record_namespace_sync` (awaited in a task of its own)."""
    import asyncio
    import time

    try:  # bounded: the async client has no socket timeout of its own (the cache's watchdog bounds commands)
        await asyncio.wait_for(cache.redis.set(seen_key(cache.options.namespace), str(int(time.time())),
                                               ex=SEEN_TTL), cache.options.socket_timeout)
    except Exception as e:
        import logging

        logging.getLogger("cachesync").debug("cachesync: could not record namespace: %s", e)
