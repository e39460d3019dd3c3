"""KServe's own Python SDK (``kserve``, pinned in requirements-kserve.txt) against a running
gateway's V2 front, run by tests/test_kserve_sdk.py with the separate ``.venv-kserve``'s python
(kserve pins protobuf < 7 and psutil < 6, the project needs protobuf 7: they cannot share a venv).
It imports nothing from the gateway; everything it does is what a KServe user would write.

    kserve_sdk_client.py --rest http://HOST:PORT --grpc HOST:PORT --tensor batch.npy
                         --photo cat.jpg --photo coffee.jpg CHECK [CHECK ...]

prints one JSON object, ``{CHECK: result}``: what the SDK answered, made JSON (tensors as
``{name, datatype, shape, data}``), or the exception it raised as ``{"exception": ...}`` with
the server's message (``httpx.HTTPStatusError``: ``status``, ``message``;
``grpc.aio.AioRpcError``: ``code``, ``details``). ``--list`` prints the checks.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
import httpx
import numpy as np
from google.protobuf import json_format

# Importing kserve parses sys.argv (its model server's flags, `--grpc` an ambiguous prefix of
# several): it sees none of ours.
_ARGV, sys.argv = sys.argv, sys.argv[:1]
try:
    from kserve import InferenceGRPCClient, InferenceRESTClient, InferInput, InferRequest, RESTConfig
    from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
    from kserve.protocol.grpc.grpc_predict_v2_pb2_grpc import GRPCInferenceServiceStub
    from kserve.protocol.infer_type import RequestedOutput
    from kserve.protocol.rest import v2_datamodels
finally:
    sys.argv = _ARGV

MODEL = "efficientnet_lite0"
DOWN = "torchserve"  # the test's gateway routes this version to an engine that is not running


class Context:
    def __init__(self, args: argparse.Namespace):
        self.rest_url = args.rest
        self.grpc_url = args.grpc
        self.tensor = np.load(args.tensor) if args.tensor else None
        self.photos = [Path(path).read_bytes() for path in args.photos or []]

    def rest(self) -> InferenceRESTClient:
        return InferenceRESTClient(RESTConfig(protocol="v2", timeout=120))

    def grpc(self) -> InferenceGRPCClient:
        return InferenceGRPCClient(self.grpc_url, timeout=120)


# -- results as JSON -----------------------------------------------------------------------------
def tensors(response) -> dict:
    out = {}
    for output in response.outputs:
        data = output.as_numpy()
        if output.datatype == "BYTES":
            data = np.vectorize(lambda e: e.decode() if isinstance(e, bytes) else str(e), otypes=[object])(data)
        out[output.name] = {"datatype": output.datatype, "shape": list(output.shape), "data": data.tolist()}
    return out


def parameters(params) -> dict:
    """REST answers a dict; gRPC a map of InferParameter."""
    if not params:
        return {}
    return {k: (json_format.MessageToDict(v) if hasattr(v, "DESCRIPTOR") else v) for k, v in params.items()}


def answer(response) -> dict:
    return {"model_name": response.model_name, "model_version": response.model_version, "id": response.id,
            "parameters": parameters(response.parameters), "outputs": tensors(response)}


def validated(model, data: dict) -> dict:
    """``data`` parsed (strictly) by one of the SDK's own pydantic models, and whether that model
    holds every field the server sent, unchanged."""
    parsed = model.model_validate(data, strict=True)
    return {"parsed": parsed.model_dump(exclude_unset=True),
            "round_trip": parsed.model_dump(exclude_unset=True) == data}


# -- inputs ---------------------------------------------------------------------------------------
def tensor_input(batch: np.ndarray, binary: bool) -> InferInput:
    tensor = InferInput("input", list(batch.shape), "FP32")
    tensor.set_data_from_numpy(batch, binary_data=binary)
    return tensor


def photo_input(photos: list[bytes]) -> InferInput:
    batch = np.array([[p] for p in photos], dtype=np.object_)
    tensor = InferInput("image", list(batch.shape), "BYTES")
    tensor.set_data_from_numpy(batch, binary_data=True)
    return tensor


async def rest_infer(ctx: Context, request: InferRequest, model_name: str | None = None) -> dict:
    async with ctx.rest() as client:
        return answer(await client.infer(ctx.rest_url, request, model_name=model_name or request.model_name))


async def grpc_infer(ctx: Context, request: InferRequest) -> dict:
    async with ctx.grpc() as client:
        return answer(await client.infer(request))


# -- the checks -------------------------------------------------------------------------------------
async def rest_health(ctx: Context) -> dict:
    async with ctx.rest() as client:
        out = {"live": await client.is_server_live(ctx.rest_url), "ready": await client.is_server_ready(ctx.rest_url)}
        for name in (MODEL, f"{MODEL}/versions/embedded", f"{MODEL}/versions/{DOWN}", "nope"):
            out[f"model_ready {name}"] = await client.is_model_ready(ctx.rest_url, name)
    return out


async def grpc_health(ctx: Context) -> dict:
    async with ctx.grpc() as client:
        return {"live": await client.is_server_live(), "ready": await client.is_server_ready(),
                f"model_ready {MODEL}": await client.is_model_ready(MODEL),
                f"model_ready {MODEL}_image": await client.is_model_ready(MODEL + "_image")}


async def grpc_model_ready_unknown(ctx: Context) -> dict:
    async with ctx.grpc() as client:
        return {"ready": await client.is_model_ready("nope")}


async def rest_metadata(ctx: Context) -> dict:
    """The SDK has no metadata call over REST: a user GETs the documents and parses them with
    the SDK's own data models, as KServe's docs do."""
    async with httpx.AsyncClient(base_url=ctx.rest_url, timeout=60) as client:
        async def get(path: str) -> dict:
            response = await client.get(path)
            response.raise_for_status()
            return response.json()

        return {"server": validated(v2_datamodels.ServerMetadataResponse, await get("/v2")),
                "live": validated(v2_datamodels.ServerLiveResponse, await get("/v2/health/live")),
                "ready": validated(v2_datamodels.ServerReadyResponse, await get("/v2/health/ready")),
                "model_ready": validated(v2_datamodels.ModelReadyResponse, await get(f"/v2/models/{MODEL}/ready")),
                **{name: validated(v2_datamodels.ModelMetadataResponse, await get(f"/v2/models/{name}"))
                   for name in (MODEL, MODEL + "_image", f"{MODEL}/versions/embedded")}}


async def grpc_metadata(ctx: Context) -> dict:
    """Through the SDK's own generated stub (its proto, not tritonclient's)."""
    async with grpc.aio.insecure_channel(ctx.grpc_url) as channel:
        stub = GRPCInferenceServiceStub(channel)
        server = await stub.ServerMetadata(pb.ServerMetadataRequest(), timeout=60)
        out = {"server": json_format.MessageToDict(server, preserving_proto_field_name=True)}
        for name, version in ((MODEL, ""), (MODEL + "_image", ""), (MODEL, "embedded")):
            meta = await stub.ModelMetadata(pb.ModelMetadataRequest(name=name, version=version), timeout=60)
            out[f"{name}/{version}" if version else name] = json_format.MessageToDict(
                meta, preserving_proto_field_name=True)
        return out


async def rest_infer_binary(ctx: Context) -> dict:
    return await rest_infer(ctx, InferRequest(MODEL, [tensor_input(ctx.tensor, binary=True)]))


async def rest_infer_json(ctx: Context) -> dict:
    return await rest_infer(ctx, InferRequest(MODEL, [tensor_input(ctx.tensor, binary=False)]))


async def rest_infer_binary_outputs(ctx: Context) -> dict:
    """Outputs asked for in binary too (the binary extension both ways)."""
    return await rest_infer(ctx, InferRequest(MODEL, [tensor_input(ctx.tensor, binary=True)],
                                              request_outputs=[RequestedOutput("logits", {"binary_data": True})]))


async def grpc_infer_binary(ctx: Context) -> dict:
    return await grpc_infer(ctx, InferRequest(MODEL, [tensor_input(ctx.tensor, binary=True)]))


async def grpc_infer_json(ctx: Context) -> dict:
    """binary_data=False: typed fp32_contents instead of raw contents."""
    return await grpc_infer(ctx, InferRequest(MODEL, [tensor_input(ctx.tensor, binary=False)]))


def classification(k: int, binary: bool | None = None) -> list[RequestedOutput]:
    params: dict = {"classification": k}
    if binary is not None:
        params["binary_data"] = binary
    return [RequestedOutput("logits", params)]


async def rest_photos(ctx: Context) -> dict:
    return await rest_infer(ctx, InferRequest(MODEL + "_image", [photo_input(ctx.photos)]))


async def rest_photos_classification(ctx: Context) -> dict:
    return await rest_infer(ctx, InferRequest(MODEL + "_image", [photo_input(ctx.photos)],
                                              request_outputs=classification(3, binary=True)))


async def grpc_photos(ctx: Context) -> dict:
    return await grpc_infer(ctx, InferRequest(MODEL + "_image", [photo_input(ctx.photos)]))


async def grpc_photos_classification(ctx: Context) -> dict:
    return await grpc_infer(ctx, InferRequest(MODEL + "_image", [photo_input(ctx.photos)],
                                              request_outputs=classification(3)))


async def rest_version(ctx: Context) -> dict:
    """A version through the URL, as the SDK reaches one: model_name="m/versions/v"."""
    return await rest_infer(ctx, InferRequest(MODEL, [tensor_input(ctx.tensor, binary=True)]),
                            model_name=f"{MODEL}/versions/embedded")


async def grpc_version(ctx: Context) -> dict:
    return await grpc_infer(ctx, InferRequest(MODEL, [tensor_input(ctx.tensor, binary=True)],
                                              model_version="embedded"))


async def rest_unknown_model(ctx: Context) -> dict:
    return await rest_infer(ctx, InferRequest("nope", [tensor_input(ctx.tensor, binary=True)]))


async def grpc_unknown_model(ctx: Context) -> dict:
    return await grpc_infer(ctx, InferRequest("nope", [tensor_input(ctx.tensor, binary=True)]))


def wrong_shape(ctx: Context) -> np.ndarray:
    return np.ascontiguousarray(ctx.tensor[:, :, :32, :32])


async def rest_wrong_shape(ctx: Context) -> dict:
    return await rest_infer(ctx, InferRequest(MODEL, [tensor_input(wrong_shape(ctx), binary=True)]))


async def grpc_wrong_shape(ctx: Context) -> dict:
    return await grpc_infer(ctx, InferRequest(MODEL, [tensor_input(wrong_shape(ctx), binary=True)]))


async def rest_engine_down(ctx: Context) -> dict:
    return await rest_infer(ctx, InferRequest(MODEL, [tensor_input(ctx.tensor, binary=True)]),
                            model_name=f"{MODEL}/versions/{DOWN}")


async def grpc_engine_down(ctx: Context) -> dict:
    return await grpc_infer(ctx, InferRequest(MODEL, [tensor_input(ctx.tensor, binary=True)], model_version=DOWN))


async def rest_model_name_disagrees(ctx: Context) -> dict:
    """The body names one model (InferRequest's model_name), the URL another (infer's)."""
    return await rest_infer(ctx, InferRequest("mobilenet_v2", [tensor_input(ctx.tensor, binary=True)]),
                            model_name=MODEL)


CHECKS: dict[str, Callable[[Context], Awaitable[dict]]] = {
    name.replace("_", "-"): fn for name, fn in list(globals().items())
    if name.startswith(("rest_", "grpc_")) and name not in ("rest_infer", "grpc_infer")}


def failure(exc: BaseException) -> dict:
    if isinstance(exc, httpx.HTTPStatusError):
        return {"exception": "httpx.HTTPStatusError", "status": exc.response.status_code, "message": str(exc)}
    if isinstance(exc, grpc.aio.AioRpcError):
        return {"exception": "grpc.aio.AioRpcError", "code": exc.code().name, "details": exc.details()}
    return {"exception": f"{type(exc).__module__}.{type(exc).__qualname__}", "message": str(exc)}


async def run(ctx: Context, names: list[str]) -> dict:
    results = {}
    for name in names:
        try:
            results[name] = await CHECKS[name](ctx)
        except Exception as exc:  # what the SDK raised is the result the test asserts on
            results[name] = failure(exc)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rest", default="http://127.0.0.1:8000")
    parser.add_argument("--grpc", default="127.0.0.1:8001")
    parser.add_argument("--tensor", help="a .npy FP32 batch in the model's input shape")
    parser.add_argument("--photo", action="append", dest="photos", help="an encoded photo (repeat: one BYTES batch)")
    parser.add_argument("--list", action="store_true", help="print the checks and exit")
    parser.add_argument("checks", nargs="*", metavar="CHECK")
    args = parser.parse_args(argv)
    if args.list:
        print("\n".join(CHECKS))
        return 0
    unknown = [c for c in args.checks if c not in CHECKS]
    if unknown or not args.checks:
        parser.error(f"unknown checks {unknown} (--list names them)" if unknown else "name at least one CHECK")
    json.dump(asyncio.run(run(Context(args), args.checks)), sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
