"""A STAND-IN engine for the holding-traffic benchmarks: no model, no TorchServe, no Triton.

It speaks just enough of two engines' HTTP APIs for the gateway's torchserve and triton
backends to work against it, on loopback, and answers every inference after a fixed delay
(``--delay-ms``, default 100) with no limit on how many calls it serves at once: the shape of
an engine that batches on an accelerator, where many calls at once cost little more than one.
``--delay-ms 0`` answers at once, so the gateway in front of it is measured against its own
CPU bound.

- TorchServe's inference API on ``--port``: ``POST /predictions/<model>[/<version>]`` takes a
  ``.npy`` float32 batch (N, ...) and answers a ``.npy`` (N, 1000) float32 array of logits,
  one row per image, each with a clear top class; ``GET /ping``.
- TorchServe's management API on ``--management-port``: ``GET /models``,
  ``GET /models/<model>[/<version>]`` answered as TorchServe 0.12 does, one worker READY.
- Triton's V2 HTTP API on ``--port`` too: ``GET /v2``, ``/v2/health/live``, ``/v2/health/ready``,
  ``/v2/models/<m>[/versions/<v>]``, ``.../ready``, ``.../config``; ``POST .../infer`` in JSON
  and with the binary tensor extension (``Inference-Header-Content-Length``), answering binary
  where the request asks ``binary_data`` (per output, or ``binary_data_output``). Any model
  name is served: input ``input`` FP32 [3, 224, 224] NCHW, output ``logits`` FP32 [1000].
- Control (management port): ``PUT /standin/delay?ms=N`` changes the delay, ``GET /standin/stats``
  gives the calls served and the most calls it held at once (``POST /standin/stats/reset``).

    .venv/bin/python benchmarks/standin_engine.py --port 8080 --management-port 8081 --delay-ms 100
"""
from __future__ import annotations

import argparse
import ast
import asyncio
import io
import json
import signal
import time

import numpy as np
from aiohttp import web

CLASSES = 1000
TOP_CLASS = 281  # ImageNet "tabby, tabby cat": every row's clear top class
NPY_MAGIC = b"\x93NUMPY"
INPUT, OUTPUT = "input", "logits"
DIMS = [3, 224, 224]


class Engine:
    """The stand-in's state: its delay, answers cached per batch size, counters."""

    def __init__(self, delay_ms: float):
        self.delay_s = delay_ms / 1000
        self.calls = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.started = time.time()
        self._npy: dict[int, bytes] = {}
        rng = np.random.default_rng(0)
        self._row = rng.normal(0.0, 1.0, CLASSES).astype(np.float32)
        self._row[TOP_CLASS] = 12.0

    def logits(self, n: int) -> np.ndarray:
        return np.tile(self._row, (n, 1))

    def npy(self, n: int) -> bytes:
        if n not in self._npy:
            buf = io.BytesIO()
            np.save(buf, self.logits(n), allow_pickle=False)
            if len(self._npy) >= 256:  # bounded: batch sizes are few in practice
                return buf.getvalue()
            self._npy[n] = buf.getvalue()
        return self._npy[n]

    async def wait(self) -> None:
        """One call's time in the engine, any number at once."""
        self.calls += 1
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.delay_s > 0:
                await asyncio.sleep(self.delay_s)
        finally:
            self.in_flight -= 1


def npy_rows(body: bytes) -> int:
    """The batch size of a .npy body, from its header (the tensor itself is not decoded)."""
    if not body.startswith(NPY_MAGIC):
        raise ValueError("not a .npy body")
    version = body[6]
    size_len = 2 if version == 1 else 4
    header_len = int.from_bytes(body[8:8 + size_len], "little")
    header = body[8 + size_len:8 + size_len + header_len].decode("latin1")
    shape = ast.literal_eval(header)["shape"]
    if not shape:
        raise ValueError("a scalar, not a batch")
    return int(shape[0])


def ts_error(status: int, message: str, kind: str = "BadRequestException") -> web.Response:
    return web.json_response({"code": status, "type": kind, "message": message}, status=status)


def v2_error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


# -- TorchServe inference API ----------------------------------------------------------------
async def predictions(request: web.Request) -> web.Response:
    engine: Engine = request.app["engine"]
    body = await request.read()
    try:
        n = npy_rows(body)
    except (ValueError, KeyError, SyntaxError, IndexError) as exc:
        return ts_error(400, f"stand-in engine: expected a .npy batch: {exc}")
    await engine.wait()
    return web.Response(body=engine.npy(n), content_type="application/octet-stream")


async def ping(request: web.Request) -> web.Response:
    return web.json_response({"status": "Healthy"})


# -- TorchServe management API ---------------------------------------------------------------
def describe(model: str, version: str | None, started: float) -> list:
    """``GET /models/<model>`` as TorchServe 0.12 answers it, one worker READY."""
    return [{
        "modelName": model, "modelVersion": version or "1.0", "modelUrl": f"{model}.mar",
        "runtime": "python", "minWorkers": 1, "maxWorkers": 1, "batchSize": 8, "maxBatchDelay": 5,
        "maxRetryTimeoutInSec": 300, "clientTimeoutInMills": 0, "parallelType": "", "parallelLevel": 0,
        "deviceType": "cpu", "continuousBatching": False, "useJobTicket": False, "useVenv": False,
        "stateful": False, "sequenceMaxIdleMSec": 0, "sequenceTimeoutMSec": 0, "maxNumSequence": 0,
        "maxSequenceJobQueueSize": 0, "loadedAtStartup": True,
        "workers": [{"id": "9000", "startTime": time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(started)),
                     "status": "READY", "memoryUsage": 0, "pid": 0, "gpu": False, "gpuUsage": "N/A"}],
        "jobQueueStatus": {"remainingCapacity": 1000, "pendingRequests": 0},
    }]


async def list_models(request: web.Request) -> web.Response:
    return web.json_response({"models": []})


async def describe_model(request: web.Request) -> web.Response:
    engine: Engine = request.app["engine"]
    return web.json_response(describe(request.match_info["model"], request.match_info.get("version"), engine.started))


async def set_delay(request: web.Request) -> web.Response:
    engine: Engine = request.app["engine"]
    try:
        engine.delay_s = float(request.query["ms"]) / 1000
    except (KeyError, ValueError):
        return web.json_response({"error": "?ms=<milliseconds> expected"}, status=400)
    return web.json_response({"delay_ms": engine.delay_s * 1000})


async def stats(request: web.Request) -> web.Response:
    engine: Engine = request.app["engine"]
    return web.json_response({"calls": engine.calls, "in_flight": engine.in_flight,
                              "max_in_flight": engine.max_in_flight, "delay_ms": engine.delay_s * 1000})


async def reset_stats(request: web.Request) -> web.Response:
    engine: Engine = request.app["engine"]
    engine.calls, engine.max_in_flight = 0, engine.in_flight
    return await stats(request)


# -- Triton's V2 HTTP API --------------------------------------------------------------------
def version_of(request: web.Request) -> str:
    return request.match_info.get("version") or "1"


async def v2_server(request: web.Request) -> web.Response:
    return web.json_response({"name": "stand-in engine", "version": "0", "extensions": ["binary_tensor_data"]})


async def v2_ok(request: web.Request) -> web.Response:
    return web.Response(status=200)


async def v2_model(request: web.Request) -> web.Response:
    return web.json_response({
        "name": request.match_info["model"], "versions": [version_of(request)], "platform": "onnxruntime_onnx",
        "inputs": [{"name": INPUT, "datatype": "FP32", "shape": [-1, *DIMS]}],
        "outputs": [{"name": OUTPUT, "datatype": "FP32", "shape": [-1, CLASSES]}]})


async def v2_config(request: web.Request) -> web.Response:
    return web.json_response({
        "name": request.match_info["model"], "platform": "onnxruntime_onnx", "backend": "onnxruntime",
        "max_batch_size": 64,
        "input": [{"name": INPUT, "data_type": "TYPE_FP32", "format": "FORMAT_NCHW", "dims": DIMS}],
        "output": [{"name": OUTPUT, "data_type": "TYPE_FP32", "dims": [CLASSES]}],
        "dynamic_batching": {}})


async def v2_infer(request: web.Request) -> web.Response:
    engine: Engine = request.app["engine"]
    body = await request.read()
    header_length = request.headers.get("Inference-Header-Content-Length")
    try:
        split = int(header_length) if header_length is not None else len(body)
        if not 0 <= split <= len(body):
            raise ValueError("Inference-Header-Content-Length beyond the body")
        header = json.loads(body[:split])
        binary = memoryview(body)[split:]
        n = _v2_batch(header, binary)
    except (ValueError, KeyError, TypeError, IndexError) as exc:
        return v2_error(400, f"stand-in engine: bad inference request: {exc}")
    await engine.wait()

    asked = header.get("outputs") or [{"name": OUTPUT}]
    default_binary = bool((header.get("parameters") or {}).get("binary_data_output", False))
    logits = engine.logits(n)
    answer: dict = {"model_name": request.match_info["model"], "model_version": version_of(request), "outputs": []}
    if "id" in header:
        answer["id"] = header["id"]
    tails = []
    for out in asked:
        if out.get("name", OUTPUT) != OUTPUT:
            return v2_error(400, f"stand-in engine: unknown output {out.get('name')!r}")
        entry = {"name": OUTPUT, "datatype": "FP32", "shape": [n, CLASSES]}
        if (out.get("parameters") or {}).get("binary_data", default_binary):
            raw = logits.tobytes()
            entry["parameters"] = {"binary_data_size": len(raw)}
            tails.append(raw)
        else:
            entry["data"] = logits.ravel().tolist()
        answer["outputs"].append(entry)
    head = json.dumps(answer).encode()
    if not tails:
        return web.Response(body=head, content_type="application/json")
    return web.Response(body=b"".join([head, *tails]), content_type="application/octet-stream",
                        headers={"Inference-Header-Content-Length": str(len(head))})


def _v2_batch(header: dict, binary: memoryview) -> int:
    """Check the inputs against the model's one input; the batch size."""
    inputs = header["inputs"]
    if len(inputs) != 1 or inputs[0]["name"] != INPUT:
        raise ValueError(f"expected one input named {INPUT!r}")
    spec = inputs[0]
    shape = [int(d) for d in spec["shape"]]
    if spec.get("datatype") != "FP32" or shape[1:] != DIMS:
        raise ValueError(f"expected FP32 [-1, {', '.join(map(str, DIMS))}], got {spec.get('datatype')} {shape}")
    want = int(np.prod(shape)) * 4
    size = (spec.get("parameters") or {}).get("binary_data_size")
    if size is not None:
        if int(size) != want or len(binary) != want:
            raise ValueError(f"binary_data_size {size} with {len(binary)} bytes, shape needs {want}")
    elif len(np.asarray(spec["data"], dtype=np.float32).ravel()) * 4 != want:
        raise ValueError("data does not match the shape")
    return shape[0]


# -- the servers -----------------------------------------------------------------------------
def inference_app(engine: Engine) -> web.Application:
    app = web.Application(client_max_size=512 * 1024 * 1024)
    app["engine"] = engine
    app.router.add_post("/predictions/{model}", predictions)
    app.router.add_post("/predictions/{model}/{version}", predictions)
    app.router.add_get("/ping", ping)
    app.router.add_get("/v2", v2_server)
    app.router.add_get("/v2/health/live", v2_ok)
    app.router.add_get("/v2/health/ready", v2_ok)
    for base in ("/v2/models/{model}", "/v2/models/{model}/versions/{version}"):
        app.router.add_get(base, v2_model)
        app.router.add_get(base + "/ready", v2_ok)
        app.router.add_get(base + "/config", v2_config)
        app.router.add_post(base + "/infer", v2_infer)
    return app


def management_app(engine: Engine) -> web.Application:
    app = web.Application()
    app["engine"] = engine
    app.router.add_get("/models", list_models)
    app.router.add_get("/models/{model}", describe_model)
    app.router.add_get("/models/{model}/{version}", describe_model)
    app.router.add_put("/standin/delay", set_delay)
    app.router.add_get("/standin/stats", stats)
    app.router.add_post("/standin/stats/reset", reset_stats)
    return app


async def serve(host: str, port: int, management_port: int, delay_ms: float) -> None:
    engine = Engine(delay_ms)
    runners = []
    for app, p in ((inference_app(engine), port), (management_app(engine), management_port)):
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        # a deep accept backlog: the stand-in must never be what refuses a connection
        await web.TCPSite(runner, host, p, backlog=4096).start()
        runners.append(runner)
    print(f"stand-in engine (not a real TorchServe or Triton): TorchServe inference + Triton V2 on "
          f"http://{host}:{port}, TorchServe management on http://{host}:{management_port}, "
          f"answers after {delay_ms:g} ms, unlimited concurrency", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        for runner in runners:
            await runner.cleanup()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback)")
    ap.add_argument("--port", type=int, default=8080, help="TorchServe inference API and Triton V2 HTTP")
    ap.add_argument("--management-port", type=int, default=8081, help="TorchServe management API")
    ap.add_argument("--delay-ms", type=float, default=100.0, help="time each call takes (0: answer at once)")
    args = ap.parse_args()
    asyncio.run(serve(args.host, args.port, args.management_port, args.delay_ms))


if __name__ == "__main__":
    main()
