"""The TorchServe backend against a real TorchServe (Java frontend + Python workers), started once.

Covers the seed-style JPEG path straight to TorchServe, the gateway's .npy path, parity with
the embedded backend, bad input (4xx, the worker keeps serving), token auth, and faults.
"""
import dataclasses
import io
import json
import re

import numpy as np
import pytest
import requests
import yaml

from gateway.backends.torchserve import TorchServeBackend
from gateway.config import load_config
from gateway.errors import BackendRejected, BackendUnavailable
from gateway.ops.servers import torchserve as launcher
from gateway.postprocess import softmax
from gateway.service import Gateway

from conftest import ROOT, free_port, load_yaml_config
from helpers import CAT_LABELS, SAME_ENGINE_ATOL, SAME_WEIGHTS_ATOL, classify, preprocessed, route_of


@pytest.fixture(scope="module")
def gateway(torchserve_server):
    gw = Gateway(torchserve_server)
    gw.load()
    yield gw
    gw.close()


def test_torchserve_jpeg_straight_to_torchserve_gets_seed_style_top5(torchserve_server, chelsea_jpeg):
    url = torchserve_server.backends["torchserve"].url
    answer = requests.post(f"{url}/predictions/efficientnet_lite0", data=chelsea_jpeg, timeout=60).json()
    assert len(answer) == 5 and all(isinstance(v, float) for v in answer.values())
    top_label = max(answer, key=answer.get)
    assert top_label in CAT_LABELS
    assert list(answer.values()) == sorted(answer.values(), reverse=True)
    seed = requests.put(f"{url}/predictions/mobilenet", data=chelsea_jpeg, timeout=60).json()  # curl -T
    assert len(seed) == 5 and 0 < sum(seed.values()) <= 1.0 + 1e-6


@pytest.mark.parametrize("model", ["efficientnet_lite0", "mobilenet_v2"])
def test_torchserve_matches_embedded_backend(gateway, photos, model):
    r, batch = preprocessed(gateway, model, "torchserve", photos)
    via_ts = softmax(gateway.backends["torchserve"].infer(r, batch))
    via_onnx = softmax(gateway.backends["embedded"].infer(route_of(gateway, model, "embedded"), batch))
    np.testing.assert_array_equal(np.argsort(-via_ts)[:, :5], np.argsort(-via_onnx)[:, :5])
    np.testing.assert_allclose(via_ts, via_onnx, atol=SAME_WEIGHTS_ATOL)


def test_torchserve_big_batches_go_as_requests_of_max_batch(gateway, photos, torchserve_server):
    """Split into requests of <= max_batch images (Java's heap), answered in order."""
    r, batch = preprocessed(gateway, "efficientnet_lite0", "torchserve", [photos[0], photos[1], photos[1]] * 2)
    split = TorchServeBackend("torchserve", torchserve_server.with_backend("torchserve", max_batch_size=4)
                              .backends["torchserve"])
    whole = TorchServeBackend("torchserve", torchserve_server.with_backend("torchserve", max_batch_size=0)
                              .backends["torchserve"])
    try:
        a, b = split.infer(r, batch), whole.infer(r, batch)
    finally:
        split.close()
        whole.close()
    assert a.shape == (6, 1000)
    np.testing.assert_allclose(a, b, atol=SAME_WEIGHTS_ATOL)  # batches of 4+2 vs 6: kernels per batch size
    assert a[0].argmax() != a[1].argmax() and a[0].argmax() == a[3].argmax()  # rows kept in order


def test_torchserve_handler_uses_the_gateways_preprocessing(gateway, photos, torchserve_server):
    """JPEG preprocessed by the handler == .npy preprocessed by the gateway (one implementation)."""
    url = torchserve_server.backends["torchserve"].url
    r, batch = preprocessed(gateway, "efficientnet_lite0", "torchserve", photos[:1])
    probs = softmax(gateway.backends["torchserve"].infer(r, batch))[0]
    answer = requests.post(f"{url}/predictions/efficientnet_lite0", data=photos[0], timeout=60).json()
    labels = gateway.config.models["efficientnet_lite0"].labels
    for label, score in answer.items():
        # the same pixels and weights; TorchServe may batch either request with others (kernels per batch size)
        assert score == pytest.approx(probs[labels.index(label)], abs=SAME_ENGINE_ATOL)


def test_torchserve_bad_input_gets_4xx_and_the_worker_keeps_serving(gateway, torchserve_server, photos):
    url = torchserve_server.backends["torchserve"].url
    junk = requests.post(f"{url}/predictions/mobilenet", data=b"not an image", timeout=30)
    assert junk.status_code == 400 and "identify" in junk.text
    buf = io.BytesIO()
    np.save(buf, np.zeros((1, 3, 100, 100), np.float32))
    wrong = requests.post(f"{url}/predictions/mobilenet", data=buf.getvalue(), timeout=30)
    assert wrong.status_code == 400 and "expected float32" in wrong.text
    r, batch = preprocessed(gateway, "mobilenet_v2", "torchserve", photos)
    with pytest.raises(BackendRejected, match="torchserve"):
        gateway.backends["torchserve"].infer(r, batch[:, :, :100, :100])
    assert gateway.backends["torchserve"].infer(r, batch).shape == (2, 1000)  # still serving
    assert gateway.backends["torchserve"].ready(r)


def test_torchserve_unknown_model_is_unavailable(gateway, photos):
    r, batch = preprocessed(gateway, "mobilenet_v2", "torchserve", photos)
    missing = dataclasses.replace(r, backend_model="resnet_not_registered")
    with pytest.raises(BackendUnavailable, match="resnet_not_registered"):
        gateway.backends["torchserve"].infer(missing, batch)
    assert not gateway.backends["torchserve"].ready(missing)


@pytest.fixture
def torchserve_with_token_auth(tmp_path):
    """A second real TorchServe (mobilenet only, own ports) that keeps token auth on."""
    root = tmp_path
    (root / "torchserve").mkdir()
    (root / "torchserve" / "model_store").symlink_to(ROOT / "torchserve" / "model_store")
    props = (ROOT / "torchserve" / "config.properties").read_text()
    for key in ("grpc_inference_port", "grpc_management_port"):
        props = re.sub(rf"^{key}=.*$", f"{key}={free_port()}", props, flags=re.M)
    (root / "torchserve" / "config.properties").write_text(props)
    data = load_yaml_config()
    data["server"].update(default_model="mobilenet_v2", artifacts=str(ROOT / "artifacts.json"))
    data["backends"] = {"torchserve": {
        **data["backends"]["torchserve"], "url": f"http://127.0.0.1:{free_port()}",
        "management_url": f"http://127.0.0.1:{free_port()}", "token_file": "run/torchserve/key_file.json"}}
    data["models"] = {"mobilenet_v2": {**data["models"]["mobilenet_v2"],
                                       "routes": [{"backend": "torchserve", "backend_model": "mobilenet"}]}}
    (root / "gateway.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    config = load_config(root / "gateway.yaml")
    launcher.start(config, timeout=300)  # readiness itself needs the management key
    try:
        yield config
    finally:
        launcher.stop(config)
    assert not launcher.status(config)["running"]
    assert not (root / "run" / "torchserve" / "key_file.json").exists()


def test_torchserve_token_auth_kept_on_with_the_key_file(torchserve_with_token_auth, photos):
    config = torchserve_with_token_auth
    settings = config.backends["torchserve"]
    keys = json.loads((config.root / "run" / "torchserve" / "key_file.json").read_text())
    assert keys["inference"]["key"] != keys["management"]["key"]
    anonymous = requests.post(f"{settings.url}/predictions/mobilenet", data=photos[0], timeout=30)
    assert anonymous.status_code in (400, 401) and "key" in anonymous.text.lower()

    route = config.models["mobilenet_v2"].routes[0]
    backend = TorchServeBackend("torchserve", settings)  # token_file resolved against the config's folder
    gw = Gateway(config)
    _, batch = preprocessed(gw, "mobilenet_v2", "torchserve", photos)
    assert backend.ready(route)
    assert backend.infer(route, batch).shape == (2, 1000)  # bearer keys read from key_file.json
    assert backend.metadata(route)["workers"][0]["status"] == "READY"

    wrong_key = config.with_backend("torchserve", token="not-the-key").backends["torchserve"]
    wrong = TorchServeBackend("torchserve", wrong_key)
    assert not wrong.ready(route)
    with pytest.raises(BackendUnavailable, match="token"):
        wrong.infer(route, batch)
    backend.close()
    wrong.close()


def test_torchserve_archives_are_rebuilt_only_when_stale(tmp_path):
    """build_archives' staleness rule on a copy of a real .mar: missing, older than a packed
    file, preprocessing changed in gateway.yaml, unreadable -> rebuild; else keep."""
    import os
    import shutil

    mar = shutil.copy(ROOT / "torchserve" / "model_store" / "mobilenet.mar", tmp_path / "mobilenet.mar")
    inputs = [tmp_path / "handler.py", tmp_path / "preprocess.py"]
    for p in inputs:
        p.write_text("x")
        os.utime(p, (1, 1))
    routes = load_config(ROOT / "gateway.yaml").models["mobilenet_v2"].routes
    route = next(r for r in routes if r.backend == "torchserve")
    spec = json.dumps(route.preprocess.to_dict(), sort_keys=True)
    assert launcher._stale(mar, inputs, spec) == ""
    assert "preprocessing changed" in launcher._stale(mar, inputs, spec.replace("imagenet", "tf"))
    os.utime(inputs[0])  # now
    assert launcher._stale(mar, inputs, spec) == "older than handler.py"
    assert launcher._stale(tmp_path / "absent.mar", inputs, spec) == "missing"
    (tmp_path / "junk.mar").write_bytes(b"not a zip")
    assert launcher._stale(tmp_path / "junk.mar", inputs[1:], spec) == "unreadable"


# --- through the gateway's API ---

def test_torchserve_http_routes_and_bad_input(torchserve_server, make_api, chelsea_jpeg):
    api = make_api(torchserve_server)
    body = classify(api, chelsea_jpeg, "efficientnet_lite0", backend="torchserve").json()
    assert body["backend"] == "torchserve"
    assert body["results"][0]["predictions"][0]["label"] in CAT_LABELS
    mob = classify(api, chelsea_jpeg, "mobilenet_v2", backend="torchserve").json()
    emb = classify(api, chelsea_jpeg, "mobilenet_v2", backend="embedded").json()
    assert [p["index"] for p in mob["results"][0]["predictions"]] == \
        [p["index"] for p in emb["results"][0]["predictions"]]
    bad = classify(api, b"\xff\xd8garbage", "mobilenet_v2", backend="torchserve")
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_image"
    assert classify(api, chelsea_jpeg, "mobilenet_v2", backend="torchserve").status_code == 200


def test_torchserve_stopped_answers_503_naming_it(torchserve_server, make_api, chelsea_jpeg):
    config = load_yaml_config()
    config["models"]["efficientnet_lite0"]["routes"] = [{"backend": "torchserve"}, {"backend": "embedded"}]
    api = make_api(config)
    assert classify(api, chelsea_jpeg, "efficientnet_lite0").json()["backend"] == "torchserve"
    launcher.stop(torchserve_server)
    try:
        forced = classify(api, chelsea_jpeg, "efficientnet_lite0", backend="torchserve")
        assert forced.status_code == 503
        assert forced.json()["error"]["backend"] == "torchserve" and "torchserve" in forced.json()["error"]["message"]
        failover = classify(api, chelsea_jpeg, "efficientnet_lite0")
        assert failover.status_code == 200 and failover.json()["backend"] == "embedded"
    finally:
        launcher.start(torchserve_server, timeout=300)  # the session's server, back for later tests
