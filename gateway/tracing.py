"""Traces (OpenTelemetry): one span per request, a child span per stage, context carried to the engines.

Off unless ``OTEL_TRACES_EXPORTER`` names an exporter (``otlp``, ``console``, or both comma-separated;
``none`` or unset: off). Off, nothing of OpenTelemetry is imported and ``span`` is a null context
that costs next to nothing, so the Lambda bundle (which does not ship the SDK) runs without it.

On, ``setup`` builds the standard SDK once per process, after gunicorn's fork (``create_app``
calls it through ``install``), as the SDK documents its variables:

- ``Resource.create()``: ``OTEL_SERVICE_NAME`` (default here ``gateway``), ``OTEL_RESOURCE_ATTRIBUTES``;
- the sampler: ``OTEL_TRACES_SAMPLER`` / ``OTEL_TRACES_SAMPLER_ARG`` (the SDK's TracerProvider
  reads them; default parentbased_always_on, so a client's sampled ``traceparent`` is followed);
- a BatchSpanProcessor (``OTEL_BSP_*``) with the OTLP exporter of ``OTEL_EXPORTER_OTLP_TRACES_PROTOCOL``
  or ``OTEL_EXPORTER_OTLP_PROTOCOL``: ``http/protobuf`` (default) or ``grpc``; each exporter reads
  its ``OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT``, ``_HEADERS``, ``_TIMEOUT``, ``_COMPRESSION`` itself;
- the propagators of ``OTEL_PROPAGATORS`` (default W3C tracecontext and baggage).

Spans: a server span per HTTP request (``install``: a WSGI layer outside the upload guard, so the
body read is inside it; named ``POST /v1/models/{model}/classify``; the client's ``traceparent``
is its parent) or per V2 gRPC call (``rpc_span``); under it the stages gateway.service opens with
``span`` (queue wait, decode, preprocess, ``engine <backend>`` per attempt, failover included,
postprocess) and ``body read``. ``inject`` puts the current context into an engine call's HTTP
headers or gRPC metadata. Under the gevent front the BatchSpanProcessor's thread is a greenlet;
``shutdown`` (gunicorn's worker_exit, and at exit) exports what is still queued.
"""
from __future__ import annotations

import atexit
import contextlib
import contextvars
import logging
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

log = logging.getLogger("gateway")

_tracer: Any = None  # an opentelemetry Tracer once ``setup`` turned tracing on
_provider: Any = None  # its TracerProvider
_configured_pid: int | None = None  # the process ``setup`` ran in (once per process, after fork)
_otel: Any = None  # the opentelemetry modules the hot path needs (a namespace), once on
# the server span of the request being served (attributes the stages learn land on it too)
_request_span: contextvars.ContextVar[Any] = contextvars.ContextVar("gateway_request_span", default=None)

EXPORTERS = ("otlp", "console")
PROTOCOLS = ("http/protobuf", "grpc")
DEFAULT_SERVICE_NAME = "gateway"
ENVIRON_SPAN = "gateway.span"
ENVIRON_ID = "gateway.request_id"  # gateway.api.access.ENVIRON_ID (not imported: Flask stays out of here)
# attributes of an engine span that also describe the request (its server span)
PROMOTED = ("model", "route", "backend", "batch_size")
_RULE_PARAM = re.compile(r"<(?:[^<>:]+:)?([^<>]+)>")


def enabled() -> bool:
    return _tracer is not None


@contextlib.contextmanager
def _span(name: str, attributes: Mapping[str, Any] | None) -> Iterator[Any]:
    attributes = dict(attributes or {})
    if "batch_size" in attributes:  # an engine attempt: what it says about the request, on the request's span
        request_span = _request_span.get()
        if request_span is not None:
            request_span.set_attributes({k: attributes[k] for k in PROMOTED if k in attributes})
    with _tracer.start_as_current_span(name, attributes=attributes) as current:
        yield current


def span(name: str, **attributes: Any) -> contextlib.AbstractContextManager:
    """A child span of the current one named ``name`` (a no-op context when tracing is off)."""
    if _tracer is None:
        return contextlib.nullcontext()
    return _span(name, attributes)


def inject(headers: dict[str, str]) -> dict[str, str]:
    """``headers`` plus the current trace context (W3C traceparent) for an engine call."""
    if _tracer is not None:
        _otel.propagate.inject(headers)
    return headers


# -- set-up ----------------------------------------------------------------------------------
def _exporter_names() -> list[str]:
    names = [n.strip().lower() for n in os.environ.get("OTEL_TRACES_EXPORTER", "").split(",")]
    return [n for n in names if n and n != "none"]


def setup() -> bool:
    """Turn tracing on in this process when ``OTEL_TRACES_EXPORTER`` asks for it; whether it is on.
    Once per process: call it after fork (a BatchSpanProcessor's thread does not survive one)."""
    global _tracer, _provider, _configured_pid, _otel
    if _configured_pid == os.getpid():
        return enabled()
    _configured_pid = os.getpid()
    _tracer = _provider = None
    names = _exporter_names()
    if not names:
        return False
    unknown = [n for n in names if n not in EXPORTERS]
    if unknown:
        log.warning("OTEL_TRACES_EXPORTER: unknown exporter(s) %s ignored (known: %s)", unknown, ", ".join(EXPORTERS))
        names = [n for n in names if n in EXPORTERS]
        if not names:
            return False
    try:
        import opentelemetry.propagate
        import opentelemetry.trace
        from opentelemetry import context as otel_context
        from opentelemetry.sdk.resources import SERVICE_NAME, Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.trace import SpanKind, Status, StatusCode
    except ImportError as exc:
        log.warning("OTEL_TRACES_EXPORTER=%s but OpenTelemetry is not installed (%s): tracing stays off",
                    ",".join(names), exc)
        return False
    resource = Resource.create()
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):  # no OTEL_SERVICE_NAME
        resource = resource.merge(Resource({SERVICE_NAME: DEFAULT_SERVICE_NAME}))
    provider = TracerProvider(resource=resource, shutdown_on_exit=False)  # sampler: OTEL_TRACES_SAMPLER[_ARG]
    for name in names:
        provider.add_span_processor(BatchSpanProcessor(_exporter(name)))
    from gateway import __version__

    opentelemetry.trace.set_tracer_provider(provider)  # for any instrumented library; warns if set before
    _otel = _Modules(propagate=opentelemetry.propagate, trace=opentelemetry.trace, context=otel_context,
                     SpanKind=SpanKind, Status=Status, StatusCode=StatusCode)
    _provider = provider
    _tracer = provider.get_tracer("gateway", __version__)
    atexit.register(shutdown)
    log.info("tracing on: exporter %s, service %s", ",".join(names), resource.attributes.get(SERVICE_NAME))
    return True


class _Modules:
    def __init__(self, **modules: Any):
        self.__dict__.update(modules)


def _protocol() -> str:
    protocol = (os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
                or "http/protobuf").strip().lower()
    if protocol not in PROTOCOLS:
        log.warning("OTLP protocol %r is not supported here (%s): using http/protobuf", protocol, ", ".join(PROTOCOLS))
        return "http/protobuf"
    return protocol


def _exporter(name: str) -> Any:
    if name == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter()
    if _protocol() == "grpc":
        if _gevent_patched():  # before the exporter's channel: gRPC cooperative under the gevent front
            from grpc.experimental import gevent as grpc_gevent

            grpc_gevent.init_gevent()
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter

        return GrpcExporter()
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter

    return HttpExporter()


def _gevent_patched() -> bool:
    try:
        from gevent import monkey
    except ImportError:
        return False
    return bool(monkey.is_module_patched("socket"))


def shutdown() -> None:
    """Export the spans still queued and stop the exporters (a worker that exits; at exit)."""
    global _tracer, _provider
    provider, _tracer, _provider = _provider, None, None
    if provider is not None and _configured_pid == os.getpid():
        try:
            provider.shutdown()
        except Exception:  # exiting: a collector that is gone must not fail it
            log.warning("tracing: exporting the last spans failed", exc_info=True)


# -- server spans ----------------------------------------------------------------------------
def install(app) -> None:
    """Tracing for a Flask app (called by create_app): set up (once per process), and when on, a
    server span per request around the app's WSGI callable (add it after the upload guard,
    before the access log) and the hook that names it and says what the answer was."""
    if not setup():
        return
    from flask import Response, request

    app.wsgi_app = TracingMiddleware(app.wsgi_app)

    @app.after_request
    def describe_span(response: Response) -> Response:
        current = request.environ.get(ENVIRON_SPAN)
        if current is None or not current.is_recording():
            return response
        if request.url_rule is not None:
            route = http_route(request.url_rule.rule, request.view_args or {})
            current.update_name(f"{request.method} {route}")
            current.set_attribute("http.route", route)
        from gateway.api import access  # after its own hook (registered later, runs first): its fields

        fields = request.environ.get(access.ENVIRON_FIELDS) or access.about(response)
        current.set_attributes({k: v for k, v in fields.items() if v is not None})
        return response


def http_route(rule: str, view_args: Mapping[str, Any]) -> str:
    """A Flask rule as a span name's route: ``/v1/models/<model>/<verb>`` -> ``/v1/models/{model}/classify``
    (the verb, one of a few, is spelled out; names and versions stay templates)."""
    def name(match: re.Match) -> str:
        param = match.group(1)
        return str(view_args[param]) if param == "verb" and param in view_args else "{" + param + "}"
    return _RULE_PARAM.sub(name, rule)


class TracingMiddleware:
    """WSGI: the request's server span, its parent the client's ``traceparent`` (W3C TraceContext,
    or whatever OTEL_PROPAGATORS says); ended when the answer's body has been sent."""

    def __init__(self, app: Callable):
        self.app = app
        # the propagators' headers as WSGI names them (traceparent -> HTTP_TRACEPARENT)
        self.fields = {f: "HTTP_" + f.upper().replace("-", "_") for f in _otel.propagate.get_global_textmap().fields}

    def __call__(self, environ: dict, start_response: Callable) -> Iterable[bytes]:
        carrier = {f: environ[key] for f, key in self.fields.items() if key in environ}
        parent = _otel.propagate.extract(carrier) if carrier else None
        method = environ.get("REQUEST_METHOD", "GET")
        attributes = {"http.request.method": method, "url.path": environ.get("PATH_INFO", "")}
        if environ.get(ENVIRON_ID):  # the access log's layer, outside this one, gave the request its id
            attributes["request_id"] = environ[ENVIRON_ID]
        current = _tracer.start_span(method, context=parent, kind=_otel.SpanKind.SERVER, attributes=attributes)
        environ[ENVIRON_SPAN] = current
        status: list[str] = []

        def respond(status_line: str, headers: list, exc_info=None):
            status[:] = [status_line]
            return start_response(status_line, headers, exc_info) if exc_info else start_response(status_line, headers)

        token = _otel.context.attach(_otel.trace.set_span_in_context(current, parent))
        marked = _request_span.set(current)
        try:
            body = self.app(environ, respond)
        except BaseException as exc:
            current.record_exception(exc)
            _finish(current, environ, "500", 0)
            raise
        finally:
            _request_span.reset(marked)
            _otel.context.detach(token)
        from gateway.api.access import CountedBody  # one body counter for the access log and the span

        return CountedBody(body, lambda sent: _finish(current, environ, status[0] if status else "500", sent))


def _finish(current: Any, environ: dict, status: str, sent: int) -> None:
    code = int(status[:3]) if status[:3].isdigit() else 500
    length = environ.get("CONTENT_LENGTH") or ""  # the upload guard's count once it read the body
    current.set_attributes({"http.response.status_code": code, "http.response.body.size": sent,
                            "http.request.body.size": int(length) if length.isdigit() else 0})
    if code >= 500:
        current.set_status(_otel.Status(_otel.StatusCode.ERROR))
    current.end()


@contextlib.contextmanager
def _rpc_span(method: str, metadata: Mapping[str, Any]) -> Iterator[Any]:
    carrier = {k: v for k, v in metadata.items() if isinstance(v, str)}
    parent = _otel.propagate.extract(carrier) if carrier else None
    attributes = {"rpc.system": "grpc", "rpc.service": "inference.GRPCInferenceService", "rpc.method": method}
    if isinstance(metadata.get("x-request-id"), str):
        attributes["request_id"] = metadata["x-request-id"]
    with _tracer.start_as_current_span(f"inference.GRPCInferenceService/{method}", context=parent,
                                       kind=_otel.SpanKind.SERVER, attributes=attributes) as current:
        marked = _request_span.set(current)
        try:
            yield current
        finally:
            _request_span.reset(marked)


def rpc_span(method: str, metadata: Mapping[str, Any]) -> contextlib.AbstractContextManager:
    """The server span of one V2 gRPC call, its parent the ``traceparent`` in the call's metadata
    (a no-op context when tracing is off)."""
    if _tracer is None:
        return contextlib.nullcontext()
    return _rpc_span(method, metadata)
