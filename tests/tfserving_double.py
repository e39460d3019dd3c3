"""A TEST DOUBLE of TensorFlow Serving's REST API - not TensorFlow Serving.

There is no ``tensorflow_model_server`` binary on PyPI or in Debian, so the TF Serving
adapter is tested against this double. It serves the real SavedModels with TensorFlow and
answers as TF Serving does, following its REST docs (api_rest.md) and its source
(model_servers/http_rest_api_handler.cc, http_rest_api_util.cc, http_server.cc,
get_model_status_impl.cc, util/json_tensor.cc):

    GET  /v1/models/{m}[/versions/{v}]              model status (newest version first)
    GET  /v1/models/{m}[/versions/{v}]/metadata     the SavedModel's own signature_def map
    POST /v1/models/{m}[/versions/{v}]:predict      row ("instances") or columnar ("inputs")
    gRPC PredictionService/Predict                  with --grpc-port, raw tensor_content

Errors are ``{"error": "..."}`` with TF Serving's status mapping: NOT_FOUND -> 404 (unknown
model or version), INVALID_ARGUMENT -> 400 (bad JSON or tensor, and any malformed /v1/
request), paths outside /v1/ -> 404 without a JSON body. Checks run in TF Serving's order:
parse the body, resolve the servable and signature, then read "instances"/"inputs".

Where the double differs: every version directory is served (TF Serving applies the
model_version_policy), version labels are not supported, JSON parse errors carry Python's
wording rather than rapidjson's, and errors raised while running the model carry
TensorFlow Python's wording (the HTTP status is TF Serving's).

    python tests/tfserving_double.py --models-dir tfserving/models --port 8501
"""
from __future__ import annotations

import argparse
import json
import os
import re
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import tensorflow as tf
from flask import Flask, Response, request
from google.protobuf import json_format
from tensorflow.core.framework import types_pb2
from tensorflow.core.protobuf import saved_model_pb2

# http_rest_api_util.cc (without the /labels/ alternative) and http_server.cc
PREDICT_PATH = re.compile(r"/v1/models/([^/:]+)(?:/versions/(\d+))?:(classify|regress|predict)", re.I)
STATUS_PATH = re.compile(r"/v1/models(?:/([^/:]+))?(?:/versions/(\d+))?(?:/(metadata))?", re.I)
REST_PATH = re.compile(r"/v1/.*", re.I)


class Servable:
    """One loaded version: the tf.saved_model object and its SignatureDef protos."""

    def __init__(self, path: Path):
        self.module = tf.saved_model.load(str(path))
        proto = saved_model_pb2.SavedModel()
        proto.ParseFromString((path / "saved_model.pb").read_bytes())
        self.signature_defs = proto.meta_graphs[0].signature_def


class ApiError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def load_models(models_dir: Path) -> dict[str, dict[int, Servable]]:
    """{model: {version: Servable}} from <models_dir>/<model>/<version>/saved_model.pb."""
    models: dict[str, dict[int, Servable]] = {}
    for model_dir in sorted(p for p in models_dir.iterdir() if p.is_dir()):
        for version_dir in sorted(p for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()):
            if (version_dir / "saved_model.pb").is_file():
                models.setdefault(model_dir.name, {})[int(version_dir.name)] = Servable(version_dir)
    return models


def _json(payload: dict, status: int = 200) -> Response:
    return Response(json.dumps(payload, indent=1), status=status, mimetype="application/json")


def _doc(value) -> str:
    """JsonValueToString: the offending JSON, as TF Serving quotes it in messages."""
    return json.dumps(value, indent=4)


def create_app(models: dict[str, dict[int, Servable]]) -> Flask:
    app = Flask("tfserving_double")

    def servable(name: str, version: str | None) -> tuple[int, Servable]:
        versions = models.get(name, {})
        v = int(version) if version is not None else max(versions, default=None)
        if v not in versions:  # BasicManager::GetUntypedServableHandle
            which = f"Specific({name}, {version})" if version is not None else f"Latest({name})"
            raise ApiError(404, f"Servable not found for request: {which}")
        return v, versions[v]

    @app.route("/", defaults={"path": ""}, methods=["GET", "POST", "PUT", "DELETE", "PATCH"])
    @app.route("/<path:path>", methods=["GET", "POST", "PUT", "DELETE", "PATCH"])
    def dispatch(path: str):
        path = "/" + path
        if not REST_PATH.fullmatch(path):  # the dispatcher ignores it: the HTTP server's 404
            return Response("", status=404)
        try:
            predict = PREDICT_PATH.fullmatch(path)
            if request.method == "POST" and predict:
                if predict[3].lower() != "predict":
                    raise ApiError(400, f"The double implements only :predict, not :{predict[3]}")
                return _json(run_predict(predict[1], predict[2], request.get_data()))
            status = STATUS_PATH.fullmatch(path)
            if request.method == "GET" and status:
                if not status[1]:
                    raise ApiError(400, "Missing model name in request.")
                if status[3]:
                    return _json(model_metadata(status[1], status[2]))
                return _json(model_status(status[1], status[2]))
            raise ApiError(400, f"Malformed request: {request.method} {path}")
        except ApiError as exc:
            return _json({"error": str(exc)}, exc.status)

    def model_status(name: str, version: str | None) -> dict:
        versions = models.get(name, {})
        if version is not None:
            if int(version) not in versions:
                raise ApiError(404, f"Could not find version {int(version)} of model {name}")
            wanted = [int(version)]
        elif not versions:
            raise ApiError(404, f"Could not find any versions of model {name}")
        else:
            wanted = sorted(versions, reverse=True)
        return {"model_version_status": [
            {"version": str(v), "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}
            for v in wanted]}

    def model_metadata(name: str, version: str | None) -> dict:
        v, found = servable(name, version)
        sigs = {k: json_format.MessageToDict(sig, always_print_fields_with_no_presence=True,
                                             preserving_proto_field_name=True)
                for k, sig in found.signature_defs.items()}
        return {"model_spec": {"name": name, "signature_name": "", "version": str(v)},
                "metadata": {"signature_def": {"signature_def": sigs}}}

    def run_predict(name: str, version: str | None, body: bytes) -> dict:
        doc = _parse(body)
        sig_name = doc.get("signature_name", "")
        if not isinstance(sig_name, str):
            raise ApiError(400, f"JSON Value: {_doc(doc)} not formatted correctly. "
                                f"'signature_name' key must be a string value.")
        _, found = servable(name, version)
        sig_name = sig_name or "serving_default"
        if sig_name not in found.signature_defs:
            raise ApiError(400, f'Serving signature name: "{sig_name}" not found in signature def')
        sig_inputs = found.signature_defs[sig_name].inputs
        if not sig_inputs:
            raise ApiError(400, f"Failed to get input map for signature: {sig_name}")
        feeds, row = _feeds(doc, sig_inputs)
        fn = found.module.signatures[sig_name]
        try:
            result = fn(**{k: tf.constant(a) for k, a in feeds.items()})
        except (ValueError, TypeError, tf.errors.InvalidArgumentError) as exc:
            lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip() != "Graph execution error:"]
            raise ApiError(400, " ".join(ln for ln in lines if ln)[:1000]) from None
        outputs = {k: t.numpy().tolist() for k, t in result.items()}
        if row:  # MakeJsonFromTensors, kRow: one entry per instance
            if len(outputs) == 1:
                return {"predictions": next(iter(outputs.values()))}
            n = len(next(iter(outputs.values())))
            return {"predictions": [{k: o[i] for k, o in outputs.items()} for i in range(n)]}
        return {"outputs": next(iter(outputs.values())) if len(outputs) == 1 else outputs}

    return app


def _parse(body: bytes) -> dict:
    """ParseJson (json_tensor.cc); NaN and Infinity are accepted, as kParseNanAndInfFlag does."""
    if not body:
        raise ApiError(400, "JSON Parse error: The document is empty")
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"JSON Parse error: {getattr(exc, 'msg', exc)} at offset: {getattr(exc, 'pos', 0)}") \
            from None
    if not isinstance(doc, dict):
        raise ApiError(400, f"JSON Value: {_doc(doc)} Is not object")
    return doc


def _feeds(doc: dict, sig_inputs) -> tuple[dict[str, np.ndarray], bool]:
    """FillPredictRequestFromJson: -> ({input: array}, row_format)."""
    names = sorted(sig_inputs)  # a protobuf map iterates in key order
    if "instances" in doc:
        if "inputs" in doc:
            raise ApiError(400, f"JSON Value: {_doc(doc)} Not formatted correctly expecting only one of "
                                f"'inputs' or 'instances' keys to exist ")
        instances = doc["instances"]
        if not isinstance(instances, list):
            raise ApiError(400, f"JSON Value: {_doc(doc)} Excepting 'instances' to be an list/array")
        if not instances:
            raise ApiError(400, f"JSON Value: {_doc(doc)} No values in 'instances' array")
        if not isinstance(instances[0], dict) and len(names) > 1:
            raise ApiError(400, "instances is a plain list, but expecting list of objects as multiple input "
                                "tensors required as per tensorinfo_map")
        if isinstance(instances[0], dict):
            for i, item in enumerate(instances):
                if not isinstance(item, dict):
                    raise ApiError(400, f"Expecting object but got list at item {i} of input list")
                if set(item) != set(names):
                    raise ApiError(400, f"Failed to process element: {i} of 'instances' list. JSON object: "
                                        f"{_doc(item)} keys must be equal to: {','.join(names)}")
            return {n: _instances_tensor([item[n] for item in instances], sig_inputs[n]) for n in names}, True
        return {names[0]: _instances_tensor(instances, sig_inputs[names[0]])}, True
    if "inputs" in doc:
        inputs = doc["inputs"]
        if not isinstance(inputs, dict):
            if len(names) > 1:
                raise ApiError(400, "inputs is a plain value/list, but expecting an object as multiple input "
                                    "tensors required as per tensorinfo_map")
            return {names[0]: _tensor(inputs, sig_inputs[names[0]])}, False
        feeds = {}
        for n in names:
            if n not in inputs:
                raise ApiError(400, f"Missing named input: {n} in 'inputs' object.")
            feeds[n] = _tensor(inputs[n], sig_inputs[n])
        return feeds, False
    raise ApiError(400, "Missing 'inputs' or 'instances' key")


def _np_dtype(info) -> np.dtype:
    return tf.dtypes.as_dtype(info.dtype).as_numpy_dtype


def _tensor(value, info) -> np.ndarray:
    """FillTensorProto: a dense nested list whose leaves are JSON numbers (for numeric dtypes)."""
    arr, target = _dense(value), np.dtype(_np_dtype(info))
    # ragged, strings, booleans, objects, null; decimals for an integer input
    if arr is None or arr.dtype.kind not in "iuf" or (target.kind in "iu" and arr.dtype.kind == "f"):
        _explain(value, info)
    return arr.astype(target)


def _instances_tensor(items: list, info) -> np.ndarray:
    """FillTensorMapFromInstancesList: every instance has the first one's shape."""
    arrays = []
    for i, item in enumerate(items):
        try:
            arr = _tensor(item, info)
        except ApiError as exc:
            raise ApiError(400, f"Failed to process element: {i} of 'instances' list. Error: "
                                f"INVALID_ARGUMENT: {exc}") from None
        if arrays and arr.shape != arrays[0].shape:
            raise ApiError(400, f"Failed to process element: {i} of 'instances' list. Error: INVALID_ARGUMENT: "
                                f"Expecting shape {_shape(arrays[0].shape)} but got: {_shape(arr.shape)}")
        arrays.append(arr)
    return np.stack(arrays)


def _dense(value) -> np.ndarray | None:
    try:
        return np.asarray(value)
    except ValueError:  # ragged
        return None


def _shape(shape) -> str:
    return "[" + ",".join(str(d) for d in shape) + "]"


def _explain(value, info) -> None:
    """The slow path: walk the JSON as FillTensorProto does and raise its message."""
    shape = []
    v = value
    while isinstance(v, list):
        shape.append(len(v))
        v = v[0] if v else None
    dtype_name = types_pb2.DataType.Name(info.dtype)[3:].lower()  # DataTypeString: DT_FLOAT -> float

    def walk(val, level):
        if not isinstance(val, list):
            if level != len(shape):
                raise ApiError(400, f"JSON Value: {_doc(val)} found at incorrect level: {level + 1} in the JSON "
                                    f"DOM. Expected at level: {len(shape)}")
            integer = np.dtype(_np_dtype(info)).kind in "iu"
            if isinstance(val, bool) or not isinstance(val, int if integer else (int, float)):
                kind = {str: "String", dict: "Object", type(None): "Null", float: "Number"}.get(
                    type(val), str(val).capitalize())
                raise ApiError(400, f"JSON Value: {_doc(val)} Type: {kind} is not of expected type: {dtype_name}")
            return
        if level >= len(shape):
            raise ApiError(400, f"Encountered list at unexpected level: {level} expected < {len(shape)}")
        if len(val) != shape[level]:
            raise ApiError(400, f"Encountered list at unexpected size: {len(val)} at level: {level} "
                                f"expected size: {shape[level]}")
        for x in val:
            walk(x, level + 1)

    walk(value, 0)
    raise ApiError(400, f"JSON Value: {_doc(value)[:200]} is not a dense tensor of {dtype_name}")


def serve_grpc(models: dict[str, dict[int, Servable]], port: int):
    """PredictionService.Predict over gRPC (raw tensor_content), as TF Serving's port 8500."""
    from concurrent import futures

    import grpc
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    class Servicer(prediction_service_pb2_grpc.PredictionServiceServicer):
        def Predict(self, req, context):
            name = req.model_spec.name
            versions = models.get(name) or {}
            pinned = req.model_spec.HasField("version")
            v = req.model_spec.version.value if pinned else max(versions, default=None)
            if v not in versions:
                which = f"Specific({name}, {v})" if pinned else f"Latest({name})"
                context.abort(grpc.StatusCode.NOT_FOUND, f"Servable not found for request: {which}")
            sig_name = req.model_spec.signature_name or "serving_default"
            fn = versions[v].module.signatures.get(sig_name)
            if fn is None:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                              f'Serving signature name: "{sig_name}" not found in signature def')
            try:
                result = fn(**{k: tf.constant(tf.make_ndarray(t)) for k, t in req.inputs.items()})
            except (ValueError, TypeError, tf.errors.InvalidArgumentError) as exc:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc).splitlines()[0])
            resp = predict_pb2.PredictResponse()
            resp.model_spec.name, resp.model_spec.version.value = name, v
            resp.model_spec.signature_name = sig_name
            for k, t in result.items():
                resp.outputs[k].CopyFrom(tf.make_tensor_proto(t.numpy()))
            return resp

    limit = 256 * 1024 * 1024
    server = grpc.server(futures.ThreadPoolExecutor(4), options=[
        ("grpc.max_send_message_length", limit), ("grpc.max_receive_message_length", limit)])
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(Servicer(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    return server


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models-dir", required=True, type=Path)
    ap.add_argument("--port", type=int, default=8501)
    ap.add_argument("--grpc-port", type=int, default=0, help="also serve gRPC Predict here (0: off)")
    args = ap.parse_args()
    models = load_models(args.models_dir)
    app = create_app(models)
    if args.grpc_port:
        app.grpc_server = serve_grpc(models, args.grpc_port)  # keep a reference: a collected server stops
    from werkzeug.serving import make_server

    print(f"TF Serving REST test double on 127.0.0.1:{args.port}", flush=True)
    make_server("127.0.0.1", args.port, app, threaded=True).serve_forever()


if __name__ == "__main__":
    main()
