"""A small Python client for the gateway, and `gateway classify IMAGE...`.

    from gateway.tools.client import GatewayClient
    result = GatewayClient("http://127.0.0.1:8000").classify("cat.jpg", top_k=3)
"""
from __future__ import annotations

import sys
from pathlib import Path

import requests

DEFAULT_URL = "http://127.0.0.1:8000"


class ClientError(Exception):
    """The gateway answered an error (``status``, ``code``, ``message``) or could not be reached."""

    def __init__(self, status: int | None, code: str, message: str):
        super().__init__(message if status is None else f"{status} {code}: {message}")
        self.status, self.code, self.message = status, code, message


def gateway_url(url: str) -> str:
    """``host:port`` (tritonclient's habit) as ``http://host:port``; no trailing slash."""
    url = url.strip().rstrip("/")
    return url if "://" in url else "http://" + url


def _unreachable(url: str, exc: requests.RequestException, timeout: float) -> str:
    """Why a request got no answer, in words, with what to check."""
    text = str(exc)
    if isinstance(exc, requests.Timeout):
        reason = f"no answer within {timeout:g} s"
    elif "BadStatusLine" in text or "RemoteDisconnected" in text or "ProtocolError" in text:
        reason = "something answers there, but not HTTP/1.1 (is this the V2 gRPC port? use the HTTP port)"
    elif isinstance(exc, requests.ConnectionError):
        reason = "connection refused or host not found"
    else:
        reason = text
    return f"cannot reach the gateway at {url}: {reason}. Is `gateway serve` running there?"


def _read(image: bytes | bytearray | str | Path) -> bytes:
    return bytes(image) if isinstance(image, (bytes, bytearray)) else Path(image).read_bytes()


class GatewayClient:
    def __init__(self, url: str = DEFAULT_URL, timeout: float = 60.0, api_key: str | None = None):
        self.url = gateway_url(url)
        self.timeout = timeout
        self.session = requests.Session()
        if api_key:
            self.session.headers["X-API-Key"] = api_key

    def _call(self, method: str, path: str, **kw) -> dict:
        try:
            resp = self.session.request(method, self.url + path, timeout=self.timeout, **kw)
        except requests.RequestException as exc:
            raise ClientError(None, "unreachable", _unreachable(self.url, exc, self.timeout)) from None
        try:
            body = resp.json()
        except ValueError:
            raise ClientError(resp.status_code, "not_json", resp.text[:200]) from None
        if resp.status_code >= 400:
            err = body.get("error", {}) if isinstance(body, dict) else {}
            raise ClientError(resp.status_code, err.get("code", "error"), err.get("message", resp.text[:200]))
        return body

    def classify(self, images, model: str | None = None, backend: str | None = None,
                 top_k: int | None = None, route: str | None = None) -> dict:
        """One image (bytes or path) as a raw body, several as multipart ``image`` fields."""
        return self.infer("classify", images, model, backend=backend, route=route, top_k=top_k)

    def detect(self, images, model: str, backend: str | None = None, route: str | None = None, **params) -> dict:
        """Detection (``POST /v1/models/<model>/detect``); params: score_threshold,
        iou_threshold, max_detections. Images as in classify."""
        return self.infer("detect", images, model, backend=backend, route=route, **params)

    def infer(self, verb: str, images, model: str | None = None, **params) -> dict:
        """``POST /v1/models/<model>/<verb>`` (the model's task: classify, detect) with the task's
        options and route/backend as query parameters; no model: the default model's classify."""
        path = f"/v1/models/{model}/{verb}" if model else f"/v1/{verb}"
        params = {k: v for k, v in params.items() if v is not None}
        if isinstance(images, (bytes, bytearray, str, Path)):
            return self._call("POST", path, params=params, data=_read(images),
                              headers={"Content-Type": "application/octet-stream"})
        files = [("image", (f"image{i}", _read(im), "application/octet-stream")) for i, im in enumerate(images)]
        return self._call("POST", path, params=params, files=files)

    def models(self) -> dict:
        return self._call("GET", "/v1/models")

    def model(self, name: str) -> dict:
        return self._call("GET", f"/v1/models/{name}")

    def health(self) -> dict:
        return self._call("GET", "/healthz")


def register(subparsers) -> None:
    p = subparsers.add_parser("classify", help="classify image files through a running gateway")
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--url", default=DEFAULT_URL, help=f"gateway URL (default {DEFAULT_URL})")
    p.add_argument("--model", default=None, help="model (default: the gateway's default model)")
    p.add_argument("--backend", default=None, help="force a route/backend")
    p.add_argument("--top-k", type=int, default=None, dest="top_k")
    p.set_defaults(func=classify_command)


def classify_command(args) -> int:
    """Prints like Triton's image_client: one block per image, `    score (index) = label`."""
    client = GatewayClient(args.url)
    status = 0
    for path in args.images:
        try:
            body = client.classify(Path(path), model=args.model, backend=args.backend, top_k=args.top_k)
        except (ClientError, OSError) as exc:
            print(f"Image '{path}': error: {exc}", file=sys.stderr)
            status = 1
            continue
        print(f"Image '{path}':")  # Triton image_client's layout
        for p in body["results"][0]["predictions"]:
            print(f"    {p['score']:.4f} ({p['index']}) = {p['label']}")
    return status
