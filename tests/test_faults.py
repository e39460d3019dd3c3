"""The same fault means the same answer on every engine.

Each engine gets a FAULT DOUBLE: a few lines of Flask speaking that engine's protocol and
error shapes (Triton's KServe v2 JSON, TorchServe's inference + management API, TF
Serving's REST API), told which fault to show. No real engine misbehaves on demand; real
servers being stopped mid-traffic are covered in test_triton.py and test_torchserve.py.
Every (engine, fault) pair must give the same error class, status and failover decision.
"""
import io
import json
import threading
import time

import numpy as np
import pytest
from flask import Flask, Response, jsonify, request
from werkzeug.serving import make_server

from conftest import load_yaml_config
from helpers import assert_error, classify

MODEL = "efficientnet_lite0"
# fault -> (status answered, error code, whether another route may answer instead)
FAULTS = {
    "model_not_loaded": (503, "backend_unavailable", True),
    "unavailable": (503, "backend_unavailable", True),
    "auth": (503, "backend_unavailable", True),
    "timeout_status": (504, "backend_timeout", True),
    "slow": (504, "backend_timeout", True),
    "refused": (503, "backend_unavailable", True),
    "rejected": (502, "backend_rejected_input", False),
    "internal": (502, "bad_backend_response", False),
    "garbage": (502, "bad_backend_response", False),
    "wrong_rows": (502, "bad_backend_response", False),
}


def engine_double(engine: str) -> Flask:
    """One engine's endpoints under ``/<fault>/``: healthy except for the inference call,
    which shows that fault (so one server per engine serves every fault)."""
    app = Flask(f"{engine}_double")
    error = {  # the engine's own status and body for each fault
        "triton": {"model_not_loaded": (400, {"error": f"Request for unknown model: '{MODEL}' is not found"}),
                   "unavailable": (503, {"error": "Server is not ready"}),
                   "auth": (401, {"error": "unauthorized"}),
                   "timeout_status": (504, {"error": "request timed out"}),
                   "rejected": (400, {"error": "unexpected shape for input 'input__0'"}),
                   "internal": (500, {"error": "an internal error"})},
        "torchserve": {"model_not_loaded": (404, {"code": 404, "type": "ModelNotFoundException",
                                                  "message": f"Model not found: {MODEL}"}),
                       "unavailable": (503, {"code": 503, "type": "ServiceUnavailableException",
                                             "message": "No worker is available to serve request"}),
                       "auth": (400, {"code": 400, "type": "InvalidKeyException",
                                      "message": "Token Authorization failed. Token either incorrect"}),
                       "timeout_status": (408, {"code": 408, "type": "RequestTimeout", "message": "timed out"}),
                       "rejected": (400, {"code": 400, "type": "BadInput", "message": "expected float32"}),
                       "internal": (500, {"code": 500, "type": "InternalServerException", "message": "boom"})},
        "tfserving": {"model_not_loaded": (404, {"error": f"Servable not found for request: Latest({MODEL})"}),
                      "unavailable": (503, {"error": "Server not ready"}),
                      "auth": (403, {"error": "forbidden"}),
                      "timeout_status": (504, {"error": "Timed out waiting for notification"}),
                      "rejected": (400, {"error": "input must be 4-dimensional"}),
                      "internal": (500, {"error": "Internal: boom"})},
    }[engine]

    def infer(fault: str, rows: int):
        if fault in error:
            status, body = error[fault]
            return jsonify(body), status
        if fault == "slow":
            time.sleep(1.5)
        if fault == "garbage":
            return Response(b"\x00\x01 definitely not an answer", status=200, content_type="application/json")
        n = rows + 1 if fault == "wrong_rows" else rows
        logits = np.zeros((n, 1000), np.float32)
        if engine == "triton":
            return jsonify({"model_name": MODEL, "outputs": [{"name": "output__0", "datatype": "FP32",
                                                              "shape": [n, 1000], "data": logits.ravel().tolist()}]})
        if engine == "torchserve":
            buf = io.BytesIO()
            np.save(buf, logits)
            return Response(buf.getvalue(), content_type="application/octet-stream")
        return jsonify({"outputs": logits.tolist()})

    def rows_of_triton() -> int:
        length = int(request.headers.get("Inference-Header-Content-Length") or len(request.data))
        header = json.loads(request.data[:length])
        return header["inputs"][0]["shape"][0]

    if engine == "triton":
        routes = [("GET", f"/v2/models/{MODEL}/ready", lambda fault: ("", 200)),
                  ("GET", f"/v2/models/{MODEL}/config", lambda fault: jsonify({
                      "max_batch_size": 8, "output": [{"name": "output__0"}],
                      "input": [{"name": "input__0", "data_type": "TYPE_FP32", "format": "FORMAT_NCHW",
                                 "dims": [3, 224, 224]}]})),
                  ("POST", f"/v2/models/{MODEL}/infer", lambda fault: infer(fault, rows_of_triton()))]
    elif engine == "torchserve":
        routes = [("GET", f"/models/{MODEL}",
                   lambda fault: jsonify([{"modelName": MODEL, "workers": [{"status": "READY"}]}])),
                  ("POST", f"/predictions/{MODEL}", lambda fault: infer(fault, len(np.load(io.BytesIO(request.data)))))]
    else:
        routes = [("GET", f"/v1/models/{MODEL}",
                   lambda fault: jsonify({"model_version_status": [{"state": "AVAILABLE"}]})),
                  ("GET", f"/v1/models/{MODEL}/metadata", lambda fault: jsonify({"metadata": {"signature_def": {
                      "signature_def": {"serving_default": {"inputs": {"images": {}}, "outputs": {"logits": {}}}}}}})),
                  ("POST", f"/v1/models/{MODEL}:predict",
                   lambda fault: infer(fault, len(request.get_json()["inputs"]["images"])))]
    for i, (method, path, view) in enumerate(routes):
        app.add_url_rule("/<fault>" + path, f"view{i}", view, methods=[method])
    return app


@pytest.fixture(scope="module")
def doubles():
    """(engine, fault) -> the URL showing that fault; "refused" gets a port nothing listens on."""
    from conftest import free_port

    servers, urls = [], {}
    for engine in ("triton", "torchserve", "tfserving"):
        server = make_server("127.0.0.1", 0, engine_double(engine), threaded=True)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        for fault in FAULTS:
            urls[engine, fault] = f"http://127.0.0.1:{server.server_port}/{fault}"
        urls[engine, "refused"] = f"http://127.0.0.1:{free_port()}"
    yield urls
    for server in servers:
        server.shutdown()


@pytest.fixture(scope="module")
def fault_apis(doubles, make_api):
    """engine -> the app with one model per fault, each routed to that fault first, then embedded."""
    apis = {}
    for engine in ("triton", "torchserve", "tfserving"):
        config = load_yaml_config()
        backends, models = {"embedded": config["backends"]["embedded"]}, {}
        for fault in FAULTS:
            backend = {"kind": engine, "url": doubles[engine, fault], "connect_timeout_s": 1, "timeout_s": 1}
            if engine == "torchserve":
                backend["management_url"] = doubles[engine, fault]
            backends[fault] = backend
            models[fault] = {**config["models"][MODEL], "routes": [
                {"backend": fault, "backend_model": MODEL, "name": engine},
                {"backend": "embedded", "backend_model": MODEL}]}
        apis[engine] = make_api({**config, "server": {**config["server"], "default_model": "refused"},
                                 "backends": backends, "models": models})
    return apis


@pytest.mark.parametrize("engine", ["triton", "torchserve", "tfserving"])
@pytest.mark.parametrize("fault", list(FAULTS))
def test_the_same_fault_gives_the_same_answer_on_every_engine(engine, fault, fault_apis, chelsea_jpeg):
    status, code, fails_over = FAULTS[fault]
    api = fault_apis[engine]
    t0 = time.monotonic()
    forced = classify(api, chelsea_jpeg, model=fault, route=engine)
    error = assert_error(forced, status, code)
    assert error["backend"] == fault
    assert time.monotonic() - t0 < 1.4  # bounded by the 1 s read timeout, not the double's 1.5 s sleep

    routed = classify(api, chelsea_jpeg, model=fault)
    if fails_over:
        assert routed.status_code == 200 and routed.json()["backend"] == "embedded"
    else:
        assert_error(routed, status, code)
    assert classify(api, chelsea_jpeg, model=fault, route="embedded").status_code == 200  # still serving


def test_batch_records_a_persistent_502_as_the_images_error_line(doubles, make_api, serve_api, chelsea_jpeg,
                                                                tmp_path, monkeypatch):
    from gateway.tools.batch import http_engine as batch

    monkeypatch.setattr(batch, "RETRY_DELAY_S", 0.01)
    config = load_yaml_config()
    config["backends"] = {"garbage": {"kind": "tfserving", "url": doubles["tfserving", "garbage"]}}
    config["models"] = {MODEL: {**config["models"][MODEL], "routes": [{"backend": "garbage"}]}}
    url = serve_api(make_api(config))
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("a.jpg", "b.jpg"):
        (folder / name).write_bytes(chelsea_jpeg)
    out = tmp_path / "out.jsonl"
    stats = batch.run_batch(folder, out, url=url, model=MODEL, progress=False, log=lambda m: None)
    assert "aborted" not in stats and stats["written"] == 2 and stats["errors"] == 2
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["file"] for r in rows] == ["a.jpg", "b.jpg"] and {r["error"]["status"] for r in rows} == {502}
