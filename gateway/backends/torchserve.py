"""TorchServe: preprocessed batches as binary ``.npy`` over the inference API, readiness
and model status from the management API, optional bearer-token auth.

The handler (torchserve/handler.py) answers a ``.npy`` request with the raw logits as
``.npy``; TorchServe's own dynamic batching (``batchSize``/``maxBatchDelay`` in
torchserve/config.properties) merges concurrent requests into one forward pass. Big
batches go as requests of at most ``max_batch`` images: TorchServe's Java frontend held
~900 MB for four concurrent 64-image (38.5 MB) requests and died at its 1 GB heap.
"""
from __future__ import annotations

import io
import json
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import requests

from gateway.backends.base import Backend
from gateway.backends.http import BackendSession
from gateway.errors import BackendBadResponse, BackendRejected, BackendTimeout, BackendUnavailable

NPY_MAGIC = b"\x93NUMPY"


class TorchServeBackend(Backend):
    kind = "torchserve"
    options = {"management_url": "", "token": "", "token_file": "", "pool_size": 16, "max_batch": 16}

    def __init__(self, settings):
        super().__init__(settings)
        self.http = BackendSession(self.name, settings)
        url = urlparse(settings.url)
        self.management_url = (settings.options.get("management_url")
                               or f"{url.scheme}://{url.hostname}:{(url.port or 8080) + 1}").rstrip("/")

    # -- auth ------------------------------------------------------------------------------
    def _token(self, api: str) -> str | None:
        """The bearer key: `token` from the YAML, or TorchServe's key_file.json (read per call,
        since TorchServe rotates keys)."""
        if self.settings.options.get("token"):
            return self.settings.options["token"]
        path = self.settings.options.get("token_file")
        if not path:
            return None
        path = Path(path) if Path(path).is_absolute() else self.root / path
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
        return f"{route.model}/{route.version}" if route.version else route.model

    # -- Backend interface -----------------------------------------------------------------
    def ready(self, route) -> bool:
        try:
            resp = self._request("GET", f"{self.management_url}/models/{self._model_path(route)}", "management")
            if resp.status_code != 200:
                return False
            workers = [w for entry in resp.json() for w in entry.get("workers", [])]
            return any(w.get("status") == "READY" for w in workers)
        except (BackendUnavailable, BackendTimeout, ValueError, TypeError, AttributeError):
            return False

    def infer(self, route, batch: np.ndarray) -> np.ndarray:
        step = int(self.settings.options.get("max_batch") or 0) or len(batch)
        if len(batch) <= step:
            return self._infer(route, batch)
        return np.concatenate([self._infer(route, batch[i:i + step]) for i in range(0, len(batch), step)])

    def _infer(self, route, batch: np.ndarray) -> np.ndarray:
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(batch, dtype=np.float32), allow_pickle=False)
        resp = self._request("POST", f"{self.settings.url}/predictions/{self._model_path(route)}", "inference",
                             data=buf.getvalue(), headers={"Content-Type": "application/octet-stream"})
        if resp.status_code != 200:
            raise self._error(resp, route)
        if not resp.content.startswith(NPY_MAGIC):
            raise BackendBadResponse(self.name, f"model {route.model!r} did not answer with a .npy tensor "
                                                f"(is its archive built with the gateway's handler?)")
        try:
            out = np.load(io.BytesIO(resp.content), allow_pickle=False)
        except ValueError as exc:
            raise BackendBadResponse(self.name, f"unreadable .npy answer: {exc}") from None
        if out.ndim != 2 or out.shape[0] != batch.shape[0]:
            raise BackendBadResponse(self.name, f"model {route.model!r} answered shape {out.shape} "
                                                f"for {batch.shape[0]} images")
        return out

    def _error(self, resp: requests.Response, route):
        kind = ""
        try:
            body = resp.json()
            message = body.get("message") or body.get("error") or resp.text
            kind = str(body.get("type", ""))
        except (ValueError, AttributeError):
            message = resp.text[:300] or f"HTTP {resp.status_code}"
        text = f"model {route.model!r}: HTTP {resp.status_code}: {message}"
        if resp.status_code in (404, 503):  # model not registered / no worker
            return BackendUnavailable(self.name, text)
        # TorchServe 0.12 answers a missing or wrong key with 400 {"type": "InvalidKeyException"}
        if resp.status_code in (401, 403) or kind == "InvalidKeyException" or "Token Authorization" in str(message):
            return BackendUnavailable(self.name, f"{text} (token auth: set token or token_file)")
        if 400 <= resp.status_code < 500 and resp.status_code != 408:
            return BackendRejected(self.name, text)
        if resp.status_code in (408, 504):
            return BackendTimeout(self.name, text)
        return BackendBadResponse(self.name, text)

    def metadata(self, route) -> dict:
        resp = self._request("GET", f"{self.management_url}/models/{self._model_path(route)}", "management")
        if resp.status_code != 200:
            raise self._error(resp, route)
        (entry, *_) = resp.json()
        keys = ("modelName", "modelVersion", "modelUrl", "runtime", "minWorkers", "maxWorkers",
                "batchSize", "maxBatchDelay", "loadedAtStartup")
        return {**{k: entry.get(k) for k in keys},
                "workers": [{"status": w.get("status"), "pid": w.get("pid")} for w in entry.get("workers", [])]}

    def close(self) -> None:
        self.http.close()
