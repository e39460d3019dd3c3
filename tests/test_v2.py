"""The Open Inference Protocol (KServe V2) front, REST and gRPC, with the real clients.

tritonclient.http and tritonclient.grpc (sync and async, JSON and binary, classification, a
batch above the engines' max_batch_size) against a real `gateway serve` whose
efficientnet_lite0 routes reach the embedded ONNX Runtime, the real Triton (its libtorch and
TensorFlow stand-ins), the real TorchServe and the TF Serving TEST DOUBLE; the same tensor
sent to Triton directly and through the gateway; malformed requests through the app's test
client (REST) and an in-process gRPC server.

Tolerances: probabilities from two engines running the same weights within SAME_WEIGHTS_ATOL,
from one engine within SAME_ENGINE_ATOL (helpers.py gives the reasons).
"""
import json
import time

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tritonclient.utils import InferenceServerException

from gateway.postprocess import softmax
from gateway.tools.local_gateway import free_port

from conftest import config_of, load_yaml_config
from helpers import CAT, COFFEE, SAME_ENGINE_ATOL, SAME_WEIGHTS_ATOL, preprocessed

MODEL = "efficientnet_lite0"
ROUTES = ["embedded", "triton", "torchserve", "triton-tf", "tfserving"]  # the FP32 engines: the same answer
VERSIONS = [r.name for r in config_of().models[MODEL].routes]  # every route, int8 ones included
PROTOCOLS = ["http", "grpc"]


# -- a real gateway process with every engine behind it ---------------------------------------
@pytest.fixture(scope="module")
def v2_gateway(triton_server, torchserve_server, tfserving_double, start_gateway):
    """(HTTP URL host:port, gRPC host:port) of `gateway serve` with its gRPC front on."""
    config = load_yaml_config()
    config["backends"]["tfserving"]["url"] = tfserving_double[0]
    grpc_port = free_port()
    url = start_gateway(config, workers=1, threads=8, grpc_port=grpc_port)
    return url.removeprefix("http://"), f"127.0.0.1:{grpc_port}"


def client(v2_gateway, protocol: str):
    http_url, grpc_url = v2_gateway
    return httpclient.InferenceServerClient(http_url, concurrency=4) if protocol == "http" else \
        grpcclient.InferenceServerClient(grpc_url)


def lib(protocol: str):
    return httpclient if protocol == "http" else grpcclient


@pytest.fixture(scope="module")
def tensors(api, photos):
    """chelsea and coffee preprocessed as efficientnet_lite0 declares it (NCHW FP32)."""
    return preprocessed(api.gateway, MODEL, "embedded", photos)[1]


def infer(cl, protocol: str, batch: np.ndarray, version: str = "", binary: bool = True, classes: int = 0,
          model: str = MODEL, input_name: str = "input", datatype: str = "FP32", output_name: str = "logits"):
    mod = lib(protocol)
    tensor = mod.InferInput(input_name, list(batch.shape), datatype)
    output_kw = {"class_count": classes}
    if protocol == "http":
        tensor.set_data_from_numpy(batch, binary_data=binary)
        output_kw["binary_data"] = binary
    else:
        tensor.set_data_from_numpy(batch)
    outputs = [mod.InferRequestedOutput(output_name, **output_kw)]
    return cl.infer(model, [tensor], model_version=version, outputs=outputs)


def probabilities(result, output_name: str = "logits") -> np.ndarray:
    return softmax(result.as_numpy(output_name))


# -- metadata, config, health ---------------------------------------------------------------------
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_v2_health_server_and_model_metadata_and_config(v2_gateway, protocol):
    cl = client(v2_gateway, protocol)
    assert cl.is_server_live() and cl.is_server_ready()
    assert cl.is_model_ready(MODEL) and cl.is_model_ready(MODEL, "triton")
    server = cl.get_server_metadata(**({"as_json": True} if protocol == "grpc" else {}))
    assert {"binary_tensor_data", "classification", "model_configuration"} <= set(server["extensions"])
    meta = cl.get_model_metadata(MODEL, **({"as_json": True} if protocol == "grpc" else {}))
    assert meta["versions"] == VERSIONS and set(ROUTES) <= set(VERSIONS)
    assert [(i["name"], i["datatype"], [int(d) for d in i["shape"]]) for i in meta["inputs"]] == \
        [("input", "FP32", [-1, 3, 224, 224])]
    assert [(o["name"], o["datatype"], [int(d) for d in o["shape"]]) for o in meta["outputs"]] == \
        [("logits", "FP32", [-1, 1000])]
    config = cl.get_model_config(MODEL + "_image", **({"as_json": True} if protocol == "grpc" else {}))
    config = config.get("config", config)
    assert int(config["max_batch_size"]) == 64
    assert [(i["name"], i["data_type"], [int(d) for d in i["dims"]]) for i in config["input"]] == \
        [("image", "TYPE_STRING", [1])]
    nchw = cl.get_model_config(MODEL, **({"as_json": True} if protocol == "grpc" else {}))
    assert nchw.get("config", nchw)["input"][0]["format"] == "FORMAT_NCHW"
    with pytest.raises(InferenceServerException, match="no version 'nope'"):
        cl.get_model_metadata(MODEL, "nope")
    with pytest.raises(InferenceServerException, match="unknown model"):
        cl.get_model_metadata("nope")


# -- every engine behind the same V2 model ---------------------------------------------------------
@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("route", ROUTES)
def test_v2_tensor_reaches_every_engine_with_the_embedded_answer(v2_gateway, tensors, protocol, route):
    cl = client(v2_gateway, protocol)
    embedded = probabilities(infer(cl, protocol, tensors, "embedded"))
    result = infer(cl, protocol, tensors, route)
    response = result.get_response(**({"as_json": True} if protocol == "grpc" else {}))
    assert response["model_version"] == route  # the route that answered
    got = probabilities(result)
    assert got.shape == (2, 1000)
    assert got[0].argmax() in CAT and got[1].argmax() in COFFEE
    np.testing.assert_allclose(got, embedded, atol=SAME_WEIGHTS_ATOL)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_v2_json_and_binary_tensors_and_no_version_give_one_answer(v2_gateway, tensors, protocol):
    cl = client(v2_gateway, protocol)
    binary = probabilities(infer(cl, protocol, tensors, "embedded"))
    if protocol == "http":  # JSON tensors in and out
        np.testing.assert_allclose(probabilities(infer(cl, protocol, tensors, "embedded", binary=False)), binary,
                                   atol=SAME_ENGINE_ATOL)
    default = infer(cl, protocol, tensors)  # no version: the routes in order, with failover
    assert default.get_response(**({"as_json": True} if protocol == "grpc" else {}))["model_version"] == "embedded"
    np.testing.assert_allclose(probabilities(default), binary, atol=SAME_ENGINE_ATOL)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_v2_async_clients(v2_gateway, tensors, protocol):
    cl = client(v2_gateway, protocol)
    mod = lib(protocol)
    results = []
    for route in ("embedded", "triton"):
        tensor = mod.InferInput("input", list(tensors.shape), "FP32")
        tensor.set_data_from_numpy(tensors)
        if protocol == "http":
            results.append(cl.async_infer(MODEL, [tensor], model_version=route).get_result(timeout=120))
        else:
            done: list = []
            cl.async_infer(MODEL, [tensor], lambda result, error, done=done: done.append((result, error)),
                           model_version=route)
            for _ in range(1200):
                if done:
                    break
                time.sleep(0.1)
            result, error = done[0]
            assert error is None, error
            results.append(result)
    np.testing.assert_allclose(probabilities(results[1]), probabilities(results[0]), atol=SAME_WEIGHTS_ATOL)


@pytest.mark.parametrize(("protocol", "binary"), [("http", True), ("http", False), ("grpc", True)])  # gRPC: bytes
def test_v2_classification_extension(v2_gateway, tensors, protocol, binary):
    cl = client(v2_gateway, protocol)
    result = infer(cl, protocol, tensors, "triton", binary=binary, classes=3)
    rows = result.as_numpy("logits")
    assert rows.shape == (2, 3)
    logits = infer(cl, protocol, tensors, "triton").as_numpy("logits")
    for row, classes, scores in zip(rows, (CAT, COFFEE), logits):
        texts = [e.decode() if isinstance(e, bytes) else e for e in row]  # JSON answers strings
        parsed = [(float(v), int(i), label) for v, i, label in (t.split(":", 2) for t in texts)]
        assert [i for _, i, _ in parsed] == list(np.argsort(-scores)[:3])
        assert parsed[0][1] in classes and parsed[0][2]  # value:index:label, best first
        np.testing.assert_allclose([v for v, _, _ in parsed], np.sort(scores)[::-1][:3], atol=1e-6)  # %f: 6 decimals


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("route", ["triton", "tfserving", "torchserve"])
def test_v2_batch_above_the_engines_max_batch_size(v2_gateway, tensors, protocol, route):
    """10 images: Triton and the TF Serving double take 8 per call, TorchServe 16 (one call there)."""
    cl = client(v2_gateway, protocol)
    batch = np.ascontiguousarray(np.concatenate([tensors] * 5))
    got = probabilities(infer(cl, protocol, batch, route))
    assert got.shape == (10, 1000)
    single = probabilities(infer(cl, protocol, tensors, route))
    np.testing.assert_allclose(got, np.concatenate([single] * 5), atol=SAME_ENGINE_ATOL)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_v2_encoded_images_are_preprocessed_by_the_gateway(v2_gateway, photos, api, protocol):
    """M_image takes the photo's bytes as BYTES [B, 1], as ensemble_image_client.py sends them."""
    cl = client(v2_gateway, protocol)
    batch = np.array([[p] for p in photos], dtype=np.object_)
    for route in ("embedded", "torchserve"):
        result = infer(cl, protocol, batch, route, model=MODEL + "_image", input_name="image", datatype="BYTES")
        got = probabilities(result)
        assert got[0].argmax() in CAT and got[1].argmax() in COFFEE
        answer = api.gateway.infer(MODEL, photos, options={"top_k": 5}, route="embedded")  # the JSON API's answer
        for row, predictions in zip(got, answer.results):
            np.testing.assert_allclose([row[p["index"]] for p in predictions], [p["score"] for p in predictions],
                                       atol=SAME_WEIGHTS_ATOL)


def test_v2_same_tensor_direct_to_triton_and_through_the_gateway(v2_gateway, triton_server, tensors):
    host, port = triton_server.backends["triton"].url.removeprefix("http://").rsplit(":", 1)
    direct_clients = {"http": httpclient.InferenceServerClient(f"{host}:{port}"),
                      "grpc": grpcclient.InferenceServerClient(f"{host}:{int(port) + 1}")}  # Triton's gRPC port
    for protocol, direct_client in direct_clients.items():
        through = probabilities(infer(client(v2_gateway, protocol), protocol, tensors, "triton"))
        # Triton's own names for efficientnet_lite0's tensors (model_repository/efficientnet_lite0/config.pbtxt)
        direct = probabilities(infer(direct_client, protocol, tensors, input_name="input__0", output_name="output__0"),
                               "output__0")
        # one engine, the same input, the same batch of 2
        np.testing.assert_allclose(through, direct, atol=SAME_ENGINE_ATOL)


def test_v2_grpc_stream_infer(v2_gateway, tensors):
    cl = grpcclient.InferenceServerClient(v2_gateway[1])
    answers = []
    cl.start_stream(lambda result, error: answers.append((result, error)))
    tensor = grpcclient.InferInput("input", list(tensors.shape), "FP32")
    tensor.set_data_from_numpy(tensors)
    cl.async_stream_infer(MODEL, [tensor], model_version="embedded")
    cl.async_stream_infer(MODEL, [tensor], model_version="nope")
    cl.stop_stream()
    assert len(answers) == 2
    assert probabilities(answers[0][0])[0].argmax() in CAT
    assert answers[1][0] is None and "no version 'nope'" in str(answers[1][1])


# -- malformed requests: REST through the app, gRPC in process ------------------------------------
def body(inputs, outputs=None, **extra) -> bytes:
    payload = {"inputs": inputs, **({"outputs": outputs} if outputs is not None else {}), **extra}
    return json.dumps(payload).encode()


def fp32(shape, data=None, name="input", **extra) -> dict:
    count = int(np.prod(shape))
    return {"name": name, "datatype": "FP32", "shape": shape, "data": [0.0] * count if data is None else data,
            **extra}


SMALL = [1, 3, 224, 224]
MALFORMED = {  # case: (body, header length or None, expected status, words in the message)
    "wrong shape": (body([fp32([1, 3, 2, 2])]), None, 400, "has shape [-1, 3, 224, 224]"),
    "NHWC shape for an NCHW model": (body([fp32([1, 224, 224, 3])]), None, 400, "has shape"),
    "wrong datatype": (body([{**fp32(SMALL, [0] * 150528), "datatype": "INT32"}]), None, 400, "is FP32, got INT32"),
    "unknown datatype": (body([{**fp32(SMALL), "datatype": "FLOAT"}]), None, 400, "is FP32, got FLOAT"),
    "data count differs from shape": (body([fp32(SMALL, [0.0] * 10)]), None, 400, "holds 150528 elements"),
    "strings for FP32": (body([fp32(SMALL, ["a"] * 150528)]), None, 400, "must hold numbers, got str"),
    "unknown input": (body([fp32(SMALL, name="images")]), None, 400, "no input 'images'"),
    "two inputs": (body([fp32(SMALL), fp32(SMALL)]), None, 400, "exactly one input"),
    "no inputs": (body([]), None, 400, "non-empty list"),
    "unknown output": (body([fp32(SMALL)], [{"name": "probs"}]), None, 400, "no output 'probs'"),
    "bad classification": (body([fp32(SMALL)], [{"name": "logits", "parameters": {"classification": "3"}}]),
                           None, 400, "classification must be a positive integer"),
    "unknown key": (body([fp32(SMALL)], extra="x"), None, 400, "unknown key 'extra'"),
    "unknown parameter": (body([fp32(SMALL)], parameters={"sequence_id": 1}), None, 400,
                          "unknown request parameter 'sequence_id'"),
    "bad priority": (body([fp32(SMALL)], parameters={"priority": "high"}), None, 400, "non-negative integer"),
    "binary_data_output not a flag": (body([fp32(SMALL)], parameters={"binary_data_output": "no"}), None, 400,
                                      "must be true or false"),
    "huge dims and no data": (body([fp32([0, 2**62], [])]), None, 400, "shape must be"),
    "too many dims": (body([fp32([1] * 70, [1.0])]), None, 400, "shape must be"),
    "wrong shape, big data": (body([fp32([200_000], [0.0] * 200_000)]), None, 400, "has shape"),
    "nested deeper than the shape": (body([{"name": "image", "datatype": "BYTES", "shape": [1],
                                            "data": [[["x"]]]}]), None, 400, "model"),
    "out of range for INT8": (body([{"name": "input", "datatype": "INT8", "shape": [1], "data": [300]}]),
                              None, 400, "is FP32, got INT8"),
    "invalid JSON": (b"{not json", None, 400, "not valid"),
    "not an object": (b"[1, 2]", None, 400, "must be a JSON object"),
    "short binary body": (None, "short", 400, "binary_data_size"),
    "bytes after the tensors": (None, "long", 400, "after the binary tensors"),
    "header length beyond the body": (b"{}", "999", 400, "Inference-Header-Content-Length"),
    "header length not ASCII digits": (b"{}", "\u00b2", 400, "Inference-Header-Content-Length"),
    "negative shape": (body([fp32([-1, 3, 224, 224], [])]), None, 400, "shape must be"),
    "batch of 0": (body([fp32([0, 3, 224, 224], [])]), None, 400, "holds no image"),
}


def binary_case(kind: str) -> tuple[bytes, str]:
    data = np.zeros(SMALL, np.float32).tobytes()
    header = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": SMALL,
                                     "parameters": {"binary_data_size": len(data)}}]}).encode()
    payload = header + (data[:-7] if kind == "short" else data + b"extra")
    return payload, str(len(header))


@pytest.mark.parametrize(("data", "datatype", "shape", "words"), [
    ([1.5, 2.0], "INT32", [2], "must hold integers, got float64"),
    ([300], "INT8", [1], "outside INT8's range"),
    (["1.5"], "FP32", [1], "must hold numbers, got str"),
    ([[1.0], [1.0, 2.0]], "FP32", [2, 2], "(nested) list of numbers"),
    ([None], "FP32", [1], "must hold numbers, got object"),
    ([[["x"]]], "BYTES", [1], "nested deeper than its 1-dimensional shape"),
    (["a", "b"], "BYTES", [3], "holds 3 elements, the data 2"),
    ([1.0], "FLOAT", [1], "unknown datatype"),
])
def test_v2_json_data_is_checked_against_its_datatype_and_shape(data, datatype, shape, words):
    from gateway.errors import BadRequest
    from gateway.v2.tensors import from_list

    with pytest.raises(BadRequest, match=words.replace("(", r"\(").replace(")", r"\)")):
        from_list(data, datatype, shape, "inputs[0]")


def test_v2_binary_bytes_elements_stop_at_the_shapes_count():
    from gateway.errors import BadRequest
    from gateway.v2.tensors import from_buffer, join_bytes

    assert from_buffer(join_bytes([b"a", b""]), "BYTES", [2, 1], "x") == [b"a", b""]
    with pytest.raises(BadRequest, match="holds 1 elements, the data more"):
        from_buffer(join_bytes([b""] * 1_000_000), "BYTES", [1, 1], "x")  # refused at the second element


@pytest.fixture(scope="module")
def v2_api(make_api):
    """The app with embedded routes only (nothing here needs a server)."""
    config = load_yaml_config()
    config["backends"] = {"embedded": config["backends"]["embedded"],
                          "triton": {"kind": "triton", "url": f"http://127.0.0.1:{free_port()}",
                                     "connect_timeout_s": 0.5, "timeout_s": 2}}
    for model in config["models"].values():
        model["routes"] = [r for r in model["routes"] if r["backend"] == "embedded"]
    config["models"]["efficientnet_lite0"]["routes"].append({"backend": "triton"})
    return make_api(config)


@pytest.mark.parametrize("case", list(MALFORMED))
def test_v2_malformed_requests_answer_4xx_in_v2_shape(v2_api, case):
    payload, header_length, status, words = MALFORMED[case]
    if payload is None:
        payload, header_length = binary_case(header_length)
    headers = {} if header_length is None else {"Inference-Header-Content-Length": header_length}
    resp = v2_api.post(f"/v2/models/{MODEL}/infer", data=payload, headers=headers)
    assert resp.status_code == status, resp.text
    error = resp.json()
    assert set(error) == {"error"} and isinstance(error["error"], str) and words in error["error"], error


def test_v2_unknown_model_version_and_routes_answer_404_in_v2_shape(v2_api):
    for path in ("/v2/models/nope", "/v2/models/nope/infer", f"/v2/models/{MODEL}/versions/nope",
                 f"/v2/models/{MODEL}/versions/nope/config", "/v2/nothing"):
        method = v2_api.post if path.endswith("infer") else v2_api.get
        resp = method(path, data=body([fp32(SMALL)]))
        assert resp.status_code == 404, (path, resp.text)
        assert isinstance(resp.json()["error"], str)
    resp = v2_api.get(f"/v2/models/{MODEL}/infer")
    assert resp.status_code == 405 and "POST" in resp.headers["Allow"] and isinstance(resp.json()["error"], str)


def test_v2_backend_down_is_a_503_naming_it_and_failover_answers(v2_api):
    payload = body([fp32(SMALL)])
    resp = v2_api.post(f"/v2/models/{MODEL}/versions/triton/infer", data=payload)
    assert resp.status_code == 503 and "'triton'" in resp.json()["error"], resp.text
    not_ready = v2_api.get(f"/v2/models/{MODEL}/versions/triton/ready")
    # the status carries the answer; the body is the protocol's error, as the OpenAPI declares for 503
    assert not_ready.status_code == 503 and set(not_ready.json()) == {"error"}
    assert "version 'triton' is not ready" in not_ready.json()["error"]
    ok = v2_api.post(f"/v2/models/{MODEL}/infer", data=payload)  # no version: embedded answers first
    assert ok.status_code == 200 and ok.json()["model_version"] == "embedded"


def test_v2_raw_body_and_classification_for_a_detector(v2_api, scene_photos):
    resp = v2_api.post(f"/v2/models/{MODEL}_image/infer", data=scene_photos["chelsea"],
                       headers={"Inference-Header-Content-Length": "0"})  # the whole body is the one input
    assert resp.status_code == 200, resp.text
    assert int(np.argmax(resp.json()["outputs"][0]["data"])) in CAT
    resp = v2_api.post("/v2/models/yolox_nano/infer", data=body(
        [fp32([1, 3, 416, 416])], [{"name": "output", "parameters": {"classification": 2}}]))
    assert resp.status_code == 400 and "has no classification" in resp.json()["error"]
    meta = v2_api.get("/v2/models/yolox_nano").json()
    assert meta["outputs"] == [{"name": "output", "datatype": "FP32", "shape": [-1, 3549, 85]}]
    ok = v2_api.post("/v2/models/yolox_nano/infer", data=body([fp32([1, 3, 416, 416])]))
    assert ok.status_code == 200 and ok.json()["outputs"][0]["shape"] == [1, 3549, 85]
    bad = v2_api.post(f"/v2/models/{MODEL}_image/infer", data=b"not an image",
                      headers={"Inference-Header-Content-Length": "0"})
    assert bad.status_code == 400 and "image" in bad.json()["error"]


@pytest.fixture(scope="module")
def v2_grpc(v2_api):
    from gateway.v2 import grpc_server

    port = free_port()
    server = grpc_server.start(v2_api.app.extensions["v2"], f"127.0.0.1:{port}")
    yield grpcclient.InferenceServerClient(f"127.0.0.1:{port}")
    server.stop(0)


def test_v2_grpc_malformed_requests_and_faults(v2_grpc):
    def call(shape, datatype="FP32", version="", name="input", model=MODEL, output="logits"):
        tensor = grpcclient.InferInput(name, shape, datatype)
        tensor.set_data_from_numpy(np.zeros(shape, np.float32 if datatype == "FP32" else np.int32))
        return v2_grpc.infer(model, [tensor], model_version=version, outputs=[grpcclient.InferRequestedOutput(output)])

    for kwargs, code, words in (({"shape": [1, 3, 2, 2]}, "INVALID_ARGUMENT", "has shape"),
                                ({"shape": SMALL, "datatype": "INT32"}, "INVALID_ARGUMENT", "is FP32"),
                                ({"shape": SMALL, "name": "x"}, "INVALID_ARGUMENT", "no input 'x'"),
                                ({"shape": SMALL, "output": "y"}, "INVALID_ARGUMENT", "no output 'y'"),
                                ({"shape": SMALL, "model": "nope"}, "NOT_FOUND", "unknown model"),
                                ({"shape": SMALL, "version": "triton"}, "UNAVAILABLE", "'triton'")):
        with pytest.raises(InferenceServerException) as caught:
            call(**kwargs)
        assert caught.value.status() == f"StatusCode.{code}" and words in caught.value.message(), caught.value
    tensor = grpcclient.InferInput("input", SMALL, "FP32")
    tensor._raw_content = b"\0" * 100  # a short raw tensor
    with pytest.raises(InferenceServerException, match="needs 602112 bytes"):
        v2_grpc.infer(MODEL, [tensor])
    assert call(SMALL).get_response().model_version == "embedded"


def test_v2_api_keys_rest_and_grpc(make_api, v2_api):
    from gateway.v2 import grpc_server

    config = load_yaml_config()
    config["server"]["api_keys"] = ["s3cret"]
    config["backends"] = {"embedded": config["backends"]["embedded"]}
    for model in config["models"].values():
        model["routes"] = [r for r in model["routes"] if r["backend"] == "embedded"]
    api = make_api(config)
    assert api.get("/v2/health/live").status_code == 200 and api.get("/v2/health/ready").status_code == 200
    refused = api.get(f"/v2/models/{MODEL}")
    assert refused.status_code == 401 and "API key" in refused.json()["error"]
    assert api.get(f"/v2/models/{MODEL}", headers={"X-API-Key": "s3cret"}).status_code == 200
    port = free_port()
    server = grpc_server.start(api.app.extensions["v2"], f"127.0.0.1:{port}")
    try:
        cl = grpcclient.InferenceServerClient(f"127.0.0.1:{port}")
        assert cl.is_server_live()
        with pytest.raises(InferenceServerException, match="UNAUTHENTICATED"):
            cl.get_model_metadata(MODEL)
        assert cl.get_model_metadata(MODEL, headers={"x-api-key": "s3cret"}).name == MODEL
    finally:
        server.stop(0)


def test_v2_requests_are_counted_per_protocol(v2_api, v2_grpc):
    v2_api.post(f"/v2/models/{MODEL}/infer", data=body([fp32(SMALL)]))
    tensor = grpcclient.InferInput("input", SMALL, "FP32")
    tensor.set_data_from_numpy(np.zeros(SMALL, np.float32))
    v2_grpc.infer(MODEL, [tensor])
    text = v2_api.get("/metrics").text
    for protocol in ("v2-rest", "v2-grpc"):
        assert (f'gateway_requests_total{{backend="embedded",model="{MODEL}",protocol="{protocol}",status="200"}}'
                in text), protocol
    assert 'gateway_grpc_responses_total{code="OK",method="ModelInfer"}' in text


def test_v2_is_described_in_openapi(v2_api):
    paths = v2_api.get("/openapi.json").json()["paths"]
    assert {"/v2", "/v2/health/live", "/v2/health/ready", "/v2/models/{model}", "/v2/models/{model}/infer",
            "/v2/models/{model}/config", "/v2/models/{model}/versions/{version}/infer"} <= set(paths)


# -- fuzzing: any structure a client may send gets a V2 answer, never a 5xx ----------------------
json_values = st.recursive(st.none() | st.booleans() | st.integers(-5, 5) | st.floats(allow_nan=False, width=32)
                           | st.text(max_size=4), lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.sampled_from(["name", "datatype", "shape", "data", "parameters",
                                                              "binary_data_size", "classification", "x"]), inner,
                                             max_size=4), max_leaves=12)
tensors_fuzz = st.fixed_dictionaries({"name": st.sampled_from(["input", "image", "x"]),
                                      "datatype": st.sampled_from(["FP32", "BYTES", "INT8", "FP16", "BOOL", "X"]),
                                      "shape": st.lists(st.integers(-1, 4), max_size=4)},
                                     optional={"data": json_values, "parameters": json_values})
requests_fuzz = st.fixed_dictionaries({"inputs": st.lists(tensors_fuzz, max_size=2) | json_values},
                                      optional={"outputs": json_values, "parameters": json_values, "id": json_values})


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(payload=requests_fuzz, model=st.sampled_from([MODEL, MODEL + "_image", "yolox_nano"]),
       tail=st.binary(max_size=16), header=st.none() | st.integers(0, 400).map(str) | st.just("x"))
def test_v2_fuzzed_infer_requests_never_get_a_5xx(v2_api, payload, model, tail, header):
    data = json.dumps(payload).encode() + (tail if header is not None else b"")
    headers = {} if header is None else {"Inference-Header-Content-Length": header}
    resp = v2_api.post(f"/v2/models/{model}/infer", data=data, headers=headers)
    assert resp.status_code < 500, (resp.status_code, resp.text)
    assert resp.status_code == 200 or isinstance(resp.json()["error"], str)


def test_serve_refuses_a_grpc_port_someone_else_holds(capsys):
    import socket

    from gateway.cli import main as gateway_cli

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert gateway_cli(["serve", "--port", str(free_port()), "--grpc-port", str(port)]) == 2
    assert f"the gRPC port 127.0.0.1:{port} is in use" in capsys.readouterr().err


def test_v2_compressed_bodies_tritonclients_parameters_and_a_wrong_backend_answer(v2_api, make_api):
    import gzip

    from gateway.backends.base import Backend

    plain = body([fp32(SMALL)], parameters={"priority": 1, "timeout": 5_000_000})  # accepted, not acted upon
    ok = v2_api.post(f"/v2/models/{MODEL}/infer", data=gzip.compress(plain), headers={"Content-Encoding": "gzip"})
    assert ok.status_code == 200, ok.text
    cut = v2_api.post(f"/v2/models/{MODEL}/infer", data=gzip.compress(plain)[:-8],  # no CRC trailer
                      headers={"Content-Encoding": "gzip"})
    assert cut.status_code == 400 and "one complete gzip stream" in cut.json()["error"]

    class WrongClasses(Backend):
        def ready(self, route):
            return True

        def infer_batch(self, route, batch):
            return np.zeros((len(batch), 999), np.float32)

    config = load_yaml_config()
    config["backends"] = {"embedded": config["backends"]["embedded"]}
    for model in config["models"].values():
        model["routes"] = [r for r in model["routes"] if r["backend"] == "embedded"]
    api = make_api(config, backends={"embedded": WrongClasses("embedded", None)})
    bad = api.post(f"/v2/models/{MODEL}/infer", data=plain)
    assert bad.status_code == 502 and "'embedded'" in bad.json()["error"] and "[1, 999]" in bad.json()["error"]


def test_v2_grpc_streams_are_capped_and_errors_carry_the_request_id(v2_api):
    import grpc
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    from gateway.v2 import grpc_server

    port = free_port()
    server = grpc_server.start(v2_api.app.extensions["v2"], f"127.0.0.1:{port}", threads=2)  # 1 stream at most
    try:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
        request = service_pb2.ModelInferRequest(model_name=MODEL, model_version="nope", id="42")
        release = []

        def requests():  # one request, then the stream stays open until released
            yield request
            while not release:
                time.sleep(0.05)

        stream = stub.ModelStreamInfer(requests())
        error = next(stream)  # tritonclient drops the id of a stream's error; the protocol carries it
        assert "no version 'nope'" in error.error_message and error.infer_response.id == "42"
        with pytest.raises(grpc.RpcError) as refused:  # the only stream slot is taken
            next(stub.ModelStreamInfer(iter([request])))
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "streams are open" in \
            refused.value.details()
        assert stub.ServerLive(service_pb2.ServerLiveRequest()).live  # a unary call still has its thread
        release.append(True)
        assert list(stream) == []
    finally:
        server.stop(0)


# -- what real clients add to the protocol: accepted, checked; typos still refused ----------------
def test_v2_rest_body_model_name_is_accepted_when_it_names_the_urls_model(v2_api):
    """KServe's SDK (InferRequest.to_rest) puts model_name in every body."""
    url = f"/v2/models/{MODEL}/infer"
    for named, path in ((MODEL, url), (MODEL, f"/v2/models/{MODEL}/versions/embedded/infer"),
                        (f"{MODEL}/versions/embedded", f"/v2/models/{MODEL}/versions/embedded/infer")):
        ok = v2_api.post(path, data=body([fp32(SMALL)], model_name=named))
        assert ok.status_code == 200 and ok.json()["model_name"] == MODEL, (named, path, ok.text)
    for named, path, words in (("mobilenet_v2", url, "model_name 'mobilenet_v2' disagrees with the URL's model "
                                                     f"'{MODEL}'"),
                               (f"{MODEL}/versions/triton", f"/v2/models/{MODEL}/versions/embedded/infer",
                                "(version 'embedded')"),
                               (7, url, "model_name 7 disagrees")):
        resp = v2_api.post(path, data=body([fp32(SMALL)], model_name=named))
        assert resp.status_code == 400 and words in resp.json()["error"], resp.text
    typo = v2_api.post(url, data=body([fp32(SMALL)], model_nmae=MODEL))
    assert typo.status_code == 400 and "unknown key 'model_nmae'" in typo.json()["error"] and \
        "model_name" in typo.json()["error"]  # the accepted keys are listed


def test_v2_rest_unknown_model_or_version_is_a_404_whatever_the_body(v2_api):
    for path in ("/v2/models/nope/infer", f"/v2/models/{MODEL}/versions/nope/infer"):
        resp = v2_api.post(path, data=b"{not json", headers={"Inference-Header-Content-Length": "3"})
        assert resp.status_code == 404 and "nope" in resp.json()["error"], resp.text


def grpc_request(model=MODEL, raw: bytes | None = None, **parameters):
    """A ModelInferRequest as KServe's SDK builds one: raw contents with input parameters."""
    from tritonclient.grpc import service_pb2

    request = service_pb2.ModelInferRequest(model_name=model)
    tensor = request.inputs.add(name="input", datatype="FP32", shape=SMALL)
    for key, value in parameters.items():
        if isinstance(value, str):
            tensor.parameters[key].string_param = value
        else:
            tensor.parameters[key].int64_param = value
    if raw is not None:
        request.raw_input_contents.append(raw)
    else:
        tensor.contents.fp32_contents.extend([0.0] * int(np.prod(SMALL)))
    return request


def test_v2_grpc_binary_data_size_is_accepted_and_checked(v2_api):
    import grpc
    from tritonclient.grpc import service_pb2_grpc

    from gateway.v2 import grpc_server

    port = free_port()
    server = grpc_server.start(v2_api.app.extensions["v2"], f"127.0.0.1:{port}")
    try:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
        raw = np.zeros(SMALL, np.float32).tobytes()
        answer = stub.ModelInfer(grpc_request(raw=raw, binary_data_size=len(raw)))
        assert answer.model_version == "embedded" and list(answer.outputs[0].shape) == [1, 1000]
        for request, code, words in (
                (grpc_request(raw=raw, binary_data_size=len(raw) - 4), "INVALID_ARGUMENT",
                 f"binary_data_size {len(raw) - 4} but its raw_input_contents holds {len(raw)} bytes"),
                (grpc_request(binary_data_size=len(raw)), "INVALID_ARGUMENT", "has no raw_input_contents"),
                (grpc_request(raw=raw, binary_data_size="602112"), "INVALID_ARGUMENT", "must be a byte count"),
                (grpc_request(raw=raw, binary_data_sise=len(raw)), "INVALID_ARGUMENT",
                 "unknown parameter 'binary_data_sise' (accepted: binary_data_size)"),
                # the model is looked up first: an unknown one says so, whatever else is wrong
                (grpc_request(model="nope", raw=raw, binary_data_sise=1), "NOT_FOUND", "unknown model 'nope'")):
            with pytest.raises(grpc.RpcError) as caught:
                stub.ModelInfer(request)
            assert caught.value.code().name == code and words in caught.value.details(), caught.value
    finally:
        server.stop(0)
