"""Tracing through the OpenTelemetry SDK (in-memory exporter): the relay's delivery span travels in the bus message
(W3C traceparent, field ``tp``) and becomes the parent of the worker's apply span; old messages without it decode."""

from __future__ import annotations

import uuid

import pytest
import redis
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import cachesync
from cachesync.bus import Invalidation
from cachesync.bus.redis_streams import RedisStreamsBus
from cachesync.bus.worker import Worker
from cachesync.db import connect
from cachesync.keys import entry_key
from cachesync.outbox import Outbox
from cachesync.outbox.relay import Relay

EXPORTER = InMemorySpanExporter()


@pytest.fixture(scope="module", autouse=True)
def provider():
    p = TracerProvider()
    p.add_span_processor(SimpleSpanProcessor(EXPORTER))
    trace.set_tracer_provider(p)  # once per process: only this module sets one
    yield p


def test_relay_span_is_the_parent_of_the_worker_span(redis_url, namespace, tmp_path):
    EXPORTER.clear()
    url = f"sqlite:///{tmp_path}/o.db"
    table = "cachesync_outbox_" + uuid.uuid4().hex[:8]
    stream = "cachesync-tr-" + uuid.uuid4().hex[:8]
    ob = Outbox(table)
    conn = connect(url)
    ob.init(conn)
    ob.record(conn, "t:1")
    conn.commit()
    bus = RedisStreamsBus(redis_url, stream)
    cache = cachesync.Cache(redis_url, namespace=namespace, record_namespace=False)
    worker = Worker(bus, cache)
    bus.consume(worker.group, worker.consumer, 1, 0.01)  # creates the group before the publish
    relay = Relay(url, bus=bus, table=table)
    try:
        assert relay.drain() == 1
        assert worker.run_once(timeout=2.0) == 1
        spans = {s.name: s for s in EXPORTER.get_finished_spans()}
        deliver, apply = spans["cachesync.relay.deliver"], spans["cachesync.worker.apply"]
        assert deliver.attributes["cachesync.rows"] == 1
        assert apply.context.trace_id == deliver.context.trace_id
        assert apply.parent is not None and apply.parent.span_id == deliver.context.span_id
        assert cache.redis.hexists(entry_key(namespace, "t:1"), "ti")
    finally:
        relay.close()
        cache.invalidate("t:1")
        cache.close()
        bus.close()
        r = redis.Redis.from_url(redis_url)
        for k in r.scan_iter(f"{stream}*"):
            r.delete(k)
        r.close()
        conn.close()


def test_trace_context_is_optional_on_the_wire():
    old = Invalidation.decode(b'{"k":["a"]}')
    assert old.traceparent is None and old == Invalidation(("a",))
    tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    m = Invalidation(("a",), traceparent=tp)
    assert Invalidation.decode(m.encode()).traceparent == tp
    assert Invalidation.decode(b'{"k":["a"],"tp":{"x":1}}').traceparent is None  # junk ignored, never fatal
