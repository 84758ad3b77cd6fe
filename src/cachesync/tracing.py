"""OpenTelemetry tracing (optional extra ``otel``): spans for the relay's deliveries and the worker's applies,
with the W3C ``traceparent`` of the delivering span carried in each bus message (field ``tp``; additive: older
messages have none, older workers ignore it), so that one trace shows relay -> worker across processes.

Without ``opentelemetry-api`` every helper here is a no-op; with it but no tracer provider configured, the
API's own no-op tracer is used (spans cost a few µs per *batch*, never per cache read).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

try:
    from opentelemetry import context as _context
    from opentelemetry import trace as _trace
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    _PROP: Any = TraceContextTextMapPropagator()
except ModuleNotFoundError:  # the extra is not installed
    _trace = None  # type: ignore[assignment]


@contextlib.contextmanager
def span(name: str, attributes: Mapping[str, Any] | None = None, traceparent: str | None = None) -> Iterator[Any]:
    """A span named ``name`` (child of ``traceparent`` when given, else of the current span); yields the span
    (None without OpenTelemetry)."""
    if _trace is None:
        yield None
        return
    ctx = _PROP.extract({"traceparent": traceparent}) if traceparent else None
    tracer = _trace.get_tracer("cachesync")
    with tracer.start_as_current_span(name, context=ctx, attributes=dict(attributes or {})) as s:
        yield s


def current_traceparent() -> str | None:
    """The W3C ``traceparent`` of the current span, or None (no OpenTelemetry, or no recording span)."""
    if _trace is None:
        return None
    carrier: dict[str, str] = {}
    _PROP.inject(carrier, context=_context.get_current())
    return carrier.get("traceparent")
