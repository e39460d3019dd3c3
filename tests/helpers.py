"""What many test modules share: class sets, image builders, API calls, assertions.

``Api`` speaks the gateway's HTTP API through Flask's test client with a requests-like
surface (``post(path, data=, json=, files=, params=, headers=)``), so API tests read like
HTTP tests but need no server process; ``classify`` works on an ``Api`` or a base URL.

Tolerances used across the suite, each with its reason:
- ``SAME_WEIGHTS_ATOL`` (1e-4, probabilities): the same weights run by two engines
  (ONNX Runtime's MLAS, libtorch's oneDNN, TensorFlow's Eigen) accumulate float32 sums in
  different orders and with different kernels per CPU; measured differences are ~1e-6..1e-5.
- ``SAME_ENGINE_ATOL`` (1e-5, probabilities): one engine, the same input, but another batch
  size or process: oneDNN and MLAS pick kernels per batch size and per CPU (an AMD EPYC gave
  1.25e-6 between a batch of 2 and two batches of 1 where this Intel Xeon gives 4.3e-7).
  Logits (values of order 10) move more (2.9e-6 here): compare them with SAME_WEIGHTS_ATOL.
"""
from __future__ import annotations

import base64
import io
import struct
import zlib
from pathlib import Path

import numpy as np
import requests
from PIL import Image

from gateway.detection import iou
from gateway.preprocess import PreprocessSpec

CAT = {281, 282, 285}  # tabby, tiger cat, Egyptian cat
CAT_LABELS = {"tabby", "tiger cat", "Egyptian cat"}
COFFEE = {967, 968, 504}  # espresso, cup, coffee mug
SAME_WEIGHTS_ATOL = 1e-4
SAME_ENGINE_ATOL = 1e-5


# -- images ------------------------------------------------------------------------------------
def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def jpeg_bytes(array, quality: int = 95) -> bytes:
    return encode(Image.fromarray(array), "JPEG", quality=quality)


def png(img: Image.Image) -> bytes:
    return encode(img, "PNG")


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def png_claiming(width: int, height: int) -> bytes:
    """A small real PNG whose header (with a valid CRC) claims another size."""
    data = bytearray(encode(Image.new("RGB", (4, 4)), "PNG"))
    ihdr = struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return bytes(data)


# -- the API -----------------------------------------------------------------------------------
class Answer:
    """The requests.Response surface the tests use, over a werkzeug test response."""

    def __init__(self, response):
        self.status_code = response.status_code
        self.headers = response.headers
        self.content = response.get_data()
        self.text = self.content.decode(errors="replace")  # binary bodies (V2 tensors) too

    def json(self):
        import json

        return json.loads(self.content)


class Api:
    """The gateway's HTTP API in process, through ``app.test_client()``."""

    def __init__(self, app):
        self.app = app
        self.gateway = app.extensions["gateway"]
        self.client = app.test_client()

    def request(self, method: str, path: str, *, data=None, json=None, files=None, params=None,
                headers=None, timeout=None) -> Answer:
        kw = {"headers": headers or {}, "query_string": params}
        if files is not None:
            items = files.items() if isinstance(files, dict) else files
            form: dict = {}
            for field, (name, content, *ctype) in items:
                form.setdefault(field, []).append((io.BytesIO(content), name, *(ctype[:1] or [None])))
            kw.update(data=form, content_type="multipart/form-data")
        elif json is not None:
            kw["json"] = json
        elif data is not None:
            kw["data"] = data
        return Answer(self.client.open(path, method=method, **kw))

    def get(self, path: str, **kw) -> Answer:
        return self.request("GET", path, **kw)

    def post(self, path: str, **kw) -> Answer:
        return self.request("POST", path, **kw)

    def put(self, path: str, **kw) -> Answer:
        return self.request("PUT", path, **kw)


def classify(api, data: bytes, model: str | None = None, **params):
    """POST raw bytes to the classify endpoint of an ``Api`` or a base URL."""
    path = f"/v1/models/{model}/classify" if model else "/v1/classify"
    headers = {"Content-Type": "application/octet-stream"}
    if isinstance(api, str):
        return requests.post(api + path, data=data, params=params, headers=headers, timeout=60)
    return api.post(path, data=data, params=params, headers=headers)


def assert_error(resp, status: int, code: str | None = None) -> dict:
    """A JSON error body with this status (and code); returns the error object."""
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"} and body["error"]["message"]
    if code:
        assert body["error"]["code"] == code, body
    return body["error"]


def top_indices(body: dict) -> list[int]:
    """Top-1 class index of each image in a classify answer."""
    return [r["predictions"][0]["index"] for r in body["results"]]


# -- the pipeline ------------------------------------------------------------------------------
def route_of(gw, model: str, name: str):
    """The route called ``name`` of a gateway model."""
    return next(r for r in gw.config.models[model].routes if r.name == name)


def preprocessed(gw, model: str, name: str, photos: list[bytes]):
    """(route, batch): photos decoded and preprocessed exactly as the gateway does for that route."""
    from gateway.preprocess import preprocess_image

    r = route_of(gw, model, name)
    images = gw.decode(photos, gw.config.models[model])
    return r, np.stack([preprocess_image(im, r.preprocess) for im in images])


# -- detection (YOLOX-Nano) ---------------------------------------------------------------------
COCO_LABELS = [line for line in (Path(__file__).resolve().parent.parent / "gateway/data/coco80_labels.txt")
               .read_text().splitlines() if line]
# the YOLOX convention (models/yolox_nano/README.md), as gateway.yaml declares it
YOLOX_PREPROCESS = PreprocessSpec(size=(416, 416), resize="letterbox", pad_value=114, pad_position="top_left",
                                  channels="BGR", scaling="raw", layout="NCHW", dtype="float32")
# what a person draws around the main object of scikit-image's photos (label, x1 y1 x2 y2)
HAND_BOXES = {"astronaut": ("person", (18, 18, 365, 512)), "coffee": ("cup", (170, 17, 412, 300)),
              "chelsea": ("cat", (0, 0, 400, 300))}


def box(x1, y1, x2, y2):
    return np.array([x1, y1, x2, y2], dtype=np.float64)


def box_iou(a: dict, b) -> float:
    return float(iou(box(a["x1"], a["y1"], a["x2"], a["y2"]), np.array([box(*b)]))[0])


def post_detect(api, data: bytes, model: str = "yolox_nano", **params):
    return api.post(f"/v1/models/{model}/detect", data=data, params=params,
                    headers={"Content-Type": "application/octet-stream"})


def assert_routes_agree(api, photos: dict, route: str) -> None:
    """A route's detections equal the embedded route's: IoU >= 0.99 per box, scores within 1e-4
    (two onnxruntime sessions on the same file: float noise only), the same labels in order."""
    for name, data in photos.items():
        ours, theirs = (post_detect(api, data, route=r) for r in ("embedded", route))
        assert ours.status_code == theirs.status_code == 200, theirs.text
        assert theirs.json()["route"] == route
        a, b = (resp.json()["results"][0]["detections"] for resp in (ours, theirs))
        assert [d["label"] for d in a] == [d["label"] for d in b] and a, name
        for x, y in zip(a, b):
            assert box_iou(x["box"], tuple(y["box"][k] for k in ("x1", "y1", "x2", "y2"))) >= 0.99
            assert abs(x["score"] - y["score"]) <= 1e-4
