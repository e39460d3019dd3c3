"""NVIDIA Triton over its HTTP/REST (KServe v2) protocol, tensors as binary data.

tritonclient's own HTTP client is gevent-based and not thread-safe, so this adapter uses
tritonclient only to encode and decode the binary protocol
(``generate_request_body`` / ``parse_response_body``) and sends the bytes through one
pooled ``requests.Session``, which the WSGI server's threads can share.

Input name, layout, dims, dtype and ``max_batch_size`` come from the server's model
config (a route's ``input_name``/``output_name`` override the names); the base class splits
larger requests. The config is cached per model and dropped after a failed call, so a
reloaded model is re-learned. tritonclient is imported on first use, not with the module.
"""
from __future__ import annotations

import importlib.util
import threading
from dataclasses import dataclass
from typing import Literal

import numpy as np
import requests

from gateway import deadlines
from gateway.backends.base import Backend, RemoteSettings
from gateway.backends.http import BackendSession, error_for_status
from gateway.errors import BackendBadResponse, BackendError, BackendRejected, BackendUnavailable

# Triton answers 400 for a model it does not serve; these words mark that case (-> 404)
NOT_LOADED_HINTS = ("unknown model", "not found", "not ready", "unavailable", "is not loaded")


class TritonSettings(RemoteSettings):
    kind: Literal["triton"]


@dataclass(frozen=True)
class TritonModelInfo:
    input_name: str
    datatype: str  # Triton's, e.g. "FP32"
    dims: tuple[int, ...]  # without the batch axis; -1 = variable
    layout: str | None  # "NCHW" / "NHWC" from the config's format, when given
    output_name: str
    max_batch_size: int  # 0: the model has no batch axis


class TritonBackend(Backend):
    Settings = TritonSettings
    settings: TritonSettings

    def __init__(self, name: str, settings: TritonSettings):
        if importlib.util.find_spec("tritonclient") is None:  # say so at start, not at the first request
            raise ModuleNotFoundError("the triton backend needs the tritonclient package", name="tritonclient")
        super().__init__(name, settings)
        self.http = BackendSession(self.name, settings)
        self._info: dict[tuple, TritonModelInfo] = {}
        self._lock = threading.Lock()

    # -- HTTP ------------------------------------------------------------------------------
    def _model_url(self, route) -> str:
        url = f"{self.settings.url}/v2/models/{route.backend_model}"
        return f"{url}/versions/{route.version}" if route.version else url

    def _error(self, resp: requests.Response, route):
        try:
            message = resp.json().get("error") or resp.text
        except ValueError:
            message = resp.text[:300] or f"HTTP {resp.status_code}"
        status = resp.status_code
        if status == 400 and any(h in message.lower() for h in NOT_LOADED_HINTS):
            status = 404
        return error_for_status(self.name, status, f"model {route.backend_model!r}: {message}")

    # -- model config ----------------------------------------------------------------------
    @staticmethod
    def _key(route) -> tuple:
        return (route.backend_model, route.version, route.input_name, route.output_name)

    def model_info(self, route) -> TritonModelInfo:
        info = self._info.get(self._key(route))
        if info is None:
            resp = self.http.request("GET", self._model_url(route) + "/config")
            if resp.status_code != 200:
                raise self._error(resp, route)
            try:
                info = self._parse_config(resp.json(), route)
            except (KeyError, IndexError, TypeError, ValueError) as exc:
                raise BackendBadResponse(self.name, f"unusable config for {route.backend_model!r}: {exc}") from None
            with self._lock:
                self._info[self._key(route)] = info
        return info

    @staticmethod
    def _parse_config(config: dict, route) -> TritonModelInfo:
        inputs, outputs = config["input"], config["output"]
        spec = next((i for i in inputs if i["name"] == route.input_name), inputs[0])
        out = next((o for o in outputs if o["name"] == route.output_name), outputs[0])
        fmt = spec.get("format", "FORMAT_NONE").replace("FORMAT_", "")
        return TritonModelInfo(
            input_name=route.input_name or spec["name"],
            datatype=spec["data_type"].replace("TYPE_", ""),
            dims=tuple(int(d) for d in spec["dims"]),
            layout=fmt if fmt in ("NCHW", "NHWC") else None,
            output_name=route.output_name or out["name"],
            max_batch_size=int(config.get("max_batch_size", 0)),
        )

    def forget(self, route) -> None:
        """Drop the cached config of ``route``'s model."""
        with self._lock:
            self._info.pop(self._key(route), None)

    # -- Backend interface -----------------------------------------------------------------
    def ready(self, route) -> bool:
        try:
            return self.http.request("GET", self._model_url(route) + "/ready").status_code == 200
        except BackendError:  # down, slow or garbled: not ready
            return False

    def max_batch_size(self, route) -> int:
        engine = self.model_info(route).max_batch_size or 1  # 0: no batch axis, one image per call
        return min(engine, self.settings.max_batch_size or engine)

    def infer(self, route, batch: np.ndarray) -> np.ndarray:
        try:
            return super().infer(route, batch)
        except (BackendUnavailable, BackendRejected, BackendBadResponse):
            self.forget(route)  # the model may have been reloaded with another config: ask again next time
            raise

    def infer_batch(self, route, batch: np.ndarray) -> np.ndarray:
        from tritonclient.http import InferenceServerClient, InferInput, InferRequestedOutput

        info = self.model_info(route)
        chunk = self._conform(route, info, batch)
        if info.max_batch_size == 0:
            chunk = chunk[0]
        tensor = InferInput(info.input_name, list(chunk.shape), info.datatype)
        tensor.set_data_from_numpy(chunk, binary_data=True)
        left = deadlines.remaining()  # Triton drops a request it cannot start within its timeout (microseconds)
        body, json_size = InferenceServerClient.generate_request_body(
            [tensor], outputs=[InferRequestedOutput(info.output_name, binary_data=True)],
            timeout=None if left is None else max(1, int(left * 1e6)))
        # identity: requests would ask for gzip by default, and compressing tensors costs both sides
        headers = {"Content-Type": "application/octet-stream", "Accept-Encoding": "identity"}
        if json_size is not None:
            headers["Inference-Header-Content-Length"] = str(json_size)
        resp = self.http.request("POST", self._model_url(route) + "/infer", data=body, headers=headers)
        if resp.status_code != 200:
            raise self._error(resp, route)
        try:
            header_length = resp.headers.get("Inference-Header-Content-Length")
            result = InferenceServerClient.parse_response_body(  # requests already undid any encoding
                resp.content, header_length=int(header_length) if header_length else None)
            out = result.as_numpy(info.output_name)
        except Exception as exc:  # tritonclient raises assorted types on a garbled body
            raise BackendBadResponse(self.name, f"undecodable answer from {route.backend_model!r}: {exc}") from None
        if out is None:
            raise BackendBadResponse(self.name, f"answer from {route.backend_model!r} lacks output "
                                                f"{info.output_name!r}")
        return out[None] if info.max_batch_size == 0 else out

    def _conform(self, route, info: TritonModelInfo, batch: np.ndarray) -> np.ndarray:
        """Adapt layout and dtype to what the server declares; refuse a size mismatch."""
        from tritonclient.utils import triton_to_np_dtype

        if info.layout and batch.ndim == 4:
            have = route.preprocess.layout
            if have != info.layout:
                batch = np.ascontiguousarray(batch.transpose((0, 2, 3, 1) if have == "NCHW" else (0, 3, 1, 2)))
        dims = batch.shape[1:]
        if len(dims) != len(info.dims) or any(d != -1 and d != h for d, h in zip(info.dims, dims)):
            raise BackendRejected(self.name, f"model {route.backend_model!r} expects input {info.input_name!r} of "
                                             f"shape {list(info.dims)}, the route's preprocessing makes {list(dims)}")
        dtype = triton_to_np_dtype(info.datatype)
        return batch if batch.dtype == dtype else batch.astype(dtype)

    def metadata(self, route) -> dict:
        resp = self.http.request("GET", self._model_url(route))
        if resp.status_code != 200:
            raise self._error(resp, route)
        meta = resp.json()
        info = self.model_info(route)
        return {**meta, "max_batch_size": info.max_batch_size, "input_layout": info.layout}

    def close(self) -> None:
        self.http.close()
