"""The Open Inference Protocol over gRPC: ``inference.GRPCInferenceService`` with the
service definitions tritonclient ships (``tritonclient.grpc.service_pb2_grpc``), on its own
port. Same models, versions and meaning as REST (gateway.v2.protocol); tensors travel in
``raw_input_contents``/``raw_output_contents`` (typed ``contents`` are read too).

``gateway serve`` starts one such server in every worker process after the fork, sharing the
worker's gateway; the port is bound with SO_REUSEPORT (gRPC's default on Linux) so the kernel
spreads connections over the workers, and the master checks first that no one else holds it.

An input may carry ``binary_data_size`` (KServe's SDK sends it with every raw input): it must
be the length of that input's ``raw_input_contents``. The model and version are looked up
before anything in the request is checked, so an unknown model says so.
"""
from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
from google.protobuf import json_format
from tritonclient.grpc import model_config_pb2, service_pb2, service_pb2_grpc

from gateway import metrics, tracing
from gateway.api.access import sane_id
from gateway.api.auth import presented_key, require_key
from gateway.errors import BadRequest, GatewayError, TooManyRequests
from gateway.traffic import set_request_key
from gateway.v2.protocol import SERVER, Catalog, InferRequest, InferResponse, InputTensor, RequestedOutput
from gateway.v2.tensors import check_shape, from_buffer, from_elements, from_list, join_bytes, numpy_dtype

log = logging.getLogger("gateway")
STATUS_CODES = {400: grpc.StatusCode.INVALID_ARGUMENT, 401: grpc.StatusCode.UNAUTHENTICATED,
                404: grpc.StatusCode.NOT_FOUND, 413: grpc.StatusCode.RESOURCE_EXHAUSTED,
                415: grpc.StatusCode.INVALID_ARGUMENT, 429: grpc.StatusCode.RESOURCE_EXHAUSTED,
                503: grpc.StatusCode.UNAVAILABLE, 504: grpc.StatusCode.DEADLINE_EXCEEDED}  # else (500, 502): INTERNAL
CONTENTS = {"BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
            "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents",
            "UINT32": "uint_contents", "UINT64": "uint64_contents", "FP32": "fp32_contents",
            "FP64": "fp64_contents"}  # typed contents per datatype (BYTES: bytes_contents; FP16: raw only)
# An input's parameters a client may send: KServe's SDK sends binary_data_size with raw contents
INPUT_PARAMETERS = frozenset({"binary_data_size"})
OPEN_METHODS = frozenset({"ServerLive", "ServerReady"})  # probes need no key, as /v2/health/* over REST


def _status(exc: GatewayError) -> grpc.StatusCode:
    return STATUS_CODES.get(exc.status, grpc.StatusCode.INTERNAL)


class Servicer(service_pb2_grpc.GRPCInferenceServiceServicer):
    def __init__(self, catalog: Catalog, max_streams: int):
        self.catalog = catalog
        self.api_keys = catalog.gateway.config.server.api_keys
        self.max_streams = max_streams
        self.streams = threading.BoundedSemaphore(max_streams)

    def _authorize(self, context: grpc.ServicerContext) -> None:
        metadata = dict(context.invocation_metadata())  # gRPC metadata keys are lower case
        require_key(presented_key(lambda name: metadata.get(name.lower())), self.api_keys)

    # -- health and metadata -------------------------------------------------------------------
    def ServerLive(self, request, context):
        return service_pb2.ServerLiveResponse(live=True)

    def ServerReady(self, request, context):
        return service_pb2.ServerReadyResponse(ready=self.catalog.server_ready())

    def ModelReady(self, request, context):
        return service_pb2.ModelReadyResponse(ready=self.catalog.model_ready(request.name, request.version))

    def ServerMetadata(self, request, context):
        return service_pb2.ServerMetadataResponse(**SERVER)

    def ModelMetadata(self, request, context):
        meta = self.catalog.get(request.name, request.version).metadata()
        return json_format.ParseDict(meta, service_pb2.ModelMetadataResponse())

    def ModelConfig(self, request, context):
        config = self.catalog.get(request.name, request.version).config()
        return service_pb2.ModelConfigResponse(config=json_format.ParseDict(config, model_config_pb2.ModelConfig()))

    # -- inference -------------------------------------------------------------------------------
    def ModelInfer(self, request, context):
        set_request_key(dict(context.invocation_metadata()).get("x-traffic-key"))  # the weighted split's key
        return self._infer(request, context.time_remaining())

    def ModelStreamInfer(self, request_iterator, context):
        if not self.streams.acquire(blocking=False):  # each open stream holds one of the server's threads
            raise TooManyRequests(f"{self.max_streams} streams are open; close one or use ModelInfer",
                                  code="too_many_streams")
        set_request_key(dict(context.invocation_metadata()).get("x-traffic-key"))  # one key for the stream
        try:
            for request in request_iterator:
                try:
                    yield service_pb2.ModelStreamInferResponse(infer_response=self._infer(request, None))
                except GatewayError as exc:
                    _count("ModelStreamInfer", _status(exc))
                    yield service_pb2.ModelStreamInferResponse(error_message=exc.message, infer_response=(
                        service_pb2.ModelInferResponse(model_name=request.model_name, id=request.id)))
        finally:
            self.streams.release()

    def _infer(self, request, timeout_s: float | None) -> service_pb2.ModelInferResponse:
        """``timeout_s``: the call's gRPC deadline (None: none; a stream's calls have none each)."""
        self.catalog.resolve(request.model_name, request.model_version)  # unknown model or version first
        answer = self.catalog.infer(InferRequest(
            request.model_name, request.model_version, _inputs(request),
            [_requested(o, i) for i, o in enumerate(request.outputs)] or None, request.id or None,
            {key: _value(value) for key, value in request.parameters.items()}), protocol="v2-grpc",
            timeout_s=None if timeout_s is None else max(timeout_s, 1e-6))
        return _response(answer)


def _value(parameter):
    """An InferParameter's value (whichever of bool/int64/string/double/uint64 it holds)."""
    choice = parameter.WhichOneof("parameter_choice")
    return getattr(parameter, choice) if choice else None


def _inputs(request) -> list[InputTensor]:
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise BadRequest(f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs",
                         code="invalid_data")
    tensors = []
    for i, item in enumerate(request.inputs):
        where = f"inputs[{i}]"
        _check_input_parameters(item, raw[i] if raw else None, where)
        shape = check_shape([int(d) for d in item.shape], where)
        tensors.append(InputTensor(item.name, item.datatype, shape, _decoder(item, shape, raw[i] if raw else None,
                                                                             where)))
    return tensors


def _check_input_parameters(item, raw: bytes | None, where: str) -> None:
    """An input's parameters: only ``binary_data_size``, the length of its raw contents."""
    for name in sorted(item.parameters):
        if name not in INPUT_PARAMETERS:
            raise BadRequest(f"{where}: unknown parameter {name!r} (accepted: {', '.join(sorted(INPUT_PARAMETERS))})",
                             code="unexpected_field")
    if "binary_data_size" in item.parameters:
        size = _value(item.parameters["binary_data_size"])
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise BadRequest(f"{where}: binary_data_size must be a byte count (int64_param), got {size!r}",
                             code="invalid_data")
        if raw is None:
            raise BadRequest(f"{where}: binary_data_size {size} but the request has no raw_input_contents",
                             code="invalid_data")
        if size != len(raw):
            raise BadRequest(f"{where}: binary_data_size {size} but its raw_input_contents holds {len(raw)} bytes",
                             code="invalid_data")


def _decoder(item, shape: list[int], raw: bytes | None, where: str):
    """How to decode one input's data: its raw contents, or its typed ``contents`` field."""
    datatype = item.datatype
    if raw is not None:
        return lambda: from_buffer(raw, datatype, shape, where)
    if datatype == "BYTES":
        return lambda: from_elements(list(item.contents.bytes_contents), shape, where)
    if datatype not in CONTENTS:
        numpy_dtype(datatype, where)  # unknown: say so; FP16 has no typed contents field
        raise BadRequest(f"{where}: {datatype} data travels in raw_input_contents only", code="invalid_data")
    return lambda: from_list(list(getattr(item.contents, CONTENTS[datatype])), datatype, shape, where)


def _requested(output, i: int) -> RequestedOutput:
    for name in output.parameters:
        if name not in ("classification", "binary_data"):  # binary_data: REST's encoding, harmless over gRPC
            raise BadRequest(f"outputs[{i}]: unknown parameter {name!r} (classification)", code="invalid_output")
    k = _value(output.parameters["classification"]) if "classification" in output.parameters else None
    return RequestedOutput.asking(output.name, k, f"outputs[{i}] (int64_param)")


def _response(answer: InferResponse) -> service_pb2.ModelInferResponse:
    response = service_pb2.ModelInferResponse(model_name=answer.model, model_version=answer.version,
                                              id=answer.id or "")
    for key, value in answer.parameters.items():
        response.parameters[key].string_param = str(value)
    for tensor, _ in answer.outputs:
        response.outputs.add(name=tensor.name, datatype=tensor.datatype, shape=tensor.shape)
        response.raw_output_contents.append(join_bytes(tensor.data) if tensor.datatype == "BYTES"
                                            else np.ascontiguousarray(tensor.data).tobytes())
    return response


def _count(method: str, code: grpc.StatusCode) -> None:
    metrics.GRPC_RESPONSES.labels(method, code.name).inc()


def _guarded(servicer: Servicer, method: str, call: Callable, streaming: bool) -> Callable:
    """Every RPC: the API key checked (but for the probes), GatewayErrors answered with their
    status code and message, unexpected ones as INTERNAL, every answer counted; the client's
    ``x-request-id`` (or a new one) returned in the trailing metadata, errors included."""

    def fail(context, exc: Exception) -> None:
        if isinstance(exc, GatewayError):
            code, message = _status(exc), exc.message
        else:
            log.exception("unhandled error in gRPC %s", method)
            code, message = grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}"
        _count(method, code)
        context.abort(code, message)

    if streaming:
        @functools.wraps(call)
        def stream(request_iterator, context):
            _request_id(context)
            try:
                servicer._authorize(context)
                with tracing.rpc_span(method, dict(context.invocation_metadata())):  # the client's traceparent
                    yield from call(request_iterator, context)
            except grpc.RpcError:  # the client went away or the server is stopping: nobody to answer
                _count(method, grpc.StatusCode.CANCELLED)
                return
            except Exception as exc:
                fail(context, exc)
            _count(method, grpc.StatusCode.OK)
        return stream

    @functools.wraps(call)
    def unary(request, context):
        _request_id(context)
        try:
            if method not in OPEN_METHODS:
                servicer._authorize(context)
            with tracing.rpc_span(method, dict(context.invocation_metadata())):  # the client's traceparent
                answer = call(request, context)
        except Exception as exc:
            fail(context, exc)
        _count(method, grpc.StatusCode.OK)
        return answer
    return unary


def _request_id(context) -> None:
    sent = dict(context.invocation_metadata()).get("x-request-id")
    context.set_trailing_metadata((("x-request-id", sane_id(sent if isinstance(sent, str) else None)),))


def start(catalog: Catalog, bind: str, threads: int = 4) -> grpc.Server:
    """A started gRPC server on ``bind`` (host:port) serving ``catalog`` with ``threads`` threads:
    at most threads - 1 of them held by open streams, at most 4 x threads calls in flight
    (RESOURCE_EXHAUSTED beyond), so a burst cannot queue without bound."""
    limit = catalog.gateway.config.server.max_body_bytes
    server = grpc.server(ThreadPoolExecutor(max_workers=threads, thread_name_prefix="grpc"),
                         options=[("grpc.max_receive_message_length", limit),
                                  ("grpc.max_send_message_length", 256 * 1024 * 1024),
                                  ("grpc.so_reuseport", 1)],
                         maximum_concurrent_rpcs=4 * threads)
    servicer = Servicer(catalog, max_streams=max(1, threads - 1))
    for method in ("ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelConfig",
                   "ModelInfer", "ModelStreamInfer"):
        setattr(servicer, method, _guarded(servicer, method, getattr(servicer, method),
                                           streaming=method == "ModelStreamInfer"))
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
    try:
        server.add_insecure_port(bind)
    except RuntimeError as exc:  # grpcio's way of saying it could not bind
        raise OSError(f"cannot bind gRPC to {bind}: {exc}") from None
    server.start()
    return server
