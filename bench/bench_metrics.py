"""The hit path with metrics on (each adapter) and with tracing on vs off, same run, interleaved rounds: Cache.get
and AsyncCache.get.

    .venv/bin/python bench/bench_metrics.py [--redis-url URL] [--n 2000] [--rounds 15]

Without --redis-url a private redis-server is started. Prints medians and ratios to metrics off (lower is
better); goal: each adapter within x1.05 of off. A hit with metrics on costs one dict subclass __setitem__ and one
counter increment (prometheus_client: a lock; OpenTelemetry SDK: an aggregation update). ``tracing=True`` makes one
``cachesync.get`` span per read through the OpenTelemetry SDK (a BatchSpanProcessor with an exporter that drops
the spans: the cost of making them, not of shipping them).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

import cachesync
from cachesync.metrics import OtelMetrics, PrometheusMetrics

from _util import env_line, interleaved, private_redis

PAYLOAD = {"id": 12345, "name": "Alice Example", "email": "alice@example.com", "plan": "pro"}


class _Drop(SpanExporter):
    def export(self, spans: object) -> SpanExportResult:
        return SpanExportResult.SUCCESS


_tp = TracerProvider()
_tp.add_span_processor(BatchSpanProcessor(_Drop()))
trace.set_tracer_provider(_tp)


def caches(url: str, cls: type) -> dict[str, object]:
    provider = MeterProvider(metric_readers=[InMemoryMetricReader()])
    return {"metrics off": cls(url, namespace="benchm", record_namespace=False),
            "PrometheusMetrics": cls(url, namespace="benchm", record_namespace=False, metrics=PrometheusMetrics()),
            "OtelMetrics (SDK)": cls(url, namespace="benchm", record_namespace=False,
                                     metrics=OtelMetrics(provider)),
            "tracing=True (SDK)": cls(url, namespace="benchm", record_namespace=False, tracing=True)}


def run_sync(url: str, n: int, rounds: int) -> dict[str, float]:
    cs = caches(url, cachesync.Cache)
    for c in cs.values():
        c.get("user", lambda: PAYLOAD)  # type: ignore[attr-defined]
    out = interleaved({k: (lambda c=c: c.get("user", lambda: PAYLOAD)) for k, c in cs.items()},  # type: ignore
                      n, rounds)
    for c in cs.values():
        c.close()  # type: ignore[attr-defined]
    return out


async def run_async(url: str, n: int, rounds: int) -> dict[str, float]:
    cs = caches(url, cachesync.AsyncCache)
    for c in cs.values():
        await c.get("user", lambda: PAYLOAD)  # type: ignore[attr-defined]
    samples: dict[str, list[float]] = {k: [] for k in cs}
    for _ in range(rounds):
        for k, c in cs.items():
            t0 = time.perf_counter()
            for _ in range(n):
                await c.get("user", lambda: PAYLOAD)  # type: ignore[attr-defined]
            samples[k].append((time.perf_counter() - t0) / n)
    for c in cs.values():
        await c.aclose()  # type: ignore[attr-defined]
    return {k: statistics.median(v) for k, v in samples.items()}


def report(title: str, res: dict[str, float]) -> None:
    base = res["metrics off"]
    print(f"\n{title}")
    for k, v in res.items():
        print(f"  {k:<22} {v * 1e6:8.1f} µs   x{v / base:.3f} of metrics off")
    worst = max(v for k, v in res.items() if not k.startswith("tracing"))
    print(f"  => worst metrics adapter x{worst / base:.3f} (goal <= 1.05)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--redis-url")
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=15)
    a = ap.parse_args()
    load = "{:.2f} {:.2f} {:.2f}".format(*os.getloadavg())
    print(f"bench_metrics: {env_line()} | load avg {load}")

    def go(url: str) -> None:
        report("sync Cache.get (hit)", run_sync(url, a.n, a.rounds))
        report("asyncio AsyncCache.get (hit)", asyncio.run(run_async(url, a.n, a.rounds)))

    if a.redis_url:
        go(a.redis_url)
    else:
        with private_redis() as url:
            go(url)


if __name__ == "__main__":
    main()
