"""Traces (gateway/tracing.py): a client's trace followed through a real `gateway serve` into a
real Triton that traces in OpenTelemetry mode, both exporting to an OTLP receiver run here.

The receiver is an HTTP server on loopback taking ``POST /v1/traces`` and decoding each body with
the OpenTelemetry protocol's own definitions (``ExportTraceServiceRequest``, opentelemetry-proto):
protobuf from the gateway's Python exporter, OTLP/JSON from Triton's C++ exporter (its only form).
Tracing off: no span leaves the gateway and nothing of OpenTelemetry is imported.
"""
from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient
from google.protobuf import json_format
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from gateway.config import parse_config
from gateway.ops.servers import triton as launcher
from gateway.tools.local_gateway import LocalGateway, free_port

from conftest import ROOT, RUN_DIR, free_port_block, load_yaml_config, write_config

MODEL = "efficientnet_lite0"
CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"  # the W3C spec's example ids: the client's trace
CLIENT_SPAN = "00f067aa0ba902b7"
TRACEPARENT = f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"
STAGES = {"body read", "queue wait", "decode", "preprocess", "engine triton", "postprocess"}


@dataclass
class Span:
    service: str
    trace_id: str
    span_id: str
    parent_id: str
    name: str
    kind: int
    status: int
    attributes: dict[str, Any] = field(default_factory=dict)


def _value(any_value) -> Any:
    kind = any_value.WhichOneof("value")
    return getattr(any_value, kind) if kind else None


def _hex_ids_to_base64(node: Any) -> Any:
    """OTLP/JSON writes trace and span ids as hex, protobuf's JSON mapping reads bytes as base64."""
    if isinstance(node, dict):
        return {k: (base64.b64encode(bytes.fromhex(v)).decode() if k in ("traceId", "spanId", "parentSpanId")
                    and isinstance(v, str) else _hex_ids_to_base64(v)) for k, v in node.items()}
    if isinstance(node, list):
        return [_hex_ids_to_base64(v) for v in node]
    return node


class OtlpReceiver:
    """An OTLP/HTTP trace receiver on loopback: every span it was sent, decoded."""

    def __init__(self):
        self.spans: list[Span] = []
        self.bodies: list[str] = []  # content types of the exports received
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.path != "/v1/traces":
                    self.send_error(404)
                    return
                kind = (self.headers.get("Content-Type") or "").split(";")[0].strip()
                if kind == "application/json":
                    message = json_format.ParseDict(_hex_ids_to_base64(json.loads(body)), ExportTraceServiceRequest())
                else:
                    message = ExportTraceServiceRequest.FromString(body)
                receiver.add(kind, message)
                answer = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def add(self, kind: str, message: ExportTraceServiceRequest) -> None:
        with self.lock:
            self.bodies.append(kind)
            for resource_spans in message.resource_spans:
                resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
                for scope_spans in resource_spans.scope_spans:
                    for s in scope_spans.spans:
                        self.spans.append(Span(resource.get("service.name", ""), s.trace_id.hex(), s.span_id.hex(),
                                               s.parent_span_id.hex(), s.name, s.kind, s.status.code,
                                               {a.key: _value(a.value) for a in s.attributes}))

    def trace(self, trace_id: str) -> list[Span]:
        with self.lock:
            return [s for s in self.spans if s.trace_id == trace_id]

    def wait(self, trace_id: str, done, timeout: float = 30.0) -> list[Span]:
        """The trace's spans once ``done(spans)`` holds (or what came within ``timeout``)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            spans = self.trace(trace_id)
            if done(spans):
                return spans
            time.sleep(0.1)
        return self.trace(trace_id)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def receiver():
    r = OtlpReceiver()
    yield r
    r.close()


def otel_env(receiver: OtlpReceiver, exporter: str = "otlp") -> dict[str, str]:
    return {"OTEL_TRACES_EXPORTER": exporter, "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url,
            "OTEL_BSP_SCHEDULE_DELAY": "100", "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}


@pytest.fixture(scope="module")
def traced_triton(tmp_path_factory, receiver):
    """A real tritonserver of its own (free ports, efficientnet_lite0 only) tracing every request in
    OpenTelemetry mode to the receiver: (config dict for a gateway in front of it, Triton's version)."""
    tmp = tmp_path_factory.mktemp("traced-triton")
    base = free_port_block(3)
    (tmp / "model_repository").mkdir()
    (tmp / "model_repository" / MODEL).symlink_to(ROOT / "model_repository" / MODEL)
    data = load_yaml_config()
    data["server"]["artifacts"] = str(ROOT / "artifacts.json")
    data["backends"] = {
        "embedded": {**data["backends"]["embedded"], "model_dir": str(ROOT / "onnx")},
        "triton": {**data["backends"]["triton"], "url": f"http://127.0.0.1:{base}"},
        # nothing listens there: the first route fails over to Triton
        "gone": {**data["backends"]["triton"], "url": f"http://127.0.0.1:{free_port()}", "connect_timeout_s": 1},
    }
    data["models"] = {MODEL: {**data["models"][MODEL], "routes": [
        {"backend": "gone", "backend_model": MODEL}, {"backend": "triton", "backend_model": MODEL},
        {"backend": "embedded"}]}}
    config = parse_config(data, tmp)
    launcher.start(config, timeout=300, extra_args=[
        "--trace-config", "mode=opentelemetry", "--trace-config", f"opentelemetry,url={receiver.url}/v1/traces",
        "--trace-config", "rate=1", "--trace-config", "level=TIMESTAMPS",
        "--trace-config", "opentelemetry,resource=service.name=triton",
        "--trace-config", "opentelemetry,bsp_schedule_delay=100"])
    try:
        version = requests.get(f"http://127.0.0.1:{base}/v2", timeout=10).json()["version"]
        yield data, version
    finally:
        launcher.stop(config)
        assert not launcher.status(config)["running"]


@pytest.fixture(scope="module")
def traced_gateway(traced_triton, receiver):
    """A real `gateway serve` (gevent front, 1 worker, V2 gRPC on) in front of it, tracing to the receiver."""
    data, _ = traced_triton
    path = write_config(data)
    grpc_port = free_port()
    proc = LocalGateway(path, workers=1, log_path=RUN_DIR / f"gateway-{path.stem}.log", grpc_port=grpc_port,
                        env=otel_env(receiver))
    try:
        yield proc, grpc_port
    finally:
        proc.stop()
        path.unlink(missing_ok=True)


def children(spans: list[Span], parent: Span) -> list[Span]:
    return [s for s in spans if s.parent_id == parent.span_id]


def test_one_classify_request_is_one_trace_from_the_client_through_the_gateway_into_triton(
        traced_gateway, traced_triton, receiver, chelsea_jpeg):
    proc, _ = traced_gateway
    resp = requests.post(f"{proc.url}/v1/models/{MODEL}/classify?route=triton", data=chelsea_jpeg, timeout=60,
                         headers={"Content-Type": "image/jpeg", "traceparent": TRACEPARENT,
                                  "X-Request-Id": "trace-test-1"})
    assert resp.status_code == 200, resp.text
    assert resp.json()["backend"] == "triton"

    def complete(spans: list[Span]) -> bool:
        names = {s.name for s in spans}
        return names >= {"InferRequest", "POST /v1/models/{model}/classify", *STAGES}
    spans = receiver.wait(CLIENT_TRACE, complete)
    names = sorted((s.service, s.name) for s in spans)
    assert complete(spans), names

    # the gateway's server span: a child of the client's span, named by its route template
    server = next(s for s in spans if s.service == "gateway" and s.parent_id == CLIENT_SPAN)
    assert server.name == "POST /v1/models/{model}/classify" and server.kind == 2  # SPAN_KIND_SERVER
    attrs = server.attributes
    assert (attrs["model"], attrs["route"], attrs["backend"], attrs["batch_size"]) == (MODEL, "triton", "triton", 1)
    assert attrs["http.response.status_code"] == 200 and attrs["http.route"] == "/v1/models/{model}/classify"
    assert attrs["http.request.body.size"] == len(chelsea_jpeg)
    assert attrs["http.response.body.size"] == len(resp.content)
    assert attrs["request_id"] == "trace-test-1"

    # each stage a child of it; the engine span the parent of what the engine did
    stages = {s.name: s for s in children(spans, server)}
    assert STAGES - {"postprocess"} <= set(stages), sorted(stages)
    engine = stages["engine triton"]
    assert engine.attributes["backend"] == "triton" and engine.attributes["batch_size"] == 1
    assert "postprocess" in {s.name for s in children(spans, engine)}  # an engine's answer, read in its span

    # Triton's spans: the same trace, its request span a child of the gateway's engine span
    triton = [s for s in spans if s.service == "triton"]
    request = next(s for s in triton if s.name == "InferRequest")
    assert request.parent_id == engine.span_id
    model_span = next(s for s in triton if s.name == MODEL)
    assert model_span.parent_id == request.span_id and model_span.attributes["triton.model_name"] == MODEL
    assert "compute" in {s.name for s in children(triton, model_span)}
    assert "application/x-protobuf" in receiver.bodies and "application/json" in receiver.bodies


def test_failover_attempts_are_spans_of_their_own(traced_gateway, receiver, chelsea_jpeg):
    """The first route's engine is down: its attempt is an error span, Triton's the next one."""
    proc, _ = traced_gateway
    trace_id, span_id = "5bf92f3577b34da6a3ce929d0e0e4737", "10f067aa0ba902b8"
    resp = requests.post(f"{proc.url}/v1/models/{MODEL}/classify", data=chelsea_jpeg, timeout=60,
                         headers={"Content-Type": "image/jpeg", "traceparent": f"00-{trace_id}-{span_id}-01"})
    assert resp.status_code == 200 and resp.json()["backend"] == "triton", resp.text
    spans = receiver.wait(trace_id, lambda spans: {"engine gone", "engine triton", "InferRequest"}
                          <= {s.name for s in spans})
    server = next(s for s in spans if s.parent_id == span_id)
    attempts = [s for s in children(spans, server) if s.name.startswith("engine ")]
    assert [s.name for s in attempts] == ["engine gone", "engine triton"], [s.name for s in attempts]
    assert attempts[0].status == 2 and attempts[1].status != 2  # STATUS_CODE_ERROR, then not
    assert server.attributes["backend"] == "triton" and server.attributes["route"] == "triton"
    request = next(s for s in spans if s.name == "InferRequest")
    assert request.parent_id == attempts[1].span_id


def test_v2_grpc_call_carries_the_clients_traceparent(traced_gateway, receiver):
    proc, grpc_port = traced_gateway
    trace_id, span_id = "6bf92f3577b34da6a3ce929d0e0e4738", "20f067aa0ba902b9"
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}")
    tensor = grpcclient.InferInput("input", [1, 3, 224, 224], "FP32")
    tensor.set_data_from_numpy(np.zeros((1, 3, 224, 224), np.float32))
    answer = client.infer(MODEL, [tensor], model_version="triton",
                          headers={"traceparent": f"00-{trace_id}-{span_id}-01"})
    assert answer.get_response().model_version == "triton"
    spans = receiver.wait(trace_id, lambda spans: {"engine triton", "InferRequest"} <= {s.name for s in spans})
    server = next(s for s in spans if s.parent_id == span_id)
    assert server.name == "inference.GRPCInferenceService/ModelInfer" and server.kind == 2
    assert server.attributes["route"] == "triton" and server.attributes["batch_size"] == 1
    engine = next(s for s in children(spans, server) if s.name == "engine triton")
    assert next(s for s in spans if s.name == "InferRequest").parent_id == engine.span_id


def test_spans_still_queued_are_exported_when_a_worker_exits(receiver, chelsea_jpeg):
    """Under the gevent front the batch processor's thread is a greenlet: with an export every
    minute, the spans of a request answered just before a stop arrive anyway (gunicorn's
    worker_exit flushes them)."""
    trace_id = "8bf92f3577b34da6a3ce929d0e0e473a"
    path = write_config(load_yaml_config())
    proc = LocalGateway(path, workers=1, log_path=RUN_DIR / f"gateway-{path.stem}.log",
                        env={**otel_env(receiver), "OTEL_BSP_SCHEDULE_DELAY": "60000"})
    try:
        resp = requests.post(f"{proc.url}/v1/models/{MODEL}/classify?route=embedded", data=chelsea_jpeg, timeout=60,
                             headers={"Content-Type": "image/jpeg", "traceparent": f"00-{trace_id}-{'2' * 16}-01"})
        assert resp.status_code == 200
        time.sleep(0.5)
        assert receiver.trace(trace_id) == []  # still queued
    finally:
        proc.stop()
        path.unlink(missing_ok=True)
    spans = receiver.wait(trace_id, lambda spans: len(spans) >= 4, timeout=5)
    names = {s.name for s in spans}
    assert {"POST /v1/models/{model}/classify", "queue wait", "decode", "engine embedded"} <= names, names
    server = next(s for s in spans if s.kind == 2)
    assert server.attributes["backend"] == "embedded" and server.attributes["batch_size"] == 1


def test_otlp_over_grpc_from_the_gevent_front(receiver, chelsea_jpeg):
    """OTEL_EXPORTER_OTLP_PROTOCOL=grpc: the SDK's gRPC exporter, made cooperative under gevent, to an
    OTLP gRPC receiver (the protocol's TraceService)."""
    from concurrent.futures import ThreadPoolExecutor

    import grpc
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc

    class TraceService(trace_service_pb2_grpc.TraceServiceServicer):
        def Export(self, request, context):
            receiver.add("grpc", request)
            return ExportTraceServiceResponse()

    server = grpc.server(ThreadPoolExecutor(2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(TraceService(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    trace_id = "9bf92f3577b34da6a3ce929d0e0e473b"
    path = write_config(load_yaml_config())
    try:
        proc = LocalGateway(path, workers=1, log_path=RUN_DIR / f"gateway-{path.stem}.log",
                            env={**otel_env(receiver), "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
                                 "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}"})
        try:
            resp = requests.post(f"{proc.url}/v1/models/{MODEL}/classify?route=embedded", data=chelsea_jpeg,
                                 timeout=60, headers={"Content-Type": "image/jpeg",
                                                      "traceparent": f"00-{trace_id}-{'3' * 16}-01"})
            assert resp.status_code == 200
            spans = receiver.wait(trace_id, lambda spans: "engine embedded" in {s.name for s in spans})
            assert {"POST /v1/models/{model}/classify", "engine embedded"} <= {s.name for s in spans}, spans
            assert "grpc" in receiver.bodies
        finally:
            proc.stop()
            path.unlink(missing_ok=True)
    finally:
        server.stop(0)


def test_tracing_off_sends_no_span(receiver, chelsea_jpeg):
    """OTEL_TRACES_EXPORTER=none: the exporter's endpoint set, a client's traceparent sent, and nothing arrives."""
    trace_id = "7bf92f3577b34da6a3ce929d0e0e4739"
    path = write_config(load_yaml_config())
    proc = LocalGateway(path, workers=1, log_path=RUN_DIR / f"gateway-{path.stem}.log",
                        env=otel_env(receiver, exporter="none"))
    try:
        for _ in range(3):
            resp = requests.post(f"{proc.url}/v1/models/{MODEL}/classify", data=chelsea_jpeg, timeout=60,
                                 headers={"Content-Type": "image/jpeg", "traceparent": f"00-{trace_id}-{'1' * 16}-01"})
            assert resp.status_code == 200
            assert "traceparent" not in resp.headers
    finally:
        proc.stop()  # a worker exits: anything queued would be exported now
        path.unlink(missing_ok=True)
    time.sleep(0.5)
    assert receiver.trace(trace_id) == []


OFF_CHECK = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, "tests")
    from conftest import config_of
    from gateway import tracing
    from gateway.app import create_app
    app = create_app(config_of())
    with open(sys.argv[1], "rb") as f:
        photo = f.read()
    resp = app.test_client().post("/v1/models/efficientnet_lite0/classify", data=photo,
                                  headers={"Content-Type": "image/jpeg", "traceparent": sys.argv[2]})
    print(json.dumps({"status": resp.status_code, "enabled": tracing.enabled(),
                      "span": type(tracing.span("decode")).__name__,
                      "otel": sorted(m for m in sys.modules if m.startswith("opentelemetry"))}))
""")


@pytest.mark.parametrize("exporter", [None, "none"])
def test_tracing_off_imports_nothing_of_opentelemetry(exporter, tmp_path, chelsea_jpeg):
    """In a fresh process (this one imported the receiver's protobufs): the app built and a request
    served with tracing off leave OpenTelemetry unimported, as the Lambda bundle needs."""
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(chelsea_jpeg)
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    if exporter is not None:
        env["OTEL_TRACES_EXPORTER"] = exporter
    out = subprocess.run([sys.executable, "-c", OFF_CHECK, str(photo), TRACEPARENT], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == {"status": 200, "enabled": False, "span": "nullcontext", "otel": []}


SETUP_CHECK = textwrap.dedent("""
    import json
    from gateway import tracing
    assert tracing.setup()
    provider = tracing._provider
    exporter = provider._active_span_processor._span_processors[0].span_exporter
    print(json.dumps({"service": provider.resource.attributes["service.name"],
                      "env": provider.resource.attributes.get("deployment.environment"),
                      "sampler": provider.sampler.get_description(),
                      "exporter": type(exporter).__module__}))
    tracing.shutdown()
""")


@pytest.mark.parametrize("env, expected", [
    ({}, {"service": "gateway", "sampler": "ParentBased{root:AlwaysOnSampler,remoteParentSampled:AlwaysOnSampler,"
          "remoteParentNotSampled:AlwaysOffSampler,localParentSampled:AlwaysOnSampler,"
          "localParentNotSampled:AlwaysOffSampler}", "exporter": "opentelemetry.exporter.otlp.proto.http"}),
    ({"OTEL_SERVICE_NAME": "edge", "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment=test",
      "OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.25",
      "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"},
     {"service": "edge", "env": "test", "sampler": "TraceIdRatioBased{0.25}",
      "exporter": "opentelemetry.exporter.otlp.proto.grpc"}),
    ({"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf"},
     {"service": "gateway", "exporter": "opentelemetry.exporter.otlp.proto.http"}),
])
def test_setup_follows_the_sdks_variables(env, expected):
    base = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    out = subprocess.run([sys.executable, "-c", SETUP_CHECK], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**base, "OTEL_TRACES_EXPORTER": "otlp",
                              "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9", **env})
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert {k: got.get(k) for k in expected if k != "exporter"} == {k: v for k, v in expected.items()
                                                                    if k != "exporter"}, got
    assert got["exporter"].startswith(expected["exporter"]), got
