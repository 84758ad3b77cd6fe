"""Metrics: one small internal interface, a no-op default and two real adapters.

Every component takes a :class:`Metrics` (default :data:`NOOP`: metrics off, each call a method call that does
nothing). Instruments are made once, by name, and used with low-cardinality labels only (``namespace``,
``outcome``, ``reason``, ``kind``; never a key)::

    m = PrometheusMetrics()                      # extra "prometheus" (prometheus_client), own registry
    m = OtelMetrics(meter_provider)              # extra "otel" (opentelemetry-api), the given/global provider
    c = m.counter("cachesync_relay_delivered_total", "Outbox rows delivered", ("namespace",))
    c.inc(3, ("ns",))                            # label values, in the order of the label names

Names follow the Prometheus conventions: the ``cachesync_`` prefix, ``_total`` for counters, ``_seconds`` for
durations. The OpenTelemetry adapter drops the ``_total`` suffix (OpenTelemetry exporters add their own) and gives
``_seconds`` instruments the unit ``s``. Values that already live elsewhere (a daemon's ``stats`` dict, a backlog
query) are exported with :meth:`Metrics.observe`: a callback read at collection time, so nothing is counted twice.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

from .errors import UsageError

Labels = tuple[str, ...]
Sample = tuple[Labels, float]

DEFAULT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
"""Histogram bucket bounds in seconds (1 ms to 1 min)."""


def _check(name: str, kind: str) -> None:
    if not name.startswith("cachesync_") or not name.replace("_", "").isalnum() or name != name.lower():
        raise UsageError(f"metric name {name!r} must be lower_snake_case and start with 'cachesync_'")
    if kind == "counter" and not name.endswith("_total"):
        raise UsageError(f"counter {name!r} must end with '_total'")


class Counter:
    """A monotonically increasing count. ``inc(amount=1, labels=())``."""

    __slots__ = ()

    def inc(self, amount: float = 1.0, labels: Labels = ()) -> None:
        """Add ``amount`` (>= 0) to the series with these label values."""


class Gauge:
    """A value that goes up and down. ``set(value, labels=())``."""

    __slots__ = ()

    def set(self, value: float, labels: Labels = ()) -> None:
        """Set the series with these label values to ``value``."""


class Histogram:
    """A distribution (durations in seconds). ``observe(value, labels=())``."""

    __slots__ = ()

    def observe(self, value: float, labels: Labels = ()) -> None:
        """Record one observation of ``value``."""


_NOOP_COUNTER, _NOOP_GAUGE, _NOOP_HISTOGRAM = Counter(), Gauge(), Histogram()


class Metrics:
    """The interface, and the no-op implementation (metrics off). ``enabled`` is False here: callers may skip
    computing a value (a duration, a label) when it is."""

    enabled = False

    def counter(self, name: str, documentation: str, labelnames: Sequence[str] = ()) -> Counter:
        """A counter named ``name`` (ends with ``_total``) with these label names."""
        _check(name, "counter")
        return _NOOP_COUNTER

    def gauge(self, name: str, documentation: str, labelnames: Sequence[str] = ()) -> Gauge:
        """A gauge named ``name``."""
        _check(name, "gauge")
        return _NOOP_GAUGE

    def histogram(self, name: str, documentation: str, labelnames: Sequence[str] = (),
                  buckets: Sequence[float] = DEFAULT_BUCKETS) -> Histogram:
        """A histogram named ``name`` (durations: ends with ``_seconds``), bucket bounds ``buckets``."""
        _check(name, "histogram")
        return _NOOP_HISTOGRAM

    def observe(self, name: str, documentation: str, kind: str, labelnames: Sequence[str],
                callback: Callable[[], Iterable[Sample]]) -> None:
        """Export values read at collection time: ``callback()`` yields ``(label values, value)`` pairs.
        ``kind`` is ``"counter"`` (the value only grows, e.g. a ``stats`` entry) or ``"gauge"``."""
        if kind not in ("counter", "gauge"):
            raise UsageError(f"observe kind must be 'counter' or 'gauge', got {kind!r}")
        _check(name, kind)

    def render(self) -> bytes:
        """The Prometheus text exposition of every series (empty when the adapter has none to serve)."""
        return b""


NOOP = Metrics()
"""Metrics off (the default everywhere)."""


def _add_callback(made: dict[str, Any], observed: dict[str, Any], name: str, documentation: str, kind: str,
                  labelnames: Sequence[str], callback: Callable[[], Iterable[Sample]]) -> bool:
    """Record ``callback`` under ``name``; several sources (two caches of one process) may share a name when
    kind and label names agree. Returns True when the name is new."""
    if name in made:
        raise UsageError(f"metric {name!r} is already defined as an instrument")
    got = observed.get(name)
    if got is None:
        observed[name] = (documentation, kind, tuple(labelnames), [callback])
        return True
    if got[1] != kind or got[2] != tuple(labelnames):
        raise UsageError(f"metric {name!r} is already defined as a {got[1]} with labels {got[2]}")
    got[3].append(callback)
    return False


def _read(callbacks: list[Callable[[], Iterable[Sample]]]) -> list[Sample]:
    out: list[Sample] = []
    for cb in list(callbacks):
        try:
            out.extend(cb())
        except Exception:  # a failing source (database down) must not break the whole collection
            pass
    return out


# ---------------------------------------------------------------------------------------------- Prometheus


class _PromCounter(Counter):
    __slots__ = ("_m", "_children")

    def __init__(self, m: Any) -> None:
        self._m = m
        self._children: dict[Labels, Any] = {}

    def inc(self, amount: float = 1.0, labels: Labels = ()) -> None:
        c = self._children.get(labels)
        if c is None:
            c = self._children[labels] = self._m.labels(*labels) if labels else self._m
        c.inc(amount)


class _PromGauge(Gauge):
    __slots__ = ("_m", "_children")

    def __init__(self, m: Any) -> None:
        self._m = m
        self._children: dict[Labels, Any] = {}

    def set(self, value: float, labels: Labels = ()) -> None:
        c = self._children.get(labels)
        if c is None:
            c = self._children[labels] = self._m.labels(*labels) if labels else self._m
        c.set(value)


class _PromHistogram(Histogram):
    __slots__ = ("_m", "_children")

    def __init__(self, m: Any) -> None:
        self._m = m
        self._children: dict[Labels, Any] = {}

    def observe(self, value: float, labels: Labels = ()) -> None:
        c = self._children.get(labels)
        if c is None:
            c = self._children[labels] = self._m.labels(*labels) if labels else self._m
        c.observe(value)


class PrometheusMetrics(Metrics):
    """``PrometheusMetrics(registry=None)``: instruments of ``prometheus_client`` (extra ``prometheus``) in
    ``registry`` (default: a new registry of its own, so that two caches or tests never collide; pass
    ``prometheus_client.REGISTRY`` to join the process's default one). :meth:`render` is what ``/metrics`` serves.
    Asking twice for the same name returns the same instrument."""

    enabled = True

    def __init__(self, registry: Any = None) -> None:
        try:
            import prometheus_client
        except ModuleNotFoundError:
            raise UsageError("PrometheusMetrics needs prometheus_client: pip install 'cachesync[prometheus]'") from None
        self._pc = prometheus_client
        self.registry = prometheus_client.CollectorRegistry() if registry is None else registry
        self._made: dict[str, Any] = {}
        self._observed: dict[str, tuple[str, str, tuple[str, ...], list[Callable[[], Iterable[Sample]]]]] = {}
        self._collector_registered = False

    def _get(self, name: str, make: Callable[[], Any]) -> Any:
        got = self._made.get(name)
        if got is None:
            got = self._made[name] = make()
        return got

    def counter(self, name: str, documentation: str, labelnames: Sequence[str] = ()) -> Counter:
        _check(name, "counter")
        c: Counter = self._get(name, lambda: _PromCounter(self._pc.Counter(
            name, documentation, tuple(labelnames), registry=self.registry)))
        return c

    def gauge(self, name: str, documentation: str, labelnames: Sequence[str] = ()) -> Gauge:
        _check(name, "gauge")
        g: Gauge = self._get(name, lambda: _PromGauge(self._pc.Gauge(
            name, documentation, tuple(labelnames), registry=self.registry)))
        return g

    def histogram(self, name: str, documentation: str, labelnames: Sequence[str] = (),
                  buckets: Sequence[float] = DEFAULT_BUCKETS) -> Histogram:
        _check(name, "histogram")
        h: Histogram = self._get(name, lambda: _PromHistogram(self._pc.Histogram(
            name, documentation, tuple(labelnames), registry=self.registry, buckets=tuple(buckets))))
        return h

    def observe(self, name: str, documentation: str, kind: str, labelnames: Sequence[str],
                callback: Callable[[], Iterable[Sample]]) -> None:
        super().observe(name, documentation, kind, labelnames, callback)
        _add_callback(self._made, self._observed, name, documentation, kind, labelnames, callback)
        if not self._collector_registered:
            self.registry.register(_Callbacks(self))
            self._collector_registered = True

    def render(self) -> bytes:
        out: bytes = self._pc.generate_latest(self.registry)
        return out


class _Callbacks:
    """A prometheus_client collector that reads the :meth:`Metrics.observe` callbacks at scrape time."""

    def __init__(self, m: PrometheusMetrics) -> None:
        self._m = m

    def describe(self) -> list[Any]:
        return []  # names are checked by PrometheusMetrics.observe; describing would call the callbacks

    def collect(self) -> Iterable[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        for name, (doc, kind, labelnames, cbs) in list(self._m._observed.items()):
            fam: Any
            if kind == "counter":
                fam = CounterMetricFamily(name.removesuffix("_total"), doc, labels=labelnames)
            else:
                fam = GaugeMetricFamily(name, doc, labels=labelnames)
            for labels, value in _read(cbs):
                fam.add_metric(list(labels), float(value))
            yield fam


# ---------------------------------------------------------------------------------------------- OpenTelemetry


def _otel_name(name: str) -> tuple[str, str]:
    unit = "s" if name.endswith("_seconds") else "1"
    return name.removesuffix("_total"), unit


class _OtelCounter(Counter):
    __slots__ = ("_i", "_names", "_attrs")

    def __init__(self, instrument: Any, labelnames: Sequence[str]) -> None:
        self._i, self._names = instrument, tuple(labelnames)
        self._attrs: dict[Labels, dict[str, str]] = {}

    def _a(self, labels: Labels) -> dict[str, str]:
        a = self._attrs.get(labels)
        if a is None:
            a = self._attrs[labels] = dict(zip(self._names, labels, strict=True))
        return a

    def inc(self, amount: float = 1.0, labels: Labels = ()) -> None:
        self._i.add(amount, self._a(labels))


class _OtelGauge(Gauge):
    """A synchronous gauge: the last value set per label set, reported by an observable gauge."""

    __slots__ = ("values", "_names")

    def __init__(self, labelnames: Sequence[str]) -> None:
        self._names = tuple(labelnames)
        self.values: dict[Labels, float] = {}

    def set(self, value: float, labels: Labels = ()) -> None:
        self.values[labels] = float(value)


class _OtelHistogram(Histogram):
    __slots__ = ("_c",)

    def __init__(self, instrument: Any, labelnames: Sequence[str]) -> None:
        self._c = _OtelCounter(instrument, labelnames)

    def observe(self, value: float, labels: Labels = ()) -> None:
        self._c._i.record(value, self._c._a(labels))


class OtelMetrics(Metrics):
    """``OtelMetrics(meter_provider=None)``: OpenTelemetry instruments (extra ``otel``: ``opentelemetry-api``) from
    the meter ``cachesync`` of ``meter_provider`` (default: the global one). Export is the provider's business (its
    readers and exporters); :meth:`render` returns nothing."""

    enabled = True

    def __init__(self, meter_provider: Any = None) -> None:
        try:
            from opentelemetry import metrics as otel_metrics
        except ModuleNotFoundError:
            raise UsageError("OtelMetrics needs opentelemetry-api: pip install 'cachesync[otel]'") from None
        self._otel = otel_metrics
        from . import __version__

        self.meter = (meter_provider.get_meter("cachesync", __version__) if meter_provider is not None
                      else otel_metrics.get_meter("cachesync", __version__))
        self._made: dict[str, Any] = {}
        self._observed: dict[str, tuple[str, str, tuple[str, ...], list[Callable[[], Iterable[Sample]]]]] = {}

    def counter(self, name: str, documentation: str, labelnames: Sequence[str] = ()) -> Counter:
        _check(name, "counter")
        if name not in self._made:
            n, unit = _otel_name(name)
            self._made[name] = _OtelCounter(self.meter.create_counter(n, unit=unit, description=documentation),
                                            labelnames)
        c: Counter = self._made[name]
        return c

    def gauge(self, name: str, documentation: str, labelnames: Sequence[str] = ()) -> Gauge:
        _check(name, "gauge")
        if name not in self._made:
            g = _OtelGauge(labelnames)
            names = tuple(labelnames)
            self._register_observable(name, documentation, "gauge", lambda: [
                (k, v) for k, v in list(g.values.items())], names)
            self._made[name] = g
        out: Gauge = self._made[name]
        return out

    def histogram(self, name: str, documentation: str, labelnames: Sequence[str] = (),
                  buckets: Sequence[float] = DEFAULT_BUCKETS) -> Histogram:
        _check(name, "histogram")
        if name not in self._made:
            n, unit = _otel_name(name)
            try:
                inst = self.meter.create_histogram(n, unit=unit, description=documentation,
                                                   explicit_bucket_boundaries_advisory=list(buckets))
            except TypeError:  # opentelemetry-api before 1.23
                inst = self.meter.create_histogram(n, unit=unit, description=documentation)
            self._made[name] = _OtelHistogram(inst, labelnames)
        h: Histogram = self._made[name]
        return h

    def observe(self, name: str, documentation: str, kind: str, labelnames: Sequence[str],
                callback: Callable[[], Iterable[Sample]]) -> None:
        super().observe(name, documentation, kind, labelnames, callback)
        if _add_callback(self._made, self._observed, name, documentation, kind, labelnames, callback):
            cbs = self._observed[name][3]
            self._register_observable(name, documentation, kind, lambda: _read(cbs), tuple(labelnames))

    def _register_observable(self, name: str, documentation: str, kind: str,
                             callback: Callable[[], Iterable[Sample]], labelnames: tuple[str, ...]) -> None:
        Observation = self._otel.Observation

        def cb(_options: Any) -> Iterable[Any]:
            try:
                samples = list(callback())
            except Exception:
                return []
            return [Observation(v, dict(zip(labelnames, k, strict=True))) for k, v in samples]

        n, unit = _otel_name(name)
        if kind == "counter":
            self.meter.create_observable_counter(n, callbacks=[cb], unit=unit, description=documentation)
        else:
            self.meter.create_observable_gauge(n, callbacks=[cb], unit=unit, description=documentation)
