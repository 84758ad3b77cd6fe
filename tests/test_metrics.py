"""The metrics interface: the no-op default, the Prometheus adapter (its text exposition) and the OpenTelemetry
adapter (the real SDK with an in-memory reader)."""

from __future__ import annotations

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from prometheus_client.parser import text_string_to_metric_families

from cachesync.errors import UsageError
from cachesync.metrics import NOOP, OtelMetrics, PrometheusMetrics


def samples(m: PrometheusMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for fam in text_string_to_metric_families(m.render().decode()):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_noop_is_off_and_checks_names():
    assert not NOOP.enabled
    NOOP.counter("cachesync_x_total", "x", ("namespace",)).inc(1, ("ns",))
    NOOP.histogram("cachesync_x_seconds", "x").observe(0.1)
    NOOP.gauge("cachesync_g", "x").set(3)
    assert NOOP.render() == b""
    with pytest.raises(UsageError, match="_total"):
        NOOP.counter("cachesync_x", "x")
    with pytest.raises(UsageError, match="cachesync_"):
        NOOP.gauge("other_g", "x")
    with pytest.raises(UsageError, match="kind"):
        NOOP.observe("cachesync_y", "y", "histogram", (), list)


def test_prometheus_counter_gauge_histogram_and_callbacks():
    m = PrometheusMetrics()
    c = m.counter("cachesync_requests_total", "requests", ("namespace", "outcome"))
    assert m.counter("cachesync_requests_total", "requests", ("namespace", "outcome")) is c
    c.inc(1, ("a", "hit"))
    c.inc(2, ("a", "hit"))
    c.inc(1, ("a", "miss"))
    m.gauge("cachesync_subscribed", "sub", ("namespace",)).set(1, ("a",))
    h = m.histogram("cachesync_load_seconds", "load", ("namespace",))
    h.observe(0.003, ("a",))
    h.observe(2.0, ("a",))
    stats = {"rows": 5}
    m.observe("cachesync_rows_total", "rows", "counter", ("namespace",), lambda: [(("a",), stats["rows"])])
    m.observe("cachesync_backlog_rows", "backlog", "gauge", (), lambda: [((), 7)])
    m.observe("cachesync_broken_rows", "fails", "gauge", (), lambda: 1 / 0)  # type: ignore[arg-type,return-value]
    got = samples(m)
    assert got[("cachesync_requests_total", (("namespace", "a"), ("outcome", "hit")))] == 3
    assert got[("cachesync_requests_total", (("namespace", "a"), ("outcome", "miss")))] == 1
    assert got[("cachesync_subscribed", (("namespace", "a"),))] == 1
    assert got[("cachesync_load_seconds_count", (("namespace", "a"),))] == 2
    assert got[("cachesync_load_seconds_bucket", (("le", "0.005"), ("namespace", "a")))] == 1
    assert got[("cachesync_rows_total", (("namespace", "a"),))] == 5
    assert got[("cachesync_backlog_rows", ())] == 7
    stats["rows"] = 9  # read at scrape time
    assert samples(m)[("cachesync_rows_total", (("namespace", "a"),))] == 9
    m.observe("cachesync_rows_total", "rows", "counter", ("namespace",), lambda: [(("b",), 1)])  # a 2nd source
    assert samples(m)[("cachesync_rows_total", (("namespace", "b"),))] == 1
    with pytest.raises(UsageError, match="already"):
        m.observe("cachesync_rows_total", "rows", "counter", (), list)
    with pytest.raises(UsageError, match="already"):
        m.observe("cachesync_requests_total", "rows", "counter", (), list)


def test_two_prometheus_metrics_do_not_collide():
    a, b = PrometheusMetrics(), PrometheusMetrics()
    a.counter("cachesync_x_total", "x").inc()
    b.counter("cachesync_x_total", "x").inc(5)
    assert samples(a)[("cachesync_x_total", ())] == 1
    assert samples(b)[("cachesync_x_total", ())] == 5


def otel_points(reader: InMemoryMetricReader) -> dict[str, list]:
    data = reader.get_metrics_data()
    out: dict[str, list] = {}
    for rm in data.resource_metrics:
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                out.setdefault(metric.name, []).extend(metric.data.data_points)
    return out


def test_otel_adapter_with_the_sdk():
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    m = OtelMetrics(provider)
    assert m.enabled
    m.counter("cachesync_requests_total", "requests", ("namespace", "outcome")).inc(2, ("a", "hit"))
    h = m.histogram("cachesync_load_seconds", "load", ("namespace",))
    h.observe(0.01, ("a",))
    h.observe(0.02, ("a",))
    m.gauge("cachesync_subscribed", "sub", ("namespace",)).set(1, ("a",))
    m.observe("cachesync_rows_total", "rows", "counter", ("namespace",), lambda: [(("a",), 4)])
    pts = otel_points(reader)
    (req,) = pts["cachesync_requests"]
    assert req.value == 2 and dict(req.attributes) == {"namespace": "a", "outcome": "hit"}
    (load,) = pts["cachesync_load_seconds"]
    assert load.count == 2 and abs(load.sum - 0.03) < 1e-9
    assert pts["cachesync_subscribed"][0].value == 1
    assert pts["cachesync_rows"][0].value == 4
    provider.shutdown()
