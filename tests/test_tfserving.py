"""The TF Serving adapter against a protocol-faithful TEST DOUBLE (tests/tfserving_double.py),
and against the real tensorflow/serving image when a Docker engine is reachable.

No tensorflow_model_server binary exists on this machine's package registries, so the double
(real SavedModels, real TensorFlow, TF Serving's REST shapes and error bodies) stands in.
"""
import os
import shutil
import subprocess
import sys
import textwrap
import time
from dataclasses import replace

import numpy as np
import pytest
import requests

from conftest import ROOT, free_port, load_yaml_config, preprocessed
from gateway.config import load_config
from gateway.errors import BackendRejected, BackendUnavailable
from gateway.service import Gateway

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
TFSERVING_IMAGE = "tensorflow/serving:2.18.0"

V2_MODEL = textwrap.dedent("""
    import sys, tensorflow as tf
    class M(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, 224, 224, 3], tf.float32, name="input_1")])
        def serve(self, input_1):
            n = tf.shape(input_1)[0]
            logits = tf.one_hot(tf.fill([n], 7), 1000) * 10.0 + tf.reduce_mean(input_1) * 0.0
            return {"predictions": tf.nn.softmax(logits)}
    m = M()
    tf.saved_model.save(m, sys.argv[1], signatures={"serving_default": m.serve})
""")


@pytest.fixture(scope="module")
def tfserving_models(tmp_path_factory):
    """tfmobilenet/1 = the real SavedModel; tfmobilenet/2 = a tiny model that always says class 7."""
    models = tmp_path_factory.mktemp("tfserving_models")
    (models / "tfmobilenet").mkdir()
    os.symlink(ROOT / "tfserving/models/tfmobilenet/1", models / "tfmobilenet" / "1")
    subprocess.run([sys.executable, "-c", V2_MODEL, str(models / "tfmobilenet" / "2")], check=True,
                   capture_output=True, timeout=180)
    return models


@pytest.fixture(scope="module")
def tfserving_double(tfserving_models):
    port, grpc_port = free_port(), free_port()
    log = open(ROOT / "run" / "tests" / "tfserving_double.log", "wb")
    proc = subprocess.Popen([sys.executable, str(ROOT / "tests/tfserving_double.py"), "--models-dir",
                             str(tfserving_models), "--port", str(port), "--grpc-port", str(grpc_port)],
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if requests.get(f"{url}/v1/models/tfmobilenet", timeout=1).ok:
                break
        except requests.ConnectionError:
            time.sleep(0.3)
    else:
        proc.kill()
        pytest.fail(f"TF Serving double did not start: {(ROOT / 'run/tests/tfserving_double.log').read_text()[-2000:]}")
    yield url, grpc_port
    proc.terminate()
    proc.wait(10)
    log.close()


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
    np.testing.assert_allclose(via_double, in_process(x), atol=1e-5)
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
        backend.infer(replace(route, model="resnet_unknown"), x)
    with pytest.raises(BackendRejected, match="tfserving"):
        backend.infer(replace(route, version="1"), x[:, :100])  # wrong shape: TF Serving's 400
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
    options = {**config.backends["tfserving"].options, "protocol": "grpc", "grpc_url": f"127.0.0.1:{grpc_port}"}
    gw = Gateway(config.with_backend("tfserving", url=url, options=options))
    out = gw.backends["tfserving"].infer(replace(route, version="1"), np.concatenate([x] * 4))  # 8 images: > 4 MB
    np.testing.assert_allclose(out[:2], in_process(x), atol=1e-5)
    with pytest.raises(BackendUnavailable, match="Servable not found"):
        gw.backends["tfserving"].infer(replace(route, version="9"), x)


def test_tfserving_through_the_gateway_http(tfserving_double, start_gateway, chelsea_jpeg, batch):
    url, _ = tfserving_double
    config = load_yaml_config()
    config["backends"]["tfserving"]["url"] = url
    for route in config["models"]["mobilenet_v2"]["routes"]:
        if route["backend"] == "tfserving":
            route["version"] = 1
    gateway_url = start_gateway(config)
    resp = requests.post(f"{gateway_url}/v1/models/mobilenet_v2/classify", params={"backend": "tfserving"},
                         data=chelsea_jpeg, headers={"Content-Type": "image/jpeg"}, timeout=60)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["backend"] == "tfserving"
    expected = in_process(batch[1][:1])[0]
    assert [p["index"] for p in body["results"][0]["predictions"]] == list(np.argsort(-expected)[:5])
    assert body["results"][0]["predictions"][0]["score"] == pytest.approx(float(expected.max()), abs=1e-5)


def test_tfserving_real_image_through_docker(batch):
    """The real tensorflow/serving image, when a Docker engine is reachable."""
    try:
        import docker

        client = docker.from_env(timeout=5)
        client.ping()
    except Exception as exc:
        pytest.skip(f"no Docker engine reachable ({type(exc).__name__}: {str(exc)[:120]}): "
                    f"the real TF Serving image cannot run here; the adapter is tested against the double")
    port = free_port()
    container = client.containers.run(
        TFSERVING_IMAGE, detach=True, remove=True, ports={"8501/tcp": ("127.0.0.1", port)},
        volumes={str(ROOT / "tfserving"): {"bind": "/tfserving", "mode": "ro"}},
        command=["--model_config_file=/tfserving/models.conf"])
    try:
        config = load_config(ROOT / "gateway.yaml").with_backend("tfserving", url=f"http://127.0.0.1:{port}")
        gw = Gateway(config)
        route, x = batch
        deadline = time.monotonic() + 120
        while not gw.backends["tfserving"].ready(route) and time.monotonic() < deadline:
            time.sleep(1)
        np.testing.assert_allclose(gw.backends["tfserving"].infer(route, x), in_process(x), atol=1e-5)
    finally:
        container.stop(timeout=5)
        shutil.rmtree(ROOT / "run" / "tfserving", ignore_errors=True)
