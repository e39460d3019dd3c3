"""Request ids and the access log (gateway/api/access.py): X-Request-Id on every answer, in v1
error bodies and in the V2 gRPC front's trailing metadata; one access log line per answer from a
real `gateway serve`, with no image bytes and no API keys in it."""
from __future__ import annotations

import base64
import json
import re
import time

import grpc
import orjson
import pytest
import requests
from tritonclient.grpc import service_pb2, service_pb2_grpc

from gateway.api import access
from gateway.config import ConfigError, parse_config
from gateway.tools.local_gateway import free_port
from gateway.v2.tensors import join_bytes

from conftest import ROOT, RUN_DIR, load_yaml_config, write_config
from helpers import assert_error, classify

MODEL = "efficientnet_lite0"
HEX_ID = re.compile(r"[0-9a-f]{32}")
FIELDS = {"time", "id", "method", "path", "model", "route", "backend", "status", "latency_ms", "bytes_in",
          "bytes_out"}
KEY = "k3y-that-must-never-be-logged-7f3a9c"


def small_config(**server) -> dict:
    """gateway.yaml with one model on the embedded engine and a Triton route to a closed port."""
    config = load_yaml_config()
    config["server"].update(server)
    config["backends"] = {"embedded": config["backends"]["embedded"],
                          "triton": {**config["backends"]["triton"], "url": f"http://127.0.0.1:{free_port()}",
                                     "connect_timeout_s": 1}}
    model = config["models"][MODEL]
    model["routes"] = [r for r in model["routes"] if r["backend"] == "embedded" or r.get("name") is None
                       and r["backend"] == "triton"]
    config["models"] = {MODEL: model}
    return config


def v2_image_body(photo: bytes, request_id: str) -> tuple[bytes, dict]:
    """A V2 infer request for M_image: the JSON header (with the protocol's ``id``), then the photo."""
    blob = join_bytes([photo])
    header = orjson.dumps({"id": request_id, "inputs": [{"name": "image", "datatype": "BYTES", "shape": [1, 1],
                                                         "parameters": {"binary_data_size": len(blob)}}]})
    return header + blob, {"Inference-Header-Content-Length": str(len(header))}


@pytest.fixture(scope="module")
def small_api(make_api):
    return make_api(small_config(max_body_bytes=200_000))


# -- ids on answers ------------------------------------------------------------------------------
def test_request_id_echoed_or_generated_on_success(small_api, chelsea_jpeg):
    sent = small_api.post("/v1/classify", data=chelsea_jpeg, headers={"Content-Type": "image/jpeg",
                                                                       "X-Request-Id": "client-id.42:a/b"})
    assert sent.status_code == 200 and sent.headers["X-Request-Id"] == "client-id.42:a/b"
    fresh = classify(small_api, chelsea_jpeg)
    assert fresh.status_code == 200 and HEX_ID.fullmatch(fresh.headers["X-Request-Id"])
    assert classify(small_api, chelsea_jpeg).headers["X-Request-Id"] != fresh.headers["X-Request-Id"]
    for insane in ("x" * 129, "has space", "tab\tin", "é-not-ascii", ""):
        answer = small_api.get("/healthz", headers={"X-Request-Id": insane})
        assert HEX_ID.fullmatch(answer.headers["X-Request-Id"]), insane
    assert small_api.get("/healthz", headers={"X-Request-Id": "x" * 128}).headers["X-Request-Id"] == "x" * 128


@pytest.mark.parametrize("case", ["invalid_image", "unknown_path", "unknown_model", "too_large", "method"])
def test_request_id_on_4xx_answers_and_in_their_bodies(small_api, case):
    calls = {
        "invalid_image": lambda h: small_api.post("/v1/classify", data=b"not an image", headers=h),
        "unknown_path": lambda h: small_api.get("/nowhere", headers=h),
        "unknown_model": lambda h: small_api.post("/v1/models/nope/classify", data=b"x", headers=h),
        "too_large": lambda h: small_api.post("/v1/classify", data=b"\0" * 300_000, headers=h),
        "method": lambda h: small_api.get("/v1/classify", headers=h),
    }
    status = {"invalid_image": 400, "unknown_path": 404, "unknown_model": 404, "too_large": 413, "method": 405}[case]
    for sent in ("req-" + case, None):
        headers = {"Content-Type": "application/octet-stream", **({"X-Request-Id": sent} if sent else {})}
        answer = calls[case](headers)
        error = assert_error(answer, status)
        assert error["request_id"] == answer.headers["X-Request-Id"]
        assert answer.headers["X-Request-Id"] == sent if sent else HEX_ID.fullmatch(error["request_id"])


def test_request_id_on_401(make_api):
    api = make_api(small_config(api_keys=[KEY]))
    answer = api.get("/v1/models", headers={"X-Request-Id": "who-am-i"})
    assert assert_error(answer, 401, "missing_api_key")["request_id"] == "who-am-i"
    assert answer.headers["X-Request-Id"] == "who-am-i"
    assert api.get("/healthz").headers["X-Request-Id"]  # open paths too


def test_request_id_on_5xx_with_the_backend(small_api, chelsea_jpeg):
    answer = small_api.post("/v1/classify", data=chelsea_jpeg, params={"route": "triton"},
                            headers={"Content-Type": "image/jpeg", "X-Request-Id": "five-oh-three"})
    error = assert_error(answer, 503, "backend_unavailable")
    assert error["backend"] == "triton" and error["request_id"] == "five-oh-three"
    assert answer.headers["X-Request-Id"] == "five-oh-three"


def test_request_id_on_v2_metrics_health_and_pages(small_api, chelsea_jpeg):
    body, headers = v2_image_body(chelsea_jpeg, "v2-own-id")
    answer = small_api.post(f"/v2/models/{MODEL}_image/infer", data=body,
                            headers={**headers, "X-Request-Id": "v2-header-id"})
    assert answer.status_code == 200, answer.text
    assert answer.json()["id"] == "v2-own-id"  # the protocol's id, echoed in the body
    assert answer.headers["X-Request-Id"] == "v2-header-id"
    missing = small_api.get("/v2/models/nope", headers={"X-Request-Id": "v2-404"})
    assert missing.status_code == 404 and missing.headers["X-Request-Id"] == "v2-404"
    assert set(missing.json()) == {"error"} and isinstance(missing.json()["error"], str)  # V2's error body as is
    for path in ("/metrics", "/healthz", "/readyz", "/v2/health/live", "/openapi.json", "/v1/models"):
        assert HEX_ID.fullmatch(small_api.get(path).headers["X-Request-Id"]), path


def test_openapi_error_schema_names_request_id(small_api):
    schema = small_api.get("/openapi.json").json()["components"]["schemas"]["Error"]
    assert schema["properties"]["error"]["properties"]["request_id"]["type"] == "string"


def test_grpc_returns_the_request_id_in_trailing_metadata(small_api):
    from gateway.v2 import grpc_server

    port = free_port()
    server = grpc_server.start(small_api.app.extensions["v2"], f"127.0.0.1:{port}")
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            _, call = stub.ServerLive.with_call(service_pb2.ServerLiveRequest(), metadata=[("x-request-id", "g-1")])
            assert dict(call.trailing_metadata())["x-request-id"] == "g-1"
            _, call = stub.ServerLive.with_call(service_pb2.ServerLiveRequest())
            assert HEX_ID.fullmatch(dict(call.trailing_metadata())["x-request-id"])
            with pytest.raises(grpc.RpcError) as failed:
                stub.ModelMetadata(service_pb2.ModelMetadataRequest(name="nope"), metadata=[("x-request-id", "g-2")])
            assert failed.value.code() == grpc.StatusCode.NOT_FOUND
            assert dict(failed.value.trailing_metadata())["x-request-id"] == "g-2"
    finally:
        server.stop(0)


# -- the access log's settings and forms -----------------------------------------------------------
def test_access_log_setting_is_validated():
    config = small_config()
    assert parse_config(config, ROOT).server.access_log == "json"
    config["server"]["access_log"] = "yaml"
    with pytest.raises(ConfigError, match=r"server.access_log: expected 'json', 'text' or 'off', got 'yaml'"):
        parse_config(config, ROOT)


def test_text_and_off_forms(make_api, chelsea_jpeg, capsys):
    text = make_api(small_config(access_log="text"))
    capsys.readouterr()
    assert text.post("/v1/classify", data=chelsea_jpeg, headers={"Content-Type": "image/jpeg",
                                                                  "X-Request-Id": "txt-1"}).status_code == 200
    logged = [line for line in capsys.readouterr().err.splitlines() if " txt-1 " in line]
    assert len(logged) == 1, logged
    assert re.fullmatch(r'\S+Z txt-1 "POST /v1/classify" 200 [\d.]+ms model=efficientnet_lite0 route=embedded '
                        rf'backend=embedded bytes_in={len(chelsea_jpeg)} bytes_out=\d+', logged[0]), logged[0]
    off = make_api(small_config(access_log="off"))
    answer = off.get("/healthz", headers={"X-Request-Id": "quiet-1"})
    assert answer.headers["X-Request-Id"] == "quiet-1" and "quiet-1" not in capsys.readouterr().err


def test_text_form_quotes_what_could_forge_a_line():
    fields = {"time": "T", "id": "i", "method": "GET", "path": '/a "b"\nFAKE 200', "model": "m x", "route": None,
              "backend": None, "status": 404, "latency_ms": 1.0, "bytes_in": 0, "bytes_out": 3}
    text = access.line(fields, "text")
    assert "\n" not in text and '"GET /a \\"b\\"\\nFAKE 200"' in text and 'model="m x" route=-' in text
    assert json.loads(access.line(fields, "json")) == fields


# -- the real server's log -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def served(start_gateway):
    """A real `gateway serve` with API keys and a small body limit: (base URL, its log file)."""
    path = write_config(small_config(api_keys=[KEY], max_body_bytes=200_000))
    url = start_gateway(path)
    return url, RUN_DIR / f"gateway-{path.stem}.log"


def test_one_json_line_per_request_without_images_or_keys(served, chelsea_jpeg):
    url, log_path = served
    key, bearer = {"X-API-Key": KEY}, {"Authorization": f"Bearer {KEY}"}
    photo_b64 = base64.b64encode(chelsea_jpeg).decode()
    v2_body, v2_headers = v2_image_body(chelsea_jpeg, "v2-body-id")
    calls = {  # id -> (method, path, headers, body, status, model, route, backend)
        "ok-json": ("POST", "/v1/classify", {**key, "Content-Type": "application/json"},
                    json.dumps({"image": photo_b64}).encode(), 200, MODEL, "embedded", "embedded"),
        "ok-raw": ("POST", f"/v1/models/{MODEL}/classify?top_k=2", {**bearer, "Content-Type": "image/jpeg"},
                   chelsea_jpeg, 200, MODEL, "embedded", "embedded"),
        "bad-image": ("POST", "/v1/classify", {**key, "Content-Type": "image/jpeg"}, b"\xff\xd8 broken", 400,
                      MODEL, None, None),
        "engine-down": ("POST", "/v1/classify?route=triton", {**key, "Content-Type": "image/jpeg"}, chelsea_jpeg,
                        503, MODEL, None, "triton"),
        "no-key": ("POST", "/v1/classify", {"Content-Type": "image/jpeg", "X-API-Key": KEY + "-wrong"},
                   chelsea_jpeg, 401, MODEL, None, None),
        "too-big": ("POST", "/v1/classify", {**key, "Content-Type": "image/jpeg"}, b"\0" * 250_000, 413,
                    MODEL, None, None),
        "nowhere": ("GET", "/nowhere", key, None, 404, None, None, None),
        "v2-infer": ("POST", f"/v2/models/{MODEL}_image/infer", {**key, **v2_headers}, v2_body, 200,
                     f"{MODEL}_image", "embedded", "embedded"),
        "metrics": ("GET", "/metrics", bearer, None, 200, None, None, None),
        "health": ("GET", "/healthz", {}, None, 200, None, None, None),
    }
    answers = {}
    for rid, (method, path, headers, body, status, *_) in calls.items():
        answer = requests.request(method, url + path, headers={**headers, "X-Request-Id": rid}, data=body, timeout=60)
        assert answer.status_code == status, (rid, answer.text)
        assert answer.headers["X-Request-Id"] == rid
        if status >= 400 and not path.startswith("/v2"):
            assert answer.json()["error"]["request_id"] == rid
        answers[rid] = answer
    lines = _access_lines(log_path, set(calls))
    for rid, (method, path, _, body, status, model, route, backend) in calls.items():
        (entry,) = lines[rid]  # one line per request
        assert set(entry) == FIELDS, entry
        assert entry["method"] == method and entry["path"] == path.split("?")[0] and entry["status"] == status
        assert (entry["model"], entry["route"], entry["backend"]) == (model, route, backend), entry
        assert entry["bytes_in"] == len(body or b"") and entry["bytes_out"] == len(answers[rid].content), entry
        assert entry["latency_ms"] > 0 and re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", entry["time"])
    text = log_path.read_bytes()
    assert KEY.encode() not in text and b"Bearer" not in text and b"X-API-Key" not in text
    assert photo_b64[:64].encode() not in text and chelsea_jpeg[1000:1032] not in text
    assert b"top_k" not in text  # no query strings


def _access_lines(log_path, ids: set[str], timeout: float = 10.0) -> dict[str, list[dict]]:
    """The log's access lines of these ids (a line is written once its answer is sent)."""
    deadline = time.monotonic() + timeout
    while True:
        found: dict[str, list[dict]] = {}
        for raw in log_path.read_text(errors="replace").splitlines():
            if raw.startswith("{"):
                entry = json.loads(raw)
                if entry.get("id") in ids:
                    found.setdefault(entry["id"], []).append(entry)
        if set(found) == ids or time.monotonic() > deadline:
            assert set(found) == ids, f"no access line for {sorted(ids - set(found))}"
            return found
        time.sleep(0.1)
