"""TorchServe: preprocessed batches as binary ``.npy`` over the inference API, readiness
and model status from the management API, optional bearer-token auth.

The handler (torchserve/handler.py) answers a ``.npy`` request with the raw logits as
``.npy``; TorchServe's own dynamic batching (``batchSize``/``maxBatchDelay`` in
torchserve/config.properties) merges concurrent requests into one forward pass. Big
batches go as requests of at most ``max_batch_size`` images (default 16): TorchServe's Java
frontend held ~900 MB for four concurrent 64-image (38.5 MB) requests and died at its 1 GB heap.
"""
from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Literal
from urllib.parse import urlparse

import numpy as np
import requests

from gateway.backends.base import Backend, RemoteSettings
from gateway.backends.http import BackendSession, error_for_status
from gateway.errors import BackendBadResponse, BackendError, BackendUnavailable
from gateway.settings import ConfigPath, HttpUrl, NonNegInt

NPY_MAGIC = b"\x93NUMPY"


class TorchServeSettings(RemoteSettings):
    kind: Literal["torchserve"]
    management_url: HttpUrl | None = None  # default: the inference port + 1
    token: str = ""  # a bearer key for a remote TorchServe
    token_file: ConfigPath | None = None  # TorchServe's key_file.json, read on every call (keys rotate)
    max_batch_size: NonNegInt = 16

    @property
    def management(self) -> str:
        if self.management_url:
            return self.management_url
        url = urlparse(self.url)
        return f"{url.scheme}://{url.hostname}:{(url.port or 8080) + 1}"


def workers_ready(models_answer: list) -> bool:
    """TorchServe's ``GET /models/<m>`` answer: servable when a worker is READY."""
    return any(w.get("status") == "READY" for entry in models_answer for w in entry.get("workers", []))


class TorchServeBackend(Backend):
    Settings = TorchServeSettings
    settings: TorchServeSettings

    def __init__(self, name: str, settings: TorchServeSettings):
        super().__init__(name, settings)
        self.http = BackendSession(self.name, settings)

    # -- auth ------------------------------------------------------------------------------
    def _token(self, api: str) -> str | None:
        """The bearer key: ``token``, or TorchServe's key_file.json (read per call: it rotates)."""
        if self.settings.token:
            return self.settings.token
        path: Path | None = self.settings.token_file
        if path is None:
            return None
        try:
            return json.loads(path.read_text())[api]["key"]
        except (OSError, ValueError, KeyError, TypeError):
            raise BackendUnavailable(self.name, f"cannot read the {api} key from token_file {str(path)!r}") from None

    def _request(self, method: str, url: str, api: str, **kw) -> requests.Response:
        headers = kw.pop("headers", {})
        token = self._token(api)
        if token:
            headers["Authorization"] = f"Bearer {token}"
        return self.http.request(method, url, headers=headers, **kw)

    def _model_path(self, route) -> str:
        return f"{route.backend_model}/{route.version}" if route.version else route.backend_model

    def _error(self, resp: requests.Response, route) -> BackendError:
        status, kind = resp.status_code, ""
        try:
            body = resp.json()
            message = body.get("message") or body.get("error") or resp.text
            kind = str(body.get("type", ""))
        except (ValueError, AttributeError):
            message = resp.text[:300] or f"HTTP {status}"
        # TorchServe 0.12 answers a missing or wrong key with 400 {"type": "InvalidKeyException"}
        if kind == "InvalidKeyException" or "Token Authorization" in str(message):
            status = 401
        return error_for_status(self.name, status, f"model {route.backend_model!r}: {message}")

    # -- Backend interface -----------------------------------------------------------------
    def model_status(self, route) -> list:
        """The management API's answer for the route's model (raises its error otherwise)."""
        resp = self._request("GET", f"{self.settings.management}/models/{self._model_path(route)}", "management")
        if resp.status_code != 200:
            raise self._error(resp, route)
        try:
            return resp.json()
        except ValueError:
            raise BackendBadResponse(self.name, f"management API answered non-JSON: {resp.text[:200]!r}") from None

    def ready(self, route) -> bool:
        try:
            return workers_ready(self.model_status(route))
        except (BackendError, TypeError, AttributeError):
            return False

    def infer_batch(self, route, batch: np.ndarray) -> np.ndarray:
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(batch, dtype=np.float32), allow_pickle=False)
        resp = self._request("POST", f"{self.settings.url}/predictions/{self._model_path(route)}", "inference",
                             data=buf.getvalue(), headers={"Content-Type": "application/octet-stream"})
        if resp.status_code != 200:
            raise self._error(resp, route)
        if not resp.content.startswith(NPY_MAGIC):
            raise BackendBadResponse(self.name, f"model {route.backend_model!r} did not answer with a .npy tensor "
                                                f"(is its archive built with the gateway's handler?)")
        try:
            return np.load(io.BytesIO(resp.content), allow_pickle=False)
        except ValueError as exc:
            raise BackendBadResponse(self.name, f"unreadable .npy answer: {exc}") from None

    def metadata(self, route) -> dict:
        (entry, *_) = self.model_status(route)
        keys = ("modelName", "modelVersion", "modelUrl", "runtime", "minWorkers", "maxWorkers",
                "batchSize", "maxBatchDelay", "loadedAtStartup")
        return {**{k: entry.get(k) for k in keys},
                "workers": [{"status": w.get("status"), "pid": w.get("pid")} for w in entry.get("workers", [])]}

    def close(self) -> None:
        self.http.close()
