"""Tracing through the OpenTelemetry SDK (in-memory exporter): the relay's delivery span travels in the bus message
(W3C traceparent, field ``tp``) and becomes the parent of the worker's apply span; old messages without it decode."""

from __future__ import annotations

import re
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
from entries import hexists, hget, hgetall, hset  # noqa: F401

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
        assert hexists(cache.redis, entry_key(namespace, "t:1"), "ti")
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


# ---------------------------------------------------------------------------------------------- the cache's spans

import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

from cachesync.outbox import ddl, has_column  # noqa: E402

TRACER = trace.get_tracer("tests")


def _spans(name: str) -> list:
    return [s for s in EXPORTER.get_finished_spans() if s.name == name]


def test_get_spans_carry_outcome_load_and_lease_wait(redis_url, namespace):
    EXPORTER.clear()
    holder = cachesync.Cache(redis_url, namespace=namespace, ttl_jitter=0.0, tracing=True, record_namespace=False)
    waiter = cachesync.Cache(redis_url, namespace=namespace, ttl_jitter=0.0, tracing=True, record_namespace=False)
    loading, release = threading.Event(), threading.Event()

    def slow() -> str:
        loading.set()
        assert release.wait(10)
        return "v"

    t = threading.Thread(target=lambda: holder.get("k", slow))
    try:
        t.start()
        assert loading.wait(10)
        w = threading.Thread(target=lambda: waiter.get("k", lambda: pytest.fail("must not load")))
        w.start()
        deadline = time.monotonic() + 10
        while waiter.stats["waits"] == 0:  # the waiter is in its BLPOP
            assert time.monotonic() < deadline
            time.sleep(0.001)
        release.set()
        t.join(10)
        w.join(10)
        assert holder.get("k", lambda: pytest.fail("cached")) == "v"
        assert holder.get("none", lambda: cachesync.NOT_FOUND) is cachesync.NOT_FOUND
        with pytest.raises(ZeroDivisionError):
            holder.get("boom", lambda: 1 / 0)
        gets = _spans("cachesync.get")
        by = [(s.attributes.get("cachesync.outcome"), "cachesync.load_seconds" in s.attributes,
               "cachesync.lease_wait_seconds" in s.attributes) for s in gets]
        assert sorted(by) == sorted([("miss", True, False), ("hit", False, True), ("hit", False, False),
                                     ("miss", True, False), ("error", True, False)])
        assert all(s.attributes["cachesync.namespace"] == namespace for s in gets)
        err = next(s for s in gets if s.attributes["cachesync.outcome"] == "error")
        assert err.status.status_code == trace.StatusCode.ERROR
    finally:
        release.set()
        holder.close()
        waiter.close()


def test_write_invalidate_and_set_spans(redis_url, namespace):
    EXPORTER.clear()
    c = cachesync.Cache(redis_url, namespace=namespace, tracing=True, record_namespace=False)
    off = cachesync.Cache(redis_url, namespace=namespace, record_namespace=False)  # tracing off: no spans
    try:
        with c.write("a", "b"):
            pass
        c.invalidate("x", version=3)
        c.set("y", 1)
        off.invalidate("x")
        off.get("z", lambda: 1)
        names = [s.name for s in EXPORTER.get_finished_spans()]
        assert sorted(names) == ["cachesync.invalidate", "cachesync.set", "cachesync.write"]
        assert _spans("cachesync.write")[0].attributes["cachesync.keys"] == 2
    finally:
        c.close()
        off.close()


async def test_async_cache_spans(redis_url, namespace):
    EXPORTER.clear()
    c = cachesync.AsyncCache(redis_url, namespace=namespace, tracing=True, record_namespace=False)
    try:
        assert await c.get("k", lambda: "v") == "v"
        assert await c.get("k", lambda: "w") == "v"
        async with c.write("k"):
            pass
        await c.invalidate("k")
        await c.set("k", 2)
        outs = [s.attributes["cachesync.outcome"] for s in _spans("cachesync.get")]
        assert outs == ["miss", "hit"]
        assert {s.name for s in EXPORTER.get_finished_spans()} == {
            "cachesync.get", "cachesync.write", "cachesync.invalidate", "cachesync.set"}
    finally:
        await c.aclose()


def test_tracing_option_is_checked():
    with pytest.raises(cachesync.ConfigError, match="tracing"):
        cachesync.CacheOptions(tracing="yes")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------- the outbox row


@pytest.fixture(params=["sqlite", "postgresql", "mysql"])
def db_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/o.db"
    return request.getfixturevalue("pg_url" if request.param == "postgresql" else "mysql_url")


def test_the_writers_trace_context_travels_in_the_outbox_row(db_url, redis_url, namespace):
    EXPORTER.clear()
    table = "cachesync_outbox_" + uuid.uuid4().hex[:8]
    ob = Outbox(table)
    conn = connect(db_url)
    cache = cachesync.Cache(redis_url, namespace=namespace, tracing=True, record_namespace=False)
    relay = Relay(db_url, cache, table=table, listen=False)
    try:
        ob.init(conn)
        with TRACER.start_as_current_span("app.update") as w:
            ob.record(conn, "u:1")
            conn.commit()
        ob.record(conn, "u:2")  # outside any span: NULL
        conn.commit()
        cur = conn.cursor()
        cur.execute(f"SELECT cache_keys, traceparent FROM {table} ORDER BY id")
        rows = cur.fetchall()
        cur.close()
        conn.commit()
        tid = f"{w.get_span_context().trace_id:032x}"
        assert rows[0][1].split("-")[1] == tid and rows[1][1] is None
        assert relay.drain() == 2
        deliver = _spans("cachesync.relay.deliver")[0]
        assert deliver.context.trace_id == w.get_span_context().trace_id
        assert deliver.parent is not None and deliver.parent.span_id == w.get_span_context().span_id
    finally:
        relay.close()
        ob.drop(conn)
        conn.close()
        cache.close()


def test_an_old_table_without_the_column_still_works(db_url, redis_url, namespace):
    EXPORTER.clear()
    table = "cachesync_outbox_" + uuid.uuid4().hex[:8]
    ob = Outbox(table)
    conn = connect(db_url)
    d = cachesync.db.dialect_of(db_url)
    cur = conn.cursor()
    old = re.sub(r", traceparent \w+(\(\d+\))? NULL", "", ddl(d, table)[0])
    assert "traceparent" not in old
    cur.execute(old)
    cur.close()
    conn.commit()
    assert not has_column(conn, d, table, "traceparent")
    cache = cachesync.Cache(redis_url, namespace=namespace, tracing=True, record_namespace=False)
    relay = Relay(db_url, cache, table=table, listen=False, init=False)
    try:
        with TRACER.start_as_current_span("app.update"):
            ob.record(conn, "u:1")
            ob.commit(conn, "u:2")
        assert relay.drain() == 2
        deliver = _spans("cachesync.relay.deliver")[0]
        assert deliver.parent is None  # no trace context to carry; nothing failed
    finally:
        relay.close()
        ob.drop(conn)
        conn.close()
        cache.close()


# ---------------------------------------------------------------------------------------------- commit -> L1 drop

CHILD = r"""
import json, sys, threading
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
import cachesync

dropped = threading.Event()

class Exporter(InMemorySpanExporter):
    def export(self, spans):
        out = super().export(spans)
        if any(s.name == "cachesync.l1.drop" for s in spans):
            dropped.set()
        return out

exp = Exporter()
p = TracerProvider()
p.add_span_processor(SimpleSpanProcessor(exp))
trace.set_tracer_provider(p)
redis_url, ns, key = sys.argv[1:4]
c = cachesync.Cache(redis_url, namespace=ns, l1=True, tracing=True, record_namespace=False)
assert c.l1.wait_ready(10)
c.get(key, lambda: "v1")
assert key in c.l1.core
print("ready", flush=True)
assert dropped.wait(20), "no cachesync.l1.drop span"
assert key not in c.l1.core
print(json.dumps([{"name": s.name, "trace": f"{s.context.trace_id:032x}", "span": f"{s.context.span_id:016x}",
                   "parent": None if s.parent is None else f"{s.parent.span_id:016x}",
                   "attributes": dict(s.attributes)} for s in exp.get_finished_spans()]), flush=True)
c.close()
"""


def test_one_trace_from_the_commit_to_another_processs_l1_drop(pg_url, redis_url, namespace):
    EXPORTER.clear()
    table = "cachesync_outbox_" + uuid.uuid4().hex[:8]
    ob = Outbox(table)
    conn = connect(pg_url)
    ob.init(conn)
    child = subprocess.Popen([sys.executable, "-c", CHILD, redis_url, namespace, "user:1"], stdout=subprocess.PIPE,
                             text=True)
    cache = cachesync.Cache(redis_url, namespace=namespace, tracing=True, record_namespace=False)
    relay = Relay(pg_url, cache, table=table, listen=False)
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "ready"
        with TRACER.start_as_current_span("app.update") as w:
            ob.commit(conn, "user:1")
        assert relay.drain() == 1
        out, _ = child.communicate(timeout=30)
        assert child.returncode == 0
        drop = next(s for s in json.loads(out) if s["name"] == "cachesync.l1.drop")
        deliver = _spans("cachesync.relay.deliver")[0]
        assert drop["trace"] == f"{w.get_span_context().trace_id:032x}"  # the writer's trace, in the other process
        assert drop["parent"] == f"{deliver.context.span_id:016x}"
        assert deliver.parent is not None and deliver.parent.span_id == w.get_span_context().span_id
        assert drop["attributes"] == {"cachesync.namespace": namespace, "cachesync.keys": 1}
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        relay.close()
        ob.drop(conn)
        conn.close()
        cache.close()


def test_old_l1s_ignore_the_traceparent_line_and_new_ones_accept_messages_without_it(redis_url, namespace):
    from cachesync.l1 import L1, L1Options

    core = L1(L1Options.build(True), namespace)  # type: ignore[arg-type]
    core.traced = True
    tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    seen: list[object] = []
    core.add_listener(seen.append)
    core.on_message(f"{entry_key(namespace, 'a')}\ntp={tp}".encode())  # not an entry key: never taken for one
    core.on_message(entry_key(namespace, "b").encode())
    assert seen == [["a"], ["b"]] and core.malformed_messages == 0
    core.close()


def test_sqlalchemy_outbox_rows_carry_the_writers_trace_context(db_url):
    """The SQLAlchemy recorder (what OutboxSync, WritePath on a Session and the ORM hooks use) writes the
    traceparent column too."""
    from sqlalchemy import create_engine, text

    from cachesync.outbox import sqlalchemy as cs_sa
    from test_sqlalchemy_outbox import sa_url

    table = "cachesync_outbox_" + uuid.uuid4().hex[:8]
    ob = Outbox(table)
    raw = connect(db_url)
    ob.init(raw)
    engine = create_engine(sa_url(db_url))
    try:
        with engine.begin() as c, TRACER.start_as_current_span("app.update") as w:
            cs_sa.record(c, "u:1", version=3, outbox=ob)
        with engine.begin() as c:
            cs_sa.record(c, "u:2", outbox=ob)  # outside any span: NULL
            rows = c.execute(text(f"SELECT cache_keys, traceparent FROM {table} ORDER BY id")).fetchall()
        assert rows[0][1].split("-")[1] == f"{w.get_span_context().trace_id:032x}" and rows[1][1] is None
    finally:
        engine.dispose()
        ob.drop(raw)
        raw.close()


def test_the_postgresql_fast_path_carries_the_writers_trace(pg_url, redis_url, namespace):
    """The NOTIFY payload the trigger sends carries the row's traceparent (4th item): the relay's fast path,
    applying rows from notifications without claiming them, makes its delivery span a child of the writer."""
    import psycopg

    EXPORTER.clear()
    table = "cachesync_outbox_" + uuid.uuid4().hex[:8]
    ob = Outbox(table)
    conn = connect(pg_url)
    ob.init(conn)
    listener = psycopg.connect(pg_url, autocommit=True)
    cache = cachesync.Cache(redis_url, namespace=namespace, record_namespace=False)
    relay = Relay(pg_url, cache, table=table, init=False)
    try:
        assert relay.fast
        listener.execute(f"LISTEN {table}")
        cache.set("user:1", "old")
        with TRACER.start_as_current_span("app.update") as w:
            ob.commit(conn, "user:1")
        payloads = [n.payload for n in listener.notifies(timeout=10, stop_after=1)]
        assert json.loads(payloads[0])[3].split("-")[1] == f"{w.get_span_context().trace_id:032x}"
        assert relay._apply_payloads(payloads) == 1
        assert cache.peek("user:1").get("v") is None
        deliver = _spans("cachesync.relay.deliver")[0]
        assert deliver.parent is not None and deliver.parent.span_id == w.get_span_context().span_id
        assert deliver.attributes["cachesync.fast_path"] is True
    finally:
        listener.close()
        relay.close()
        ob.drop(conn)
        conn.close()
        cache.close()
