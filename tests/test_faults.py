"""Fault injection with misbehaving backends: slow answers -> 504 within the timeout, garbage
-> 502, and the gateway keeps serving. The misbehaving server is a FAULT DOUBLE (a few lines
speaking TF Serving's REST shapes), since no real engine misbehaves on demand; real servers
being stopped mid-traffic are covered in test_triton.py and test_torchserve.py."""
import json
import threading
import time

import pytest
import requests
from werkzeug.serving import make_server
from flask import Flask, Response, jsonify

from conftest import load_yaml_config

SIGNATURE = {"metadata": {"signature_def": {"signature_def": {"serving_default": {
    "inputs": {"input_1": {"dtype": "DT_FLOAT"}}, "outputs": {"predictions": {"dtype": "DT_FLOAT"}}}}}}}


def fault_double(mode: str) -> Flask:
    """mode: slow (sleeps 5 s), garbage (not JSON), wrong_shape (JSON of the wrong size)."""
    app = Flask(f"fault_double_{mode}")

    @app.get("/v1/models/<name>")
    def status(name):
        return jsonify({"model_version_status": [{"version": "1", "state": "AVAILABLE"}]})

    @app.get("/v1/models/<name>/metadata")
    def metadata(name):
        return jsonify(SIGNATURE)

    @app.post("/v1/models/<path:rest>")
    def predict(rest):
        if mode == "slow":
            time.sleep(5)
            return jsonify({"outputs": [[0.0] * 1000]})
        if mode == "garbage":
            return Response(b"\x00\x01 definitely not json", status=200, content_type="application/json")
        return jsonify({"outputs": [[0.5, 0.5]]})
    return app


@pytest.fixture(scope="module")
def faulty_gateway(start_gateway):
    servers, config = [], load_yaml_config()
    config["backends"] = {"embedded": config["backends"]["embedded"]}
    for mode in ("slow", "garbage", "wrong_shape"):
        server = make_server("127.0.0.1", 0, fault_double(mode), threaded=True)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        config["backends"][mode] = {"kind": "tfserving", "url": f"http://127.0.0.1:{server.server_port}",
                                    "connect_timeout_s": 1, "timeout_s": 1}
    config["models"]["efficientnet_lite0"]["routes"] = [{"backend": "embedded", "model": "efficientnet_lite0"}]
    config["models"]["mobilenet_v2"]["routes"] = [
        {"backend": "slow", "model": "tfmobilenet", "preprocess": {"scaling": "tf", "layout": "NHWC"}},
        {"backend": "garbage", "model": "tfmobilenet", "preprocess": {"scaling": "tf", "layout": "NHWC"}},
        {"backend": "wrong_shape", "model": "tfmobilenet", "preprocess": {"scaling": "tf", "layout": "NHWC"}},
        {"backend": "embedded", "model": "mobilenet_v2"},
    ]
    yield start_gateway(config)
    for server in servers:
        server.shutdown()


def classify(url, data, backend=None):
    return requests.post(f"{url}/v1/models/mobilenet_v2/classify", params={"backend": backend} if backend else {},
                         data=data, headers={"Content-Type": "image/jpeg"}, timeout=30)


def test_slow_backend_answers_504_within_its_timeout(faulty_gateway, chelsea_jpeg):
    t0 = time.monotonic()
    resp = classify(faulty_gateway, chelsea_jpeg, "slow")
    assert resp.status_code == 504, resp.text
    assert resp.json()["error"]["backend"] == "slow"
    assert time.monotonic() - t0 < 4  # the backend's 1 s read timeout, not its 5 s sleep


def test_garbage_answers_are_502_naming_the_backend(faulty_gateway, chelsea_jpeg):
    for backend in ("garbage", "wrong_shape"):
        resp = classify(faulty_gateway, chelsea_jpeg, backend)
        assert resp.status_code == 502, resp.text
        assert resp.json()["error"]["backend"] == backend


def test_timeouts_fail_over_but_garbage_does_not(faulty_gateway, chelsea_jpeg):
    """Route order slow, garbage, ...: the slow one times out and is skipped; garbage is a 502
    (a broken backend is reported, not silently replaced)."""
    resp = classify(faulty_gateway, chelsea_jpeg)
    assert resp.status_code == 502 and resp.json()["error"]["backend"] == "garbage"
    # the slow route's circuit is now open: it is tried last, garbage first again
    assert classify(faulty_gateway, chelsea_jpeg).json()["error"]["backend"] == "garbage"


def test_gateway_keeps_serving_after_faults(faulty_gateway, chelsea_jpeg):
    ok = classify(faulty_gateway, chelsea_jpeg, "embedded")
    assert ok.status_code == 200 and ok.json()["backend"] == "embedded"
    detail = requests.get(f"{faulty_gateway}/v1/models/mobilenet_v2", timeout=30).json()
    assert {r["name"]: r["ready"] for r in detail["routes"]}["embedded"] is True


def test_batch_records_a_persistent_502_as_the_images_error_line(faulty_gateway, chelsea_jpeg, tmp_path):
    from gateway.batch import run_batch

    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("a.jpg", "b.jpg"):
        (folder / name).write_bytes(chelsea_jpeg)
    out = tmp_path / "out.jsonl"
    stats = run_batch(folder, out, url=faulty_gateway, model="mobilenet_v2", backend="garbage",
                      progress=False, log=lambda m: None)
    assert "aborted" not in stats and stats["written"] == 2 and stats["errors"] == 2
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["file"] for r in rows] == ["a.jpg", "b.jpg"] and {r["error"]["status"] for r in rows} == {502}
