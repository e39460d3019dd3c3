"""A small Python client for the gateway, and `gateway classify IMAGE...`.

    from gateway.client import GatewayClient
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
        super().__init__(f"{status or 'no answer'} {code}: {message}")
        self.status, self.code, self.message = status, code, message


def _read(image: bytes | bytearray | str | Path) -> bytes:
    return bytes(image) if isinstance(image, (bytes, bytearray)) else Path(image).read_bytes()


class GatewayClient:
    def __init__(self, url: str = DEFAULT_URL, timeout: float = 60.0, api_key: str | None = None):
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.session = requests.Session()
        if api_key:
            self.session.headers["X-API-Key"] = api_key

    def _call(self, method: str, path: str, **kw) -> dict:
        try:
            resp = self.session.request(method, self.url + path, timeout=self.timeout, **kw)
        except requests.RequestException as exc:
            raise ClientError(None, "unreachable", f"cannot reach the gateway at {self.url}: {exc}") from None
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
        path = f"/v1/models/{model}/classify" if model else "/v1/classify"
        return self._post_images(path, images, route=route, backend=backend, top_k=top_k)

    def detect(self, images, model: str, backend: str | None = None, route: str | None = None, **params) -> dict:
        """Detection (``POST /v1/models/<model>/detect``); params: score_threshold,
        iou_threshold, max_detections. Images as in classify."""
        return self._post_images(f"/v1/models/{model}/detect", images, route=route, backend=backend, **params)

    def _post_images(self, path: str, images, **params) -> dict:
        """One image (bytes or path) as a raw body, several as multipart ``image`` fields."""
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
