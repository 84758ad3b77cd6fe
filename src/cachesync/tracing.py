"""OpenTelemetry tracing (optional extra ``otel``).

* A cache made with ``tracing=True`` records ``cachesync.get`` (attributes ``cachesync.outcome``,
  ``cachesync.lease_wait_seconds``, ``cachesync.load_seconds``), ``cachesync.invalidate``, ``cachesync.set`` and
  ``cachesync.write`` spans, and its invalidations carry the current span's W3C ``traceparent`` on the namespace
  channel (a last line ``tp=...``), so that an L1 of another process records ``cachesync.l1.drop`` under it.
* :meth:`cachesync.outbox.Outbox.record` stores the writer's ``traceparent`` in the row (column ``traceparent``,
  when the table has it); the relay's ``cachesync.relay.deliver`` span is its child (and links the other rows'
  writers), and carries its own context on to Redis (channel) and the bus (message field ``tp``; additive: older
  messages have none, older workers ignore it), where the worker's ``cachesync.worker.apply`` span is its child.

So one trace shows commit -> relay -> invalidation -> L1 drop in other processes.

Without ``opentelemetry-api`` every helper here is a no-op; with it but no tracer provider configured, the
API's own no-op tracer is used (spans cost a few µs per *batch*, never per cache read).
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from typing import Any

try:
    from opentelemetry import context as _context
    from opentelemetry import trace as _trace
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    _PROP: Any = TraceContextTextMapPropagator()
except ModuleNotFoundError:  # the extra is not installed
    _trace = None  # type: ignore[assignment]


AVAILABLE = _trace is not None
"""True when ``opentelemetry-api`` is installed."""


def _links(traceparents: Iterable[str]) -> list[Any]:
    out = []
    for tp in traceparents:
        sc = _trace.get_current_span(_PROP.extract({"traceparent": tp})).get_span_context()
        if sc.is_valid:
            out.append(_trace.Link(sc))
    return out


@contextlib.contextmanager
def span(name: str, attributes: Mapping[str, Any] | None = None, traceparent: str | None = None,
         links: Iterable[str] = ()) -> Iterator[Any]:
    """A span named ``name`` (child of ``traceparent`` when given, else of the current span; linked to the
    ``links`` traceparents); yields the span (None without OpenTelemetry)."""
    if _trace is None:
        yield None
        return
    ctx = _PROP.extract({"traceparent": traceparent}) if traceparent else None
    tracer = _trace.get_tracer("cachesync")
    with tracer.start_as_current_span(name, context=ctx, attributes=dict(attributes or {}),
                                      links=_links(links) or None) as s:
        yield s


def set_attribute(name: str, value: Any) -> None:
    """Set an attribute on the current span (nothing without OpenTelemetry or a recording span)."""
    if _trace is not None:
        _trace.get_current_span().set_attribute(name, value)


def outcome(entry: Any) -> str:
    """The ``cachesync.outcome`` of a read's :class:`~cachesync.Entry`: hit, negative, stale, miss or fallback."""
    if entry.source == "fallback":
        return "fallback"
    if entry.source == "loader":
        return "miss"
    if entry.stale:
        return "stale"
    return "hit" if entry.found else "negative"


def require() -> None:
    """Raise :class:`~cachesync.errors.ConfigError` unless ``opentelemetry-api`` is installed."""
    if _trace is None:
        from .errors import ConfigError

        raise ConfigError("tracing", "needs opentelemetry-api: pip install 'cachesync[otel]'")


def current_traceparent() -> str | None:
    """The W3C ``traceparent`` of the current span, or None (no OpenTelemetry, or no recording span)."""
    if _trace is None:
        return None
    carrier: dict[str, str] = {}
    _PROP.inject(carrier, context=_context.get_current())
    return carrier.get("traceparent")


def _get_span(cache: Any) -> Any:
    return _trace.get_tracer("cachesync").start_as_current_span(
        "cachesync.get", attributes={"cachesync.namespace": cache.options.namespace})


def traced_get(cache: Any, read: Callable[[], Any]) -> Any:
    """Run ``read()`` (a cache's get) in a ``cachesync.get`` span; sets ``cachesync.outcome`` (``error`` when it
    raised) and ``cachesync.l1`` (served by the L1). The driver adds ``cachesync.load_seconds`` and
    ``cachesync.lease_wait_seconds`` when the read loaded or waited."""
    with _get_span(cache) as s:
        try:
            entry = read()
        except BaseException:
            s.set_attribute("cachesync.outcome", "error")
            raise
        _done(s, entry)
        return entry


async def traced_get_async(cache: Any, read: Callable[[], Awaitable[Any]]) -> Any:
    """The asyncio twin of :func:`traced_get`."""
    with _get_span(cache) as s:
        try:
            entry = await read()
        except BaseException:
            s.set_attribute("cachesync.outcome", "error")
            raise
        _done(s, entry)
        return entry


def _done(s: Any, entry: Any) -> None:
    s.set_attribute("cachesync.outcome", outcome(entry))
    if entry.source == "l1":
        s.set_attribute("cachesync.l1", True)
