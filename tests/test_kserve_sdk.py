"""KServe's own Python SDK (``kserve`` 0.21.0, requirements-kserve.txt) against a real
`gateway serve` with its gRPC front: REST and gRPC health, readiness, metadata (parsed by the
SDK's own pydantic models and its own gRPC stub), FP32 tensors (binary and JSON), BYTES photos,
the classification extension, a version naming a route, and errors read through the SDK's
exceptions.

The SDK lives in its own venv, ``.venv-kserve`` (made by `make setup`): kserve pins
protobuf < 7 (and its grpcio-tools needs it) and psutil < 6, where the project needs protobuf 7
(TensorFlow 2.21, tritonclient's gRPC) and has psutil 7. ``tests/kserve_sdk_client.py`` runs the
SDK there, once for every check, and prints JSON that these tests assert on.

The gateway here has two routes per model: ``embedded`` (ONNX Runtime in the gateway, needs
no server) and ``torchserve`` pointed at a port where nothing listens (the engine down, whether
or not a real TorchServe runs for other tests).

Tolerances: the same engine in another process (the gateway's) within SAME_ENGINE_ATOL on
probabilities, logits within SAME_WEIGHTS_ATOL (helpers.py gives the reasons).
"""
import json
import subprocess

import numpy as np
import pytest

from gateway.postprocess import softmax

from conftest import ROOT, free_port, load_yaml_config
from helpers import CAT, CAT_LABELS, COFFEE, SAME_ENGINE_ATOL, SAME_WEIGHTS_ATOL, classify, preprocessed

KSERVE_PYTHON = ROOT / ".venv-kserve" / "bin" / "python"
CLIENT = ROOT / "tests" / "kserve_sdk_client.py"
MODEL = "efficientnet_lite0"
# the gateway below keeps the routes on these two engines (the int8 route is embedded too)
ROUTES = [r.get("name", r["backend"]) for r in load_yaml_config()["models"][MODEL]["routes"]
          if r["backend"] in ("embedded", "torchserve")]
TENSOR_CHECKS = ["rest-infer-binary", "rest-infer-json", "rest-infer-binary-outputs", "grpc-infer-binary",
                 "grpc-infer-json"]
PHOTO_CHECKS = ["rest-photos", "grpc-photos"]
CLASSIFICATION_CHECKS = ["rest-photos-classification", "grpc-photos-classification"]
# check -> (SDK exception, HTTP status or gRPC code, words of the server's message)
ERRORS = {
    "rest-unknown-model": ("httpx.HTTPStatusError", 404, "unknown model 'nope'"),
    "grpc-unknown-model": ("grpc.aio.AioRpcError", "NOT_FOUND", "unknown model 'nope'"),  # before any other check
    "rest-wrong-shape": ("httpx.HTTPStatusError", 400, "has shape [-1, 3, 224, 224], got [2, 3, 32, 32]"),
    "grpc-wrong-shape": ("grpc.aio.AioRpcError", "INVALID_ARGUMENT", "has shape [-1, 3, 224, 224], got [2, 3, 32, 32]"),
    "rest-engine-down": ("httpx.HTTPStatusError", 503, "backend 'torchserve': cannot connect"),
    "grpc-engine-down": ("grpc.aio.AioRpcError", "UNAVAILABLE", "backend 'torchserve': cannot connect"),
    "grpc-model-ready-unknown": ("grpc.aio.AioRpcError", "NOT_FOUND", "unknown model 'nope'"),
    "rest-model-name-disagrees": ("httpx.HTTPStatusError", 400,
                                  f"model_name 'mobilenet_v2' disagrees with the URL's model '{MODEL}'"),
}
CHECKS = ["rest-health", "grpc-health", "rest-metadata", "grpc-metadata", *TENSOR_CHECKS, *PHOTO_CHECKS,
          *CLASSIFICATION_CHECKS, "rest-version", "grpc-version", *ERRORS]


@pytest.fixture(scope="module")
def kserve_gateway(start_gateway):
    """(REST base URL, gRPC host:port) of `gateway serve` with the embedded route and a dead torchserve."""
    config = load_yaml_config()
    dead = f"http://127.0.0.1:{free_port()}"
    config["backends"] = {"embedded": config["backends"]["embedded"],
                          "torchserve": {**config["backends"]["torchserve"], "url": dead, "management_url": dead,
                                         "connect_timeout_s": 0.5}}
    for model in config["models"].values():
        model["routes"] = [r for r in model["routes"] if r["backend"] in config["backends"]]
    grpc_port = free_port()
    return start_gateway(config, workers=1, grpc_port=grpc_port), f"127.0.0.1:{grpc_port}"


@pytest.fixture(scope="module")
def batch(api, photos) -> np.ndarray:
    """chelsea and coffee preprocessed as efficientnet_lite0 declares it (NCHW FP32)."""
    return preprocessed(api.gateway, MODEL, "embedded", photos)[1]


@pytest.fixture(scope="module")
def sdk(kserve_gateway, batch, photos, tmp_path_factory) -> dict:
    """Every check's result: one run of the SDK in its venv."""
    if not KSERVE_PYTHON.exists():
        pytest.fail(f"{KSERVE_PYTHON} is missing: `make setup` makes it (requirements-kserve.txt)")
    folder = tmp_path_factory.mktemp("kserve")
    np.save(folder / "batch.npy", batch)
    paths = []
    for name, data in zip(("chelsea.jpg", "coffee.jpg"), photos):
        (folder / name).write_bytes(data)
        paths += ["--photo", str(folder / name)]
    rest, grpc = kserve_gateway
    done = subprocess.run([str(KSERVE_PYTHON), str(CLIENT), "--rest", rest, "--grpc", grpc,
                           "--tensor", str(folder / "batch.npy"), *paths, *CHECKS],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    results = json.loads(done.stdout)
    assert list(results) == CHECKS
    return results


def ok(result: dict) -> dict:
    assert "exception" not in result, result
    return result


def logits(result: dict) -> np.ndarray:
    output = ok(result)["outputs"]["logits"]
    assert output["datatype"] == "FP32" and output["shape"] == [2, 1000]
    return np.asarray(output["data"], dtype=np.float32)


def backend(result: dict) -> str:
    """REST answers parameters as JSON, gRPC as InferParameters."""
    value = result["parameters"]["backend"]
    return value["stringParam"] if isinstance(value, dict) else value


@pytest.fixture(scope="module")
def reference(api, photos) -> np.ndarray:
    """The embedded route's probabilities for [chelsea, coffee] through the JSON API, in this process."""
    rows = []
    for photo in photos:
        resp = classify(api, photo, MODEL, route="embedded", top_k=1000)
        assert resp.status_code == 200, resp.text
        row = np.zeros(1000)
        for p in resp.json()["results"][0]["predictions"]:
            row[p["index"]] = p["score"]
        rows.append(row)
    return np.array(rows)


def test_kserve_sdk_health_and_readiness(sdk):
    assert ok(sdk["rest-health"]) == {"live": True, "ready": True, f"model_ready {MODEL}": True,
                                      f"model_ready {MODEL}/versions/embedded": True,
                                      f"model_ready {MODEL}/versions/torchserve": False,  # its engine is down
                                      "model_ready nope": False}
    assert ok(sdk["grpc-health"]) == {"live": True, "ready": True, f"model_ready {MODEL}": True,
                                      f"model_ready {MODEL}_image": True}


def test_kserve_sdk_metadata_parses_with_the_sdks_own_models(sdk):
    rest = ok(sdk["rest-metadata"])
    for name, parsed in rest.items():
        assert parsed["round_trip"], (name, parsed)  # the SDK's pydantic model holds every field, strictly typed
    extensions = set(rest["server"]["parsed"]["extensions"])
    assert {"binary_tensor_data", "classification", "model_configuration"} <= extensions
    tensor, images = rest[MODEL]["parsed"], rest[MODEL + "_image"]["parsed"]
    assert tensor["versions"] == ROUTES and rest[f"{MODEL}/versions/embedded"]["parsed"] == tensor
    assert tensor["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 3, 224, 224]}]
    assert tensor["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, 1000]}]
    assert images["inputs"] == [{"name": "image", "datatype": "BYTES", "shape": [-1, 1]}]
    assert rest["model_ready"]["parsed"] == {"name": MODEL, "ready": True}

    grpc = ok(sdk["grpc-metadata"])  # the SDK's own stub and proto (int64 shapes as JSON strings)
    assert grpc["server"] == rest["server"]["parsed"]
    for name in (MODEL, MODEL + "_image", f"{MODEL}/embedded"):
        meta = grpc[name]
        for tensors in (meta["inputs"], meta["outputs"]):
            for t in tensors:
                t["shape"] = [int(d) for d in t["shape"]]
        assert meta == rest[name.replace("/", "/versions/")]["parsed"]


@pytest.mark.parametrize("check", TENSOR_CHECKS)
def test_kserve_sdk_infers_fp32_tensors(sdk, reference, check):
    result = sdk[check]
    got = softmax(logits(result))
    assert got[0].argmax() in CAT and got[1].argmax() in COFFEE
    np.testing.assert_allclose(got, reference, atol=SAME_ENGINE_ATOL)
    assert result["model_name"] == MODEL and backend(result) == "embedded"  # no version: the first route answers
    if check.startswith("grpc"):
        assert result["model_version"] == "embedded"


@pytest.mark.parametrize("check", PHOTO_CHECKS)
def test_kserve_sdk_sends_photos_as_bytes(sdk, reference, check):
    """The photos' own bytes as a BYTES [2, 1] tensor (binary): the gateway preprocesses them."""
    got = softmax(logits(sdk[check]))
    assert got[0].argmax() in CAT and got[1].argmax() in COFFEE
    np.testing.assert_allclose(got, reference, atol=SAME_ENGINE_ATOL)
    assert sdk[check]["model_name"] == MODEL + "_image"


@pytest.mark.parametrize("check", CLASSIFICATION_CHECKS)
def test_kserve_sdk_classification_extension(sdk, check):
    output = ok(sdk[check])["outputs"]["logits"]
    assert output["datatype"] == "BYTES" and output["shape"] == [2, 3]
    scores = logits(sdk[check.removesuffix("-classification")])
    for row, classes, row_scores in zip(output["data"], (CAT, COFFEE), scores):
        parsed = [(float(v), int(i), label) for v, i, label in (text.split(":", 2) for text in row)]
        assert [i for _, i, _ in parsed] == list(np.argsort(-row_scores)[:3])  # best first
        assert parsed[0][1] in classes
        # printed as %f (6 decimals) from another request: logits move up to SAME_WEIGHTS_ATOL
        np.testing.assert_allclose([v for v, _, _ in parsed], np.sort(row_scores)[::-1][:3], atol=SAME_WEIGHTS_ATOL)
    assert output["data"][0][0].split(":", 2)[2] in CAT_LABELS


def test_kserve_sdk_model_version_names_a_route(sdk, reference):
    grpc, rest = ok(sdk["grpc-version"]), ok(sdk["rest-version"])
    assert grpc["model_version"] == "embedded" and backend(grpc) == "embedded"
    # over REST the SDK reaches a version by the URL (model_name="m/versions/v") and its
    # InferResponse.from_bytes drops the answer's model_version: the backend parameter says who answered
    assert backend(rest) == "embedded"
    for result in (grpc, rest):
        np.testing.assert_allclose(softmax(logits(result)), reference, atol=SAME_ENGINE_ATOL)


@pytest.mark.parametrize("check", list(ERRORS))
def test_kserve_sdk_errors_carry_the_servers_message(sdk, check):
    exception, status, words = ERRORS[check]
    result = sdk[check]
    assert result.get("exception") == exception, result
    if exception == "httpx.HTTPStatusError":
        assert result["status"] == status and words in result["message"], result
    else:
        assert result["code"] == status and words in result["details"], result
