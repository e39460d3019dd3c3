"""The Open Inference Protocol over HTTP (``/v2/...``) on the gateway's own port.

JSON tensors and Triton's binary tensor data extension (``Inference-Header-Content-Length``:
the JSON header's length, then each binary tensor's bytes in order; ``binary_data_size`` per
tensor; outputs in binary on request), the classification extension and the model
configuration extension. Errors answer V2's ``{"error": "..."}`` (gateway.app.error_response).

Keys beyond the protocol's that real clients send are accepted: KServe's SDK puts ``model_name``
in every request body (``InferRequest.to_rest``); it must name the URL's model (or
``model/versions/version``), else a 400 names both. Anything else unknown is refused by name.
"""
from __future__ import annotations

import zlib

import orjson
from flask import Blueprint, Response, current_app, jsonify, request

from gateway import deadlines
from gateway.errors import BadRequest, PayloadTooLarge
from gateway.v2.protocol import SERVER, Catalog, InferRequest, InferResponse, InputTensor, RequestedOutput
from gateway.v2.tensors import DTYPES, check_shape, element_count, from_buffer, from_list, join_bytes

bp = Blueprint("v2", __name__)
HEADER_LENGTH = "Inference-Header-Content-Length"
REQUEST_KEYS = {"id", "model_name", "parameters", "inputs", "outputs"}  # model_name: KServe SDK's to_rest()
INPUT_KEYS = {"name", "shape", "datatype", "parameters", "data"}
OUTPUT_KEYS = {"name", "parameters"}
OUTPUT_PARAMETERS = {"binary_data", "classification"}
MODEL = "/v2/models/<model>"
VERSION = "/v2/models/<model>/versions/<version>"


def catalog() -> Catalog:
    return current_app.extensions["v2"]


@bp.get("/v2")
def server_metadata():
    return jsonify(SERVER)


@bp.get("/v2/health/live")
def live():
    return jsonify({"live": True})


@bp.get("/v2/health/ready")
def ready():
    is_ready = catalog().server_ready()
    return jsonify({"ready": is_ready}), 200 if is_ready else 503


@bp.get(MODEL)
@bp.get(VERSION)
def model_metadata(model: str, version: str | None = None):
    return jsonify(catalog().get(model, version).metadata())


@bp.get(MODEL + "/ready")
@bp.get(VERSION + "/ready")
def model_ready(model: str, version: str | None = None):
    if catalog().model_ready(model, version):
        return jsonify({"name": model, "ready": True})
    # the status carries the answer (the Open Inference Protocol); the body is the protocol's error
    which = f"model {model!r}" + (f" version {version!r}" if version else "")
    return jsonify({"error": f"{which} is not ready: no route of it can serve now"}), 503


@bp.get(MODEL + "/config")
@bp.get(VERSION + "/config")
def model_config(model: str, version: str | None = None):
    return jsonify(catalog().get(model, version).config())


@bp.post(MODEL + "/infer")
@bp.post(VERSION + "/infer")
def infer(model: str, version: str | None = None):
    catalog().resolve(model, version)  # an unknown model or version says so before the body is read
    parsed, binary_default = read_request(model, version or "", _body(), request.headers.get(HEADER_LENGTH))
    timeout_s = deadlines.parse_seconds(request.headers.get(deadlines.HEADER))
    return write_response(catalog().infer(parsed, protocol="v2-rest", timeout_s=timeout_s), binary_default)


def _body() -> bytes:
    """The body, inflated when the client compressed it (bounded by max_body_bytes)."""
    body = request.get_data(cache=False)
    encoding = (request.headers.get("Content-Encoding") or "identity").lower()
    if encoding == "identity":
        return body
    if encoding not in ("gzip", "deflate"):
        raise BadRequest(f"unsupported Content-Encoding {encoding!r} (gzip, deflate or none)",
                         code="invalid_encoding")
    limit = current_app.config["MAX_CONTENT_LENGTH"]
    inflater = zlib.decompressobj(wbits=31 if encoding == "gzip" else 15)
    try:
        data = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise BadRequest(f"body is not valid {encoding}: {exc}", code="invalid_encoding") from None
    if len(data) > limit:
        raise PayloadTooLarge(f"inflated request body exceeds the limit of {limit} bytes")
    if not inflater.eof or inflater.unused_data:
        raise BadRequest(f"body is not one complete {encoding} stream", code="invalid_encoding")
    return data


def _mapping(value, where: str, allowed: set[str] | frozenset[str] | None = None) -> dict:
    if not isinstance(value, dict):
        raise BadRequest(f"{where} must be a JSON object, got {type(value).__name__}", code="invalid_json")
    extra = sorted(set(value) - allowed) if allowed is not None else []
    if extra:
        raise BadRequest(f"{where}: unknown key {extra[0]!r} (accepted: {', '.join(sorted(allowed or ()))})",
                         code="unexpected_field")
    return value


def _flag(parameters: dict, key: str, where: str) -> bool | None:
    value = parameters.get(key)
    if value is not None and not isinstance(value, bool):
        raise BadRequest(f"{where}.{key} must be true or false, got {value!r}", code="invalid_parameter")
    return value


def read_request(model: str, version: str, body: bytes, header_length: str | None) -> tuple[InferRequest, bool]:
    """An infer request's body (JSON, or a JSON header then binary tensors) -> the request, and
    whether its outputs default to binary data (``parameters.binary_data_output``)."""
    if header_length is None:
        header, blobs = body, b""
    else:
        if not (header_length.isascii() and header_length.isdigit()) or int(header_length) > len(body):
            raise BadRequest(f"{HEADER_LENGTH} must be a byte count within the body's {len(body)} bytes, "
                             f"got {header_length!r}", code="invalid_header")
        header, blobs = body[:int(header_length)], body[int(header_length):]
        if not header:  # the whole body is the model's single input
            return _raw_input_request(model, version, blobs), False
    try:
        payload = orjson.loads(header)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"the request's JSON is not valid: {exc}", code="invalid_json") from None
    payload = _mapping(payload, "the request", REQUEST_KEYS)
    _check_model_name(payload.get("model_name", model), model, version)
    parameters = dict(_mapping(payload.get("parameters", {}), "parameters"))
    binary_default = bool(_flag(parameters, "binary_data_output", "parameters"))
    parameters.pop("binary_data_output", None)  # the REST encoding's; the rest go to the protocol
    inputs = payload.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise BadRequest("'inputs' must be a non-empty list of tensors", code="invalid_input")
    offset, tensors = 0, []
    for i, item in enumerate(inputs):
        tensor, offset = _input(item, f"inputs[{i}]", blobs, offset)
        tensors.append(tensor)
    if offset != len(blobs):
        raise BadRequest(f"the body has {len(blobs) - offset} bytes after the binary tensors it declares",
                         code="invalid_data")
    outputs = payload.get("outputs")
    if outputs is not None and not isinstance(outputs, list):
        raise BadRequest("'outputs' must be a list", code="invalid_output")
    request_id = payload.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise BadRequest("'id' must be a string", code="invalid_json")
    asked = [_output(o, f"outputs[{i}]") for i, o in enumerate(outputs or [])] or None
    return InferRequest(model, version, tensors, asked, request_id, parameters), binary_default


def _check_model_name(named, model: str, version: str) -> None:
    """The body's ``model_name`` (KServe's SDK always sends one) names the URL's model, or the
    URL's ``model/versions/version``: a request naming two models is refused, not guessed at."""
    if named == model or (version and named == f"{model}/versions/{version}"):
        return
    url = f"{model!r}" + (f" (version {version!r})" if version else "")
    raise BadRequest(f"the body's model_name {named!r} disagrees with the URL's model {url}; "
                     "leave it out or name the same model", code="model_mismatch")


def _input(item, where: str, blobs: bytes, offset: int) -> tuple[InputTensor, int]:
    item = _mapping(item, where, INPUT_KEYS)
    for key, kind in (("name", str), ("datatype", str), ("shape", list)):
        if not isinstance(item.get(key), kind):
            raise BadRequest(f"{where}.{key} is required ({kind.__name__})", code="invalid_input")
    name, datatype, shape = item["name"], item["datatype"], check_shape(item["shape"], where)
    parameters = _mapping(item.get("parameters", {}), f"{where}.parameters", {"binary_data_size"})
    if "binary_data_size" in parameters:
        size = parameters["binary_data_size"]
        if "data" in item or isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise BadRequest(f"{where}: binary_data_size must be a byte count, and then no 'data'",
                             code="invalid_data")
        if offset + size > len(blobs):
            raise BadRequest(f"{where}: binary_data_size {size} but only {len(blobs) - offset} binary bytes left",
                             code="invalid_data")
        blob = blobs[offset:offset + size]
        return InputTensor(name, datatype, shape, lambda: from_buffer(blob, datatype, shape, where)), offset + size
    if "data" not in item:
        raise BadRequest(f"{where}: needs 'data' or parameters.binary_data_size", code="invalid_data")
    data = item["data"]
    return InputTensor(name, datatype, shape, lambda: from_list(data, datatype, shape, where)), offset


def _output(item, where: str) -> RequestedOutput:
    item = _mapping(item, where, OUTPUT_KEYS)
    if not isinstance(item.get("name"), str):
        raise BadRequest(f"{where}.name is required (str)", code="invalid_output")
    parameters = _mapping(item.get("parameters", {}), f"{where}.parameters", OUTPUT_PARAMETERS)
    return RequestedOutput.asking(item["name"], parameters.get("classification"), f"{where}.parameters",
                                  _flag(parameters, "binary_data", f"{where}.parameters"))


def _raw_input_request(model: str, version: str, data: bytes) -> InferRequest:
    """``Inference-Header-Content-Length: 0``: the body is the single input's data (an encoded
    photo for ``M_image``; for a tensor model, a whole number of images in its layout and dtype)."""
    v2 = catalog().get(model, version)
    if v2.takes_images:
        return InferRequest(model, version, [InputTensor(v2.input_name, "BYTES", [1, 1], lambda: [data])])
    per_image = element_count(v2.input_dims) * DTYPES[v2.input_datatype].itemsize
    if not data or len(data) % per_image:
        raise BadRequest(f"a raw body for {model!r} must hold whole images of {per_image} bytes, got {len(data)}",
                         code="invalid_data")
    shape = [len(data) // per_image, *v2.input_dims]
    return InferRequest(model, version, [InputTensor(v2.input_name, v2.input_datatype, shape,
                                                     lambda: from_buffer(data, v2.input_datatype, shape, "the body"))])


def write_response(answer: InferResponse, binary_default: bool) -> Response:
    outputs, blobs = [], []
    for tensor, asked in answer.outputs:
        entry: dict = {"name": tensor.name, "datatype": tensor.datatype, "shape": tensor.shape}
        binary = binary_default if asked.binary is None else asked.binary
        if binary:
            blob = join_bytes(tensor.data) if tensor.datatype == "BYTES" else tensor.data.tobytes()
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = [e.decode() for e in tensor.data] if tensor.datatype == "BYTES" else tensor.data.ravel()
        outputs.append(entry)
    body: dict = {"model_name": answer.model, "model_version": answer.version}
    if answer.id is not None:
        body["id"] = answer.id
    body.update(parameters=answer.parameters, outputs=outputs)
    header = orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)
    if not blobs:
        return Response(header, content_type="application/json")
    return Response(b"".join([header, *blobs]), content_type="application/octet-stream",
                    headers={HEADER_LENGTH: str(len(header))})
