"""The TF Serving adapter against a protocol-faithful TEST DOUBLE (tests/tfserving_double.py),
and against the real tensorflow/serving image when a Docker engine is reachable.

No tensorflow_model_server binary exists on this machine's package registries, so the double
(real SavedModels, real TensorFlow, TF Serving's REST shapes and error bodies) stands in.
"""
import http.server
import os
import threading
import time
from dataclasses import replace

import numpy as np
import pytest
import requests

from gateway.backends.tfserving import TFServingBackend, TFServingSettings
from gateway.config import load_config
from gateway.errors import BackendBadResponse, BackendRejected, BackendTimeout, BackendUnavailable
from gateway.service import Gateway

from conftest import ROOT, free_port, load_yaml_config
from helpers import SAME_ENGINE_ATOL, SAME_WEIGHTS_ATOL, classify, preprocessed

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

@pytest.fixture(scope="module")
def gateway(tfserving_double):
    url, _ = tfserving_double
    gw = Gateway(load_config(ROOT / "gateway.yaml").with_backend("tfserving", url=url))
    gw.load()
    return gw


@pytest.fixture(scope="module")
def batch(gateway, chelsea_jpeg, coffee_jpeg):
    return preprocessed(gateway, "mobilenet_v2", "tfserving", [chelsea_jpeg, coffee_jpeg])


def in_process(batch):
    import tensorflow as tf

    fn = tf.saved_model.load(str(ROOT / "tfserving/models/tfmobilenet/1")).signatures["serving_default"]
    return fn(input_1=tf.constant(batch))["predictions"].numpy()


def test_tfserving_double_output_equals_in_process_savedmodel(gateway, batch):
    route, x = batch
    assert route.version is None and x.shape == (2, 224, 224, 3)
    via_double = gateway.backends["tfserving"].infer(replace(route, version="1"), x)
    # the same SavedModel in two TensorFlow processes (double vs this one), batch 2 both
    np.testing.assert_allclose(via_double, in_process(x), atol=SAME_ENGINE_ATOL)
    assert gateway.backends["tfserving"].tensor_names(route) == ("input_1", "predictions")


def test_tfserving_version_pinning(gateway, batch):
    route, x = batch
    backend = gateway.backends["tfserving"]
    assert backend.infer(replace(route, version="2"), x).argmax(axis=1).tolist() == [7, 7]
    assert backend.infer(route, x).argmax(axis=1).tolist() == [7, 7]  # unpinned: the latest version
    v1 = backend.infer(replace(route, version="1"), x)
    assert v1.argmax(axis=1).tolist() == in_process(x).argmax(axis=1).tolist()
    assert backend.ready(replace(route, version="1")) and not backend.ready(replace(route, version="9"))


def test_tfserving_errors_map_to_gateway_errors(gateway, batch):
    route, x = batch
    backend = gateway.backends["tfserving"]
    with pytest.raises(BackendUnavailable, match="Servable not found for request: Specific"):
        backend.infer(replace(route, version="9"), x)
    with pytest.raises(BackendUnavailable, match="Could not find any versions|Servable not found"):
        backend.infer(replace(route, backend_model="resnet_unknown"), x)
    with pytest.raises(BackendRejected, match="tfserving"):
        backend.infer(replace(route, version="1"), x[..., :2])  # 2 channels: the graph fails, TF Serving answers 400
    down = Gateway(load_config(ROOT / "gateway.yaml").with_backend("tfserving", url=f"http://127.0.0.1:{free_port()}"))
    with pytest.raises(BackendUnavailable, match="tfserving") as info:
        down.backends["tfserving"].infer(route, x)
    assert info.value.backend == "tfserving"


def test_tfserving_double_speaks_the_documented_rest_shapes(tfserving_double, batch):
    """The double itself: row format, status and error bodies as TF Serving documents them."""
    url, _ = tfserving_double
    _, x = batch
    row = requests.post(f"{url}/v1/models/tfmobilenet/versions/1:predict", timeout=60,
                        json={"instances": x[:1].tolist()}).json()
    assert set(row) == {"predictions"} and np.asarray(row["predictions"]).shape == (1, 1000)
    status = requests.get(f"{url}/v1/models/tfmobilenet", timeout=10).json()
    assert [s["version"] for s in status["model_version_status"]] == ["2", "1"]
    assert status["model_version_status"][0]["state"] == "AVAILABLE"
    for path, code in (("/v1/models/nope:predict", 404), ("/v1/models/nope", 404),
                       ("/v1/models/tfmobilenet/versions/1:predict", 400)):
        resp = requests.post(url + path, json={"instances": "x"}, timeout=10) if path.endswith("predict") \
            else requests.get(url + path, timeout=10)
        assert resp.status_code == code and set(resp.json()) == {"error"}


def test_tfserving_grpc_protocol_against_the_double(tfserving_double, batch):
    url, grpc_port = tfserving_double
    route, x = batch
    config = load_config(ROOT / "gateway.yaml")
    gw = Gateway(config.with_backend("tfserving", url=url, protocol="grpc", grpc_url=f"127.0.0.1:{grpc_port}"))
    out = gw.backends["tfserving"].infer(replace(route, version="1"), np.concatenate([x] * 4))  # 8 images: > 4 MB
    # batch 8 there, batch 2 here: the kernels may differ per batch size and CPU
    np.testing.assert_allclose(out[:2], in_process(x), atol=SAME_ENGINE_ATOL)
    with pytest.raises(BackendUnavailable, match="Servable not found"):
        gw.backends["tfserving"].infer(replace(route, version="9"), x)


def test_tfserving_through_the_gateway_api(tfserving_double, make_api, chelsea_jpeg, batch):
    url, _ = tfserving_double
    config = load_yaml_config()
    config["backends"]["tfserving"]["url"] = url
    for route in config["models"]["mobilenet_v2"]["routes"]:
        if route["backend"] == "tfserving":
            route["version"] = 1
    resp = classify(make_api(config), chelsea_jpeg, "mobilenet_v2", backend="tfserving")
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["backend"] == "tfserving"
    expected = in_process(batch[1][:1])[0]
    assert [p["index"] for p in body["results"][0]["predictions"]] == list(np.argsort(-expected)[:5])
    assert body["results"][0]["predictions"][0]["score"] == pytest.approx(float(expected.max()), abs=SAME_ENGINE_ATOL)


def test_tfserving_real_image_through_docker(batch):
    """The real tensorflow/serving image, when a Docker engine is reachable."""
    try:
        import docker

        client = docker.from_env(timeout=5)
        client.ping()
    except Exception as exc:
        pytest.skip(f"no Docker engine reachable ({type(exc).__name__}: {str(exc)[:120]}): "
                    f"the real TF Serving image cannot run here; the adapter is tested against the double")
    from gateway.ops.servers import docker as docker_launcher

    port = free_port()
    config = load_config(ROOT / "gateway.yaml").with_backend("tfserving", url=f"http://127.0.0.1:{port}")
    spec = docker_launcher.container_spec("tfserving", config)  # the compose service: batching on
    container = client.containers.run(spec["image"], command=spec["command"], volumes=spec["volumes"],
                                      ports={"8501/tcp": ("127.0.0.1", port)}, detach=True, remove=True)
    try:
        docker_launcher.wait_ready("tfserving", config, timeout=180)
        backend = Gateway(config).backends["tfserving"]
        route, x = batch
        x10 = np.concatenate([x] * 5)  # above batching_parameters.txt's max_batch_size: the adapter slices
        out = backend.infer(route, x10)
        # TF Serving's build of TensorFlow vs this one, batches of 8 and 2: other kernels, same weights
        np.testing.assert_allclose(out, np.concatenate([in_process(x)] * 5), atol=SAME_WEIGHTS_ATOL)
        with pytest.raises(BackendUnavailable, match="Servable not found for request: Specific"):
            backend.infer(replace(route, version="9"), x)
        with pytest.raises(BackendRejected):
            backend.infer(route, x[..., :2])
    finally:
        container.stop(timeout=5)


def test_tfserving_double_answers_tf_servings_error_strings(tfserving_double):
    """Messages and statuses from TF Serving's source (http_rest_api_handler.cc, json_tensor.cc)."""
    url, _ = tfserving_double
    cases = [
        ("GET", "/v1/models/tfmobilenet:predict", None, 400, "Malformed request: GET /v1/models/tfmobilenet:predict"),
        ("GET", "/v1/models", None, 400, "Missing model name in request."),
        ("GET", "/v1/models/tfmobilenet/versions/9", None, 404, "Could not find version 9 of model tfmobilenet"),
        ("GET", "/v1/models/nope/metadata", None, 404, "Servable not found for request: Latest(nope)"),
        ("POST", "/v1/models/nope:predict", b"", 400, "JSON Parse error: The document is empty"),  # parse first
        ("POST", "/v1/models/tfmobilenet:predict", b"{}", 400, "Missing 'inputs' or 'instances' key"),
        ("POST", "/v1/models/tfmobilenet:predict", b'{"instances": []}', 400,
         'JSON Value: {\n    "instances": []\n} No values in \'instances\' array'),
        ("POST", "/v1/models/tfmobilenet:predict", b'{"signature_name": "x", "inputs": [1]}', 400,
         'Serving signature name: "x" not found in signature def'),
        ("POST", "/v1/models/tfmobilenet:predict", b'{"inputs": {"other": [1]}}', 400,
         "Missing named input: input_1 in 'inputs' object."),
        ("POST", "/v1/models/tfmobilenet:predict", b'{"inputs": [["a"]]}', 400,
         'JSON Value: "a" Type: String is not of expected type: float'),
        ("POST", "/v1/models/tfmobilenet:predict", b'{"instances": [[[[0,0,0]]], [[[0,0,0],[0,0,0]]]]}', 400,
         "Failed to process element: 1 of 'instances' list. Error: INVALID_ARGUMENT: Expecting shape [1,1,3] "
         "but got: [1,2,3]"),
    ]
    for method, path, body, status, message in cases:
        resp = requests.request(method, url + path, data=body, timeout=30)
        assert (resp.status_code, resp.json()) == (status, {"error": message}), (method, path)
    assert requests.get(url + "/v2/health/ready", timeout=10).status_code == 404  # outside /v1/: no handler


def test_tfserving_double_metadata_is_the_savedmodels_signature_def(tfserving_double):
    url, _ = tfserving_double
    meta = requests.get(f"{url}/v1/models/tfmobilenet/versions/1/metadata", timeout=10).json()
    assert meta["model_spec"] == {"name": "tfmobilenet", "signature_name": "", "version": "1"}
    sig = meta["metadata"]["signature_def"]["signature_def"]["serving_default"]
    assert sig["method_name"] == "tensorflow/serving/predict"
    assert sig["inputs"]["input_1"]["dtype"] == "DT_FLOAT"
    assert [d["size"] for d in sig["inputs"]["input_1"]["tensor_shape"]["dim"]] == ["-1", "224", "224", "3"]
    assert [d["size"] for d in sig["outputs"]["predictions"]["tensor_shape"]["dim"]] == ["-1", "1000"]


def test_tfserving_adapter_splits_batches_above_max_batch_size(gateway, batch):
    """TF Serving with --enable_batching refuses a request above its max_batch_size: slice it."""
    route, x = batch
    route = replace(route, version="1")
    whole = gateway.backends["tfserving"].infer(route, x)
    sliced = TFServingBackend("tfserving", gateway.config.with_backend("tfserving", max_batch_size=1)
                              .backends["tfserving"])
    sizes = []
    infer_batch = sliced.infer_batch
    sliced.infer_batch = lambda r, chunk: sizes.append(len(chunk)) or infer_batch(r, chunk)
    # a batch of 2 against two batches of 1 in the same TensorFlow: oneDNN picks kernels per batch
    # size and CPU (1.25e-6 apart on an AMD EPYC, so 1e-6 failed there)
    np.testing.assert_allclose(sliced.infer(route, x), whole, atol=SAME_ENGINE_ATOL)
    assert sizes == [1, 1]


class _Misbehaving(http.server.BaseHTTPRequestHandler):
    """Not TF Serving: answers that a broken proxy or server could give."""

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        model = self.path.split("/")[3].split(":")[0]
        if model == "slow":
            time.sleep(2)
        status, body = {"garbage": (200, b"<html>not json</html>"), "html500": (500, b"<h1>Internal</h1>"),
                        "nooutputs": (200, b'{"predictions": "?"}'), "internal": (500, b'{"error": "boom"}'),
                        "slow": (200, b"{}")}[model]
        try:
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):  # "slow": the client gave up, as intended
            pass

    def log_message(self, *args):
        pass


def test_tfserving_adapter_maps_garbage_and_timeouts():
    route = next(r for r in load_config(ROOT / "gateway.yaml").models["mobilenet_v2"].routes if r.name == "tfserving")
    x = np.zeros((1, 224, 224, 3), np.float32)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Misbehaving)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        settings = TFServingSettings(kind="tfserving", url=f"http://127.0.0.1:{server.server_port}", timeout_s=0.5)
        backend = TFServingBackend("tfserving", settings)
        named = replace(route, input_name="input_1", output_name="predictions")
        for model, error, match in (("garbage", BackendBadResponse, "not JSON"),
                                    ("html500", BackendBadResponse, "HTTP 500 without a TF Serving error body"),
                                    ("nooutputs", BackendBadResponse, "no usable 'predictions'"),
                                    ("internal", BackendBadResponse, "HTTP 500.*boom"),
                                    ("slow", BackendTimeout, "no answer within 0.5 s")):
            with pytest.raises(error, match=match):
                backend.infer(replace(named, backend_model=model), x[:1])
        backend.close()
    finally:
        server.shutdown()
        server.server_close()


def test_tfserving_docker_launcher_waits_for_readiness_through_the_adapter(tfserving_double):
    """`gateway backends up --docker tfserving` returns once the adapter finds the models ready
    (checked here against the double, since no Docker engine runs here)."""
    from gateway.ops.servers import docker as docker_launcher

    url, _ = tfserving_double
    config = load_config(ROOT / "gateway.yaml")
    docker_launcher.wait_ready("tfserving", config.with_backend("tfserving", url=url), timeout=30)
    down = config.with_backend("tfserving", url=f"http://127.0.0.1:{free_port()}")
    with pytest.raises(RuntimeError, match=r"tfserving at .*: models \['efficientnet_lite0', 'tfmobilenet'\] "
                                           r"not ready after 1 s"):
        docker_launcher.wait_ready("tfserving", down, timeout=1)
