"""NVIDIA Triton over its HTTP/REST (KServe v2) protocol, tensors as binary data.

tritonclient's own HTTP client is gevent-based and not thread-safe, so this adapter uses
tritonclient only to encode and decode the binary protocol
(``generate_request_body`` / ``parse_response_body``) and sends the bytes through one
pooled ``requests.Session``, which the WSGI server's threads can share.

Input name, layout, dims, dtype and ``max_batch_size`` come from the server's model
config (a route's ``input``/``output_name`` override the names); a request larger than
``max_batch_size`` is split into several calls and reassembled in order. The config is
cached per model and dropped after a failed call, so a reloaded model is re-learned.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np
import requests
from tritonclient.http import InferenceServerClient, InferInput, InferRequestedOutput
from tritonclient.utils import triton_to_np_dtype

from gateway.backends.base import Backend
from gateway.backends.http import BackendSession
from gateway.errors import BackendBadResponse, BackendRejected, BackendTimeout, BackendUnavailable

NOT_LOADED_HINTS = ("unknown model", "not found", "not ready", "unavailable", "is not loaded")


@dataclass(frozen=True)
class TritonModelInfo:
    input_name: str
    datatype: str  # Triton's, e.g. "FP32"
    dims: tuple[int, ...]  # without the batch axis; -1 = variable
    layout: str | None  # "NCHW" / "NHWC" from the config's format, when given
    output_name: str
    max_batch_size: int


class TritonBackend(Backend):
    kind = "triton"
    options = {"pool_size": 16}

    def __init__(self, settings):
        super().__init__(settings)
        self.http = BackendSession(self.name, settings)
        self._info: dict[tuple, TritonModelInfo] = {}
        self._lock = threading.Lock()
        self.calls = 0  # inference HTTP calls made (batches split count separately)

    # -- HTTP ------------------------------------------------------------------------------
    def _model_url(self, route) -> str:
        url = f"{self.settings.url}/v2/models/{route.model}"
        return f"{url}/versions/{route.version}" if route.version else url

    def _error(self, resp: requests.Response, route):
        try:
            message = resp.json().get("error") or resp.text
        except ValueError:
            message = resp.text[:300] or f"HTTP {resp.status_code}"
        text = f"model {route.model!r}: {message}"
        if resp.status_code in (404, 503) or any(h in message.lower() for h in NOT_LOADED_HINTS):
            return BackendUnavailable(self.name, text)
        if resp.status_code == 400:
            return BackendRejected(self.name, text)
        return BackendBadResponse(self.name, f"HTTP {resp.status_code}: {text}")

    # -- model config ----------------------------------------------------------------------
    def model_info(self, route) -> TritonModelInfo:
        key = (route.model, route.version, route.input_name, route.output_name)
        info = self._info.get(key)
        if info is None:
            resp = self.http.request("GET", self._model_url(route) + "/config")
            if resp.status_code != 200:
                raise self._error(resp, route)
            try:
                info = self._parse_config(resp.json(), route)
            except (KeyError, IndexError, TypeError, ValueError) as exc:
                raise BackendBadResponse(self.name, f"unusable config for {route.model!r}: {exc}") from None
            with self._lock:
                self._info[key] = info
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

    # -- Backend interface -----------------------------------------------------------------
    def ready(self, route) -> bool:
        try:
            return self.http.request("GET", self._model_url(route) + "/ready").status_code == 200
        except (BackendUnavailable, BackendTimeout):
            return False

    def infer(self, route, batch: np.ndarray) -> np.ndarray:
        info = self.model_info(route)
        try:
            batch = self._conform(route, info, batch)
            step = info.max_batch_size or 1  # max_batch_size 0: no batch axis, one image per call
            return np.concatenate([self._infer_chunk(route, info, batch[i:i + step])
                                   for i in range(0, len(batch), step)])
        except (BackendUnavailable, BackendRejected, BackendBadResponse):
            self.forget(route)  # the model may have been reloaded with another config: ask again next time
            raise

    def forget(self, route) -> None:
        """Drop the cached config of ``route``'s model."""
        with self._lock:
            self._info.pop((route.model, route.version, route.input_name, route.output_name), None)

    def _conform(self, route, info: TritonModelInfo, batch: np.ndarray) -> np.ndarray:
        """Adapt layout and dtype to what the server declares; refuse a size mismatch."""
        if info.layout and batch.ndim == 4:
            have = route.preprocess.layout
            if have != info.layout:
                batch = np.ascontiguousarray(batch.transpose((0, 2, 3, 1) if have == "NCHW" else (0, 3, 1, 2)))
        dims = batch.shape[1:]
        if len(dims) != len(info.dims) or any(d != -1 and d != h for d, h in zip(info.dims, dims)):
            raise BackendRejected(self.name, f"model {route.model!r} expects input {info.input_name!r} of shape "
                                             f"{list(info.dims)}, the route's preprocessing makes {list(dims)}")
        dtype = triton_to_np_dtype(info.datatype)
        return batch if batch.dtype == dtype else batch.astype(dtype)

    def _infer_chunk(self, route, info: TritonModelInfo, chunk: np.ndarray) -> np.ndarray:
        if info.max_batch_size == 0:
            chunk = chunk[0]
        tensor = InferInput(info.input_name, list(chunk.shape), info.datatype)
        tensor.set_data_from_numpy(chunk, binary_data=True)
        body, json_size = InferenceServerClient.generate_request_body(
            [tensor], outputs=[InferRequestedOutput(info.output_name, binary_data=True)])
        # identity: requests would ask for gzip by default, and compressing tensors costs both sides
        headers = {"Content-Type": "application/octet-stream", "Accept-Encoding": "identity"}
        if json_size is not None:
            headers["Inference-Header-Content-Length"] = str(json_size)
        self.calls += 1
        resp = self.http.request("POST", self._model_url(route) + "/infer", data=body, headers=headers)
        if resp.status_code != 200:
            raise self._error(resp, route)
        try:
            header_length = resp.headers.get("Inference-Header-Content-Length")
            result = InferenceServerClient.parse_response_body(  # requests already undid any encoding
                resp.content, header_length=int(header_length) if header_length else None)
            out = result.as_numpy(info.output_name)
        except Exception as exc:  # tritonclient raises assorted types on a garbled body
            raise BackendBadResponse(self.name, f"undecodable answer from {route.model!r}: {exc}") from None
        if out is None:
            raise BackendBadResponse(self.name, f"answer from {route.model!r} lacks output {info.output_name!r}")
        out = out[None] if info.max_batch_size == 0 else out
        if out.shape[0] != (1 if info.max_batch_size == 0 else chunk.shape[0]):
            raise BackendBadResponse(self.name, f"{route.model!r} answered {out.shape[0]} rows for "
                                                f"{chunk.shape[0]} images")
        return out

    def metadata(self, route) -> dict:
        resp = self.http.request("GET", self._model_url(route))
        if resp.status_code != 200:
            raise self._error(resp, route)
        meta = resp.json()
        info = self.model_info(route)
        return {**meta, "max_batch_size": info.max_batch_size, "input_layout": info.layout}

    def close(self) -> None:
        self.http.close()
