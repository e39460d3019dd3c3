"""A TEST DOUBLE of TensorFlow Serving's REST API - not TensorFlow Serving.

There is no ``tensorflow_model_server`` binary on PyPI or in Debian, so the TF Serving
adapter is tested against this double. It serves the real SavedModels with TensorFlow and
answers as TF Serving's documented REST API does (docs: "RESTful API", api_rest.md):

    GET  /v1/models/{m}[/versions/{v}]              model status
    GET  /v1/models/{m}[/versions/{v}]/metadata     signature_def
    POST /v1/models/{m}[/versions/{v}]:predict      row ("instances") or columnar ("inputs")
    gRPC PredictionService/Predict                  with --grpc-port, raw tensor_content

Errors are ``{"error": "..."}``: 404 for an unknown model or version, 400 for bad input.
A test of the real ``tensorflow/serving`` image runs where a Docker engine exists.

    python tests/tfserving_double.py --models-dir tfserving/models --port 8501
"""
from __future__ import annotations

import argparse
import os
import re
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from flask import Flask, jsonify, request  # noqa: E402

PATH = re.compile(r"^(?P<model>[^/:]+)(?:/versions/(?P<version>\d+))?(?P<action>/metadata|:predict|:classify|:regress)?$")
DTYPES = {tf.float32: "DT_FLOAT", tf.float16: "DT_HALF", tf.int32: "DT_INT32", tf.int64: "DT_INT64",
          tf.uint8: "DT_UINT8", tf.string: "DT_STRING", tf.float64: "DT_DOUBLE"}


def load_models(models_dir: Path) -> dict[str, dict[int, object]]:
    """{model: {version: loaded SavedModel}} from <models_dir>/<model>/<version>/saved_model.pb."""
    models: dict[str, dict[int, object]] = {}
    for model_dir in sorted(p for p in models_dir.iterdir() if p.is_dir()):
        for version_dir in sorted(p for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()):
            if (version_dir / "saved_model.pb").is_file():
                models.setdefault(model_dir.name, {})[int(version_dir.name)] = tf.saved_model.load(str(version_dir))
    return models


def _tensor_info(spec) -> dict:
    dims = [{"size": str(-1 if d is None else d), "name": ""} for d in spec.shape.as_list()]
    return {"dtype": DTYPES.get(spec.dtype, "DT_INVALID"), "tensor_shape": {"dim": dims, "unknown_rank": False},
            "name": f"serving_default_{spec.name}:0"}


def create_app(models: dict[str, dict[int, object]]) -> Flask:
    app = Flask("tfserving_double")

    def error(status: int, message: str):
        return jsonify({"error": message}), status

    def servable(name: str, version: str | None):
        versions = models.get(name)
        if versions is None:
            return None, None
        v = int(version) if version is not None else max(versions)
        return v, versions.get(v)

    def not_found(name: str, version: str | None):
        which = f"Specific({name}, {version})" if version is not None else f"Latest({name})"
        return error(404, f"Servable not found for request: {which}")

    @app.route("/v1/models/<path:rest>", methods=["GET", "POST"])
    def models_api(rest: str):
        match = PATH.match(rest)
        if not match:
            return error(404, f"Malformed request: {request.method} /v1/models/{rest}")
        name, version, action = match["model"], match["version"], match["action"]
        if request.method == "GET" and action is None:
            return status(name, version)
        if request.method == "GET" and action == "/metadata":
            return metadata(name, version)
        if request.method == "POST" and action == ":predict":
            return predict(name, version)
        return error(404, f"Malformed request: {request.method} /v1/models/{rest}")

    def status(name: str, version: str | None):
        versions = models.get(name)
        if not versions:
            return error(404, f"Could not find any versions of model {name}")
        wanted = [int(version)] if version is not None else sorted(versions, reverse=True)
        if wanted[0] not in versions:
            return error(404, f"Could not find version {version} of model {name}")
        return jsonify({"model_version_status": [
            {"version": str(v), "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}
            for v in wanted]})

    def metadata(name: str, version: str | None):
        v, module = servable(name, version)
        if module is None:
            return not_found(name, version)
        sigs = {}
        for sig_name, fn in module.signatures.items():
            inputs = fn.structured_input_signature[1]
            sigs[sig_name] = {
                "inputs": {k: _tensor_info(s) for k, s in inputs.items()},
                "outputs": {k: _tensor_info(s) for k, s in fn.structured_outputs.items()},
                "method_name": "tensorflow/serving/predict",
            }
        return jsonify({"model_spec": {"name": name, "signature_name": "", "version": str(v)},
                        "metadata": {"signature_def": {"signature_def": sigs}}})

    def predict(name: str, version: str | None):
        v, module = servable(name, version)
        if module is None:
            return not_found(name, version)
        body = request.get_json(silent=True)
        if not isinstance(body, dict):
            return error(400, "JSON Parse error: The document is empty or not an object")
        sig_name = body.get("signature_name", "serving_default")
        fn = module.signatures.get(sig_name)
        if fn is None:
            return error(400, f'Serving signature name: "{sig_name}" not found in signature def')
        input_specs = fn.structured_input_signature[1]
        if ("instances" in body) == ("inputs" in body):
            return error(400, "Missing 'inputs' or 'instances' key" if "instances" not in body
                         else "Not both 'inputs' and 'instances' keys can be specified")
        try:
            feeds = _feeds(body, input_specs)
            result = fn(**feeds)
        except (ValueError, TypeError, tf.errors.InvalidArgumentError) as exc:
            return error(400, str(exc).strip().splitlines()[0][:500])
        outputs = {k: t.numpy().tolist() for k, t in result.items()}
        if "instances" in body:  # row format: one entry per instance
            if len(outputs) == 1:
                return jsonify({"predictions": next(iter(outputs.values()))})
            n = len(next(iter(outputs.values())))
            return jsonify({"predictions": [{k: o[i] for k, o in outputs.items()} for i in range(n)]})
        return jsonify({"outputs": next(iter(outputs.values())) if len(outputs) == 1 else outputs})

    return app


def _feeds(body: dict, input_specs: dict) -> dict:
    def tensor(value, spec):
        arr = np.asarray(value)
        if arr.dtype == object or arr.dtype.kind in "USb":
            raise ValueError(f"JSON Value for input '{spec.name}' is not of expected type: "
                             f"{spec.dtype.name} (got {arr.dtype})")
        if not spec.shape.is_compatible_with(arr.shape):  # the signature's placeholder shape
            raise ValueError(f"Input to reshape is a tensor with shape {list(arr.shape)}, "
                             f"which is incompatible with the requested shape {spec.shape.as_list()} "
                             f"for input '{spec.name}'")
        return tf.constant(arr.astype(spec.dtype.as_numpy_dtype))

    names = list(input_specs)
    if "instances" in body:
        instances = body["instances"]
        if not isinstance(instances, list) or not instances:
            raise ValueError("'instances' must be a non-empty JSON list")
        if all(isinstance(i, dict) for i in instances):
            return {n: tensor([i[n] for i in instances], input_specs[n]) for n in names}
        if len(names) != 1:
            raise ValueError("instances must be named objects: the signature has several inputs")
        return {names[0]: tensor(instances, input_specs[names[0]])}
    inputs = body["inputs"]
    if isinstance(inputs, dict):
        missing = [n for n in names if n not in inputs]
        if missing:
            raise ValueError(f"Missing input: {missing[0]}")
        return {n: tensor(inputs[n], input_specs[n]) for n in names}
    if len(names) != 1:
        raise ValueError("'inputs' must be an object: the signature has several inputs")
    return {names[0]: tensor(inputs, input_specs[names[0]])}


def serve_grpc(models: dict[str, dict[int, object]], port: int):
    """PredictionService.Predict over gRPC (raw tensor_content), as TF Serving's port 8500."""
    from concurrent import futures

    import grpc
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    class Servicer(prediction_service_pb2_grpc.PredictionServiceServicer):
        def Predict(self, req, context):
            versions = models.get(req.model_spec.name) or {}
            v = req.model_spec.version.value if req.model_spec.HasField("version") else max(versions, default=None)
            module = versions.get(v)
            if module is None:
                which = (f"Specific({req.model_spec.name}, {v})" if req.model_spec.HasField("version")
                         else f"Latest({req.model_spec.name})")
                context.abort(grpc.StatusCode.NOT_FOUND, f"Servable not found for request: {which}")
            fn = module.signatures.get(req.model_spec.signature_name or "serving_default")
            if fn is None:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, "signature not found")
            try:
                result = fn(**{k: tf.constant(tf.make_ndarray(t)) for k, t in req.inputs.items()})
            except (ValueError, TypeError, tf.errors.InvalidArgumentError) as exc:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc).splitlines()[0])
            resp = predict_pb2.PredictResponse()
            resp.model_spec.name, resp.model_spec.version.value = req.model_spec.name, v
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
