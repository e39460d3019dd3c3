"""The Triton backend against a real tritonserver (nvidia-pytriton's binary, CPU), started once.

Covers the adapter (binary tensors, batch splitting, errors), parity with the embedded
backend and with an in-process TensorFlow call, the HTTP path through a real gateway, and
fault injection: Triton stopped while requests flow, then brought back.
"""
import dataclasses
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests

from gateway.backends.triton import TritonBackend
from gateway.breaker import RouteHealth
from gateway.config import parse_config
from gateway.errors import BackendRejected, BackendUnavailable
from gateway.ops.servers import triton as launcher
from gateway.postprocess import softmax
from gateway.service import Gateway

from conftest import ROOT, free_port, free_port_block, load_yaml_config
from helpers import CAT, COFFEE, SAME_WEIGHTS_ATOL, classify, preprocessed, route_of


@pytest.fixture(scope="module")
def gateway(triton_server):
    gw = Gateway(triton_server)
    gw.load()
    yield gw
    gw.close()


def test_triton_server_reports_the_canonical_platforms(triton_server):
    base = triton_server.backends["triton"].url
    platforms = {m: requests.get(f"{base}/v2/models/{m}", timeout=10).json()["platform"]
                 for m in ("efficientnet_lite0", "torchmobilenet", "tfmobilenet")}
    assert platforms == {"efficientnet_lite0": "pytorch_libtorch", "torchmobilenet": "pytorch_libtorch",
                         "tfmobilenet": "tensorflow_savedmodel"}


def test_triton_learns_tensor_names_layout_and_batch_limit(gateway):
    info = gateway.backends["triton"].model_info(route_of(gateway, "mobilenet_v2", "triton-tf"))
    assert (info.input_name, info.layout, info.dims, info.max_batch_size) == ("input_1", "NHWC", (224, 224, 3), 8)
    info = gateway.backends["triton"].model_info(route_of(gateway, "efficientnet_lite0", "triton"))
    assert (info.input_name, info.output_name, info.layout) == ("input__0", "output__0", "NCHW")


@pytest.mark.parametrize("model", ["efficientnet_lite0", "mobilenet_v2"])
def test_triton_matches_embedded_backend(gateway, photos, model):
    r_triton, batch = preprocessed(gateway, model, "triton", photos)
    r_embedded = route_of(gateway, model, "embedded")
    via_triton = softmax(gateway.backends["triton"].infer(r_triton, batch))
    via_onnx = softmax(gateway.backends["embedded"].infer(r_embedded, batch))
    np.testing.assert_array_equal(np.argsort(-via_triton)[:, :5], np.argsort(-via_onnx)[:, :5])
    np.testing.assert_allclose(via_triton, via_onnx, atol=SAME_WEIGHTS_ATOL)
    if model == "efficientnet_lite0":
        assert via_triton[0].argmax() in CAT and via_triton[1].argmax() in COFFEE


def test_triton_tfmobilenet_equals_in_process_tensorflow(gateway, photos):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    r, batch = preprocessed(gateway, "mobilenet_v2", "triton-tf", photos)
    assert batch.shape == (2, 224, 224, 3)  # NHWC: the torch model's weights, converted
    via_triton = gateway.backends["triton"].infer(r, batch)
    signature = tf.saved_model.load(str(ROOT / "model_repository/tfmobilenet/1/model.savedmodel")) \
        .signatures["serving_default"]
    local = signature(input_1=tf.constant(batch))["predictions"].numpy()
    # the same SavedModel in two TensorFlow processes: the kernels may differ by batch and CPU
    np.testing.assert_allclose(via_triton, local, atol=SAME_WEIGHTS_ATOL)


def test_triton_splits_a_20_image_request_into_batches_of_8_in_order(gateway, photos):
    r, batch = preprocessed(gateway, "efficientnet_lite0", "triton", photos)
    backend = gateway.backends["triton"]
    singles = [backend.infer(r, batch[i:i + 1]) for i in range(2)]
    big = np.concatenate([batch] * 10)  # chelsea, coffee, chelsea, ... (20 images)
    sizes = []
    infer_batch = backend.infer_batch
    backend.infer_batch = lambda route, chunk: sizes.append(len(chunk)) or infer_batch(route, chunk)
    try:
        out = backend.infer(r, big)
    finally:
        del backend.infer_batch
    assert sizes == [8, 8, 4]  # the model config's max_batch_size
    assert out.shape == (20, 1000)
    for i in range(20):  # logits of one image in batches of 1 and of 8: kernels differ per batch size
        np.testing.assert_allclose(out[i], singles[i % 2][0], atol=SAME_WEIGHTS_ATOL)


def test_triton_model_not_loaded_is_a_clear_unavailable_error(gateway, photos):
    r, batch = preprocessed(gateway, "efficientnet_lite0", "triton", photos)
    missing = dataclasses.replace(r, backend_model="resnet_not_loaded")
    with pytest.raises(BackendUnavailable, match="resnet_not_loaded"):
        gateway.backends["triton"].infer(missing, batch)
    assert not gateway.backends["triton"].ready(missing)


def test_triton_unreachable_server_is_unavailable_naming_triton(triton_server, gateway, photos):
    r, batch = preprocessed(gateway, "efficientnet_lite0", "triton", photos)
    dead = triton_server.with_backend("triton", url=f"http://127.0.0.1:{free_port()}")
    backend = TritonBackend("triton", dead.backends["triton"])
    try:
        with pytest.raises(BackendUnavailable, match="triton.*cannot connect") as err:
            backend.infer(r, batch)
        assert err.value.backend == "triton"
        assert not backend.ready(r)
    finally:
        backend.close()


def test_triton_relearns_the_model_config_after_a_failed_call(gateway, photos):
    """A stale cached config (e.g. the model was reloaded) costs one failed call, not all later ones."""
    r, batch = preprocessed(gateway, "efficientnet_lite0", "triton", photos)
    backend = gateway.backends["triton"]
    info = backend.model_info(r)
    key = next(k for k, v in backend._info.items() if v is info)
    backend._info[key] = type(info)(**{**info.__dict__, "input_name": "renamed__0"})
    with pytest.raises((BackendRejected, BackendUnavailable), match="renamed__0"):
        backend.infer(r, batch)
    assert backend.infer(r, batch).shape == (2, 1000)
    assert backend.model_info(r) == info


# --- through the gateway's API ---

def test_triton_http_routes(triton_server, make_api, chelsea_jpeg):
    api = make_api(triton_server)
    body = classify(api, chelsea_jpeg, "efficientnet_lite0", backend="triton").json()
    assert body["backend"] == "triton" and body["results"][0]["predictions"][0]["index"] in CAT
    torch_route = classify(api, chelsea_jpeg, "mobilenet_v2", backend="triton").json()
    embedded = classify(api, chelsea_jpeg, "mobilenet_v2", backend="embedded").json()
    assert torch_route["route"] == "triton"
    assert [p["index"] for p in torch_route["results"][0]["predictions"]] == \
        [p["index"] for p in embedded["results"][0]["predictions"]]
    tf_route = classify(api, chelsea_jpeg, "mobilenet_v2", route="triton-tf").json()
    assert tf_route["backend"] == "triton" and tf_route["route"] == "triton-tf"
    assert len(tf_route["results"][0]["predictions"]) == 5
    detail = api.get("/v1/models/mobilenet_v2").json()
    tf_info = next(r for r in detail["routes"] if r["name"] == "triton-tf")
    assert tf_info["ready"] and tf_info["metadata"]["platform"] == "tensorflow_savedmodel"


@pytest.fixture
def own_triton(tmp_path):
    """(config dict, GatewayConfig): a second real tritonserver of its own (free ports, a
    repository with efficientnet_lite0 only), routed first, then embedded. It starts in a few
    seconds, and stopping it leaves the session's server alone."""
    base = free_port_block(3)
    (tmp_path / "model_repository").mkdir()
    (tmp_path / "model_repository" / "efficientnet_lite0").symlink_to(ROOT / "model_repository/efficientnet_lite0")
    data = load_yaml_config()
    data["server"]["artifacts"] = str(ROOT / "artifacts.json")
    data["backends"] = {"embedded": {**data["backends"]["embedded"], "model_dir": str(ROOT / "onnx")},
                        "triton": {**data["backends"]["triton"], "url": f"http://127.0.0.1:{base}"}}
    routes = data["models"]["efficientnet_lite0"]["routes"]
    data["models"] = {"efficientnet_lite0": {**data["models"]["efficientnet_lite0"], "routes": [
        *[r for r in routes if r["backend"] == "triton" and r.get("name") is None], {"backend": "embedded"}]}}
    config = parse_config(data, tmp_path)
    launcher.start(config, timeout=300)
    yield data, config
    launcher.stop(config)
    assert not launcher.status(config)["running"]


def test_triton_stopped_mid_traffic_fails_over_then_recovers(own_triton, make_api, serve_api, chelsea_jpeg):
    """Triton first, embedded second: stop Triton while 3 HTTP clients send, then bring it back."""
    data, triton_server = own_triton
    data["models"]["efficientnet_lite0"]["routes"].append(
        {"name": "triton-missing", "backend": "triton", "backend_model": "resnet_not_loaded"})
    # back-off capped at 2 s (not 30): recovery is noticed within the test's patience
    api = make_api(parse_config(data, triton_server.root), health=RouteHealth(max_backoff_s=2.0))
    url = serve_api(api)
    assert classify(url, chelsea_jpeg, "efficientnet_lite0").json()["backend"] == "triton"
    missing = classify(url, chelsea_jpeg, "efficientnet_lite0", route="triton-missing")
    assert missing.status_code in (404, 503)
    assert missing.json()["error"]["backend"] == "triton" and "resnet_not_loaded" in missing.json()["error"]["message"]

    results, stop_flag = [], threading.Event()

    def client():
        session = requests.Session()
        while not stop_flag.is_set():
            t0 = time.monotonic()
            resp = session.post(f"{url}/v1/classify", data=chelsea_jpeg, timeout=60,
                                headers={"Content-Type": "image/jpeg"})
            results.append((resp.status_code, resp.json().get("backend"), time.monotonic() - t0))

    with ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(client) for _ in range(3)]
        time.sleep(0.5)  # traffic flowing
        launcher.stop(triton_server)
        time.sleep(1.0)  # traffic while it is down
        stop_flag.set()
        for f in futures:
            f.result()
    assert results, "no request completed"
    assert all(status == 200 for status, _, _ in results), {s for s, _, _ in results}
    assert {backend for _, backend, _ in results} >= {"embedded"}
    assert max(elapsed for _, _, elapsed in results) < 30  # nothing hung

    forced = classify(url, chelsea_jpeg, "efficientnet_lite0", route="triton")
    assert forced.status_code == 503
    assert forced.json()["error"]["backend"] == "triton" and "triton" in forced.json()["error"]["message"]

    launcher.start(triton_server, timeout=300)  # recovery: the circuit probes Triton back in
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if classify(url, chelsea_jpeg, "efficientnet_lite0").json()["backend"] == "triton":
            break
        time.sleep(0.25)
    else:
        pytest.fail("Triton never took traffic back after it restarted")
