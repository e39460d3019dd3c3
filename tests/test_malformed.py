"""A malformed-input corpus (every case a 4xx JSON error, never a 5xx), unusual-but-valid
images (all 200), API-key auth, the OpenAPI description and property-based fuzzing, all
through the app in process."""
import io
import json
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from conftest import load_yaml_config
from helpers import b64, encode, png_claiming

JPEG = encode(Image.new("RGB", (64, 48), (200, 30, 30)), "JPEG")
PNG = encode(Image.new("RGB", (64, 48), (30, 200, 30)), "PNG")


def gif_claiming(width: int, height: int) -> bytes:
    return (b"GIF89a" + struct.pack("<HH", width, height) + b"\x00\x00\x00"
            + b"\x2c" + struct.pack("<HHHH", 0, 0, width, height) + b"\x00\x02\x02\x44\x01\x00\x3b")


def bmp_claiming(width: int, height: int) -> bytes:
    header = struct.pack("<2sIHHI", b"BM", 54, 0, 0, 54)
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, 0, 2835, 2835, 0, 0)
    return header + info


def raw(data: bytes, ctype: str = "application/octet-stream"):
    return {"data": data, "headers": {"Content-Type": ctype}}


# (id, path, request kwargs, expected status)
CORPUS = [
    ("zero-bytes", "/v1/classify", raw(b""), 400),
    ("text", "/v1/classify", raw(b"hello gateway, classify me"), 400),
    ("text-as-image/jpeg", "/v1/classify", raw(b"plain words", "image/jpeg"), 400),
    ("garbage-bytes", "/v1/classify", raw(bytes(range(256)) * 10), 400),
    ("truncated-jpeg", "/v1/classify", raw(JPEG[: len(JPEG) // 2], "image/jpeg"), 400),
    ("jpeg-header-only", "/v1/classify", raw(JPEG[:20], "image/jpeg"), 400),
    ("truncated-png", "/v1/classify", raw(PNG[: len(PNG) // 2], "image/png"), 400),
    ("png-bad-crc", "/v1/classify", raw(PNG[:30] + b"\x00\x00\x00\x00" + PNG[34:], "image/png"), 400),
    ("png-absurd-dims", "/v1/classify", raw(png_claiming(100_000, 100_000), "image/png"), 400),
    ("png-zero-dims", "/v1/classify", raw(png_claiming(0, 0), "image/png"), 400),
    ("gif-absurd-dims", "/v1/classify", raw(gif_claiming(65_535, 65_535), "image/gif"), 400),
    ("bmp-absurd-dims", "/v1/classify", raw(bmp_claiming(60_000, 60_000), "image/bmp"), 400),
    ("bad-base64", "/v1/classify", {"json": {"image": "%%%not-base64%%%"}}, 400),
    ("base64-of-text", "/v1/classify", {"json": {"image": b64(b"just text")}}, 400),
    ("empty-base64", "/v1/classify", {"json": {"image": ""}}, 400),
    ("json-image-number", "/v1/classify", {"json": {"image": 12345}}, 400),
    ("json-images-string", "/v1/classify", {"json": {"images": b64(JPEG)}}, 400),
    ("json-images-nested", "/v1/classify", {"json": {"images": [[b64(JPEG)]]}}, 400),
    ("json-images-empty", "/v1/classify", {"json": {"images": []}}, 400),
    ("json-both-keys", "/v1/classify", {"json": {"image": b64(JPEG), "images": [b64(JPEG)]}}, 400),
    ("json-unknown-key", "/v1/classify", {"json": {"image": b64(JPEG), "top_k": 3}}, 400),
    ("json-array", "/v1/classify", {"json": [b64(JPEG)]}, 400),
    ("json-null", "/v1/classify", {"data": b"null", "headers": {"Content-Type": "application/json"}}, 400),
    ("json-broken", "/v1/classify", {"data": b'{"image": ', "headers": {"Content-Type": "application/json"}}, 400),
    ("multipart-no-file", "/v1/classify", {"files": {"other": ("x.txt", b"abc")}}, 400),
    ("multipart-form-field-only", "/v1/classify", {"data": {"image": "not a file"},
                                                   "files": {"dummy": ("", b"")}}, 400),
    ("multipart-corrupt-image", "/v1/classify", {"files": {"image": ("a.jpg", JPEG[:40])}}, 400),
    ("multipart-second-bad", "/v1/classify", {"files": [("image", ("a.jpg", JPEG)), ("image", ("b.jpg", b"xx"))]}, 400),
    ("unknown-model", "/v1/models/resnet9000/classify", raw(JPEG), 404),
    ("unknown-backend", "/v1/classify?backend=nowhere", raw(JPEG), 404),
    ("empty-backend", "/v1/classify?backend=", raw(JPEG), 400),
    ("top_k-zero", "/v1/classify?top_k=0", raw(JPEG), 400),
    ("top_k-negative", "/v1/classify?top_k=-1", raw(JPEG), 400),
    ("top_k-huge", "/v1/classify?top_k=100000000000000000000", raw(JPEG), 400),
    ("top_k-text", "/v1/classify?top_k=five", raw(JPEG), 400),
    ("top_k-float", "/v1/classify?top_k=2.5", raw(JPEG), 400),
    ("top_k-twice", "/v1/classify?top_k=2&top_k=3", raw(JPEG), 400),
    ("unknown-param", "/v1/classify?topk=3", raw(JPEG), 400),
    ("xml-content-type", "/v1/classify", raw(b"<img/>", "application/xml"), 415),
    ("text-content-type", "/v1/classify", raw(JPEG, "text/plain"), 415),
    ("oversized-body", "/v1/classify", raw(b"\xff" * 300_000), 413),
    ("too-many-images", "/v1/classify", {"json": {"images": [b64(JPEG)] * 5}}, 400),
    ("pixel-bomb", "/v1/classify", raw(encode(Image.new("L", (1500, 1000)), "PNG"), "image/png"), 400),
]


@pytest.fixture(scope="module")
def strict_gateway(make_api):
    """The default config with small limits so the limit cases stay cheap."""
    config = load_yaml_config()
    config["server"].update(max_body_bytes=200_000, max_pixels=1_000_000, max_images=4)
    return make_api(config)


def test_corpus_has_at_least_25_cases():
    assert len(CORPUS) >= 25


@pytest.mark.parametrize("case,path,kwargs,status", CORPUS, ids=[c[0] for c in CORPUS])
def test_malformed_input_gets_a_4xx_json_error(strict_gateway, case, path, kwargs, status):
    resp = strict_gateway.post(path, **kwargs)
    assert resp.status_code == status, resp.text
    assert resp.headers["Content-Type"].startswith("application/json")
    error = resp.json()["error"]
    assert error["code"] and error["message"]


def test_server_still_answers_after_the_corpus(strict_gateway):
    resp = strict_gateway.post("/v1/classify", data=JPEG)
    assert resp.status_code == 200


def cmyk_jpeg() -> bytes:
    return encode(Image.new("CMYK", (40, 40), (10, 200, 30, 0)), "JPEG")


def exif_rotated() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 8
    return encode(Image.new("RGB", (60, 30), (5, 5, 250)), "JPEG", exif=exif.tobytes())


def animated_gif() -> bytes:
    frames = [Image.new("P", (20, 20), i) for i in range(3)]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], loop=0)
    return buf.getvalue()


VALID = {
    "1x1": encode(Image.new("RGB", (1, 1), (1, 2, 3)), "PNG"),
    "16-bit-png": encode(Image.fromarray((np.arange(400, dtype=np.uint16) * 150).reshape(20, 20)), "PNG"),
    "16-bit-tiff": encode(Image.fromarray(np.full((20, 20), 40000, dtype=np.uint16)), "TIFF"),
    "cmyk-jpeg": cmyk_jpeg(),
    "grayscale": encode(Image.new("L", (30, 30), 90), "JPEG"),
    "rgba": encode(Image.new("RGBA", (30, 30), (1, 2, 3, 100)), "PNG"),
    "palette-transparent": encode(Image.new("P", (30, 30), 0), "PNG", transparency=0),
    "animated-gif": animated_gif(),
    "exif-rotated": exif_rotated(),
    "webp": encode(Image.new("RGB", (30, 30), (9, 9, 9)), "WEBP"),
    "bmp": encode(Image.new("RGB", (30, 30), (9, 9, 9)), "BMP"),
    "very-wide": encode(Image.new("RGB", (2000, 2), (9, 99, 9)), "PNG"),
}


@pytest.mark.parametrize("name", list(VALID))
def test_unusual_but_valid_images_answer_200(strict_gateway, name):
    resp = strict_gateway.post("/v1/classify", data=VALID[name],
                         headers={"Content-Type": "application/octet-stream"})
    assert resp.status_code == 200, resp.text
    assert len(resp.json()["results"][0]["predictions"]) == 5


def test_api_keys_protect_everything_but_health(make_api):
    config = load_yaml_config()
    config["server"]["api_keys"] = ["s3cret-key", "other-key"]
    url = make_api(config)
    post = lambda headers: url.post("/v1/classify", data=JPEG,
                                         headers={"Content-Type": "image/jpeg", **headers})
    assert post({}).status_code == 401 and post({}).json()["error"]["code"] == "missing_api_key"
    assert post({"X-API-Key": "s3cret-kex"}).json()["error"]["code"] == "invalid_api_key"
    assert post({"X-API-Key": "s3cret-key"}).status_code == 200
    assert post({"Authorization": "Bearer other-key"}).status_code == 200
    assert url.get("/v1/models").status_code == 401
    assert url.get("/healthz").status_code == 200
    assert url.get("/readyz").status_code == 200


def test_openapi_description_is_served(strict_gateway):
    spec = strict_gateway.get("/openapi.json").json()
    assert spec["openapi"].startswith("3.")
    assert "/v1/models/{model}/classify" in spec["paths"]
    enum = spec["paths"]["/v1/models/{model}/classify"]["post"]["parameters"][0]["schema"]["enum"]
    assert set(enum) == {"efficientnet_lite0", "mobilenet_v2"}


# --- property-based fuzzing of the HTTP surface: whatever arrives, never a 5xx ---

content_types = st.sampled_from(["application/octet-stream", "image/jpeg", "image/png", "application/json",
                                 "multipart/form-data", "text/plain", "", "application/x-www-form-urlencoded",
                                 "multipart/form-data; boundary=xyz", "image/*"])
bodies = st.one_of(
    st.binary(max_size=2048),
    st.binary(max_size=512).map(lambda b: JPEG[:64] + b),
    st.binary(max_size=512).map(lambda b: PNG[:33] + b),
    st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=20),
                 lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
                     st.sampled_from(["image", "images", "x"]), inner, max_size=3),
                 max_leaves=6).map(lambda v: json.dumps(v).encode()),
)
queries = st.dictionaries(st.sampled_from(["top_k", "backend", "model", "x"]),
                          st.text(max_size=12) | st.integers(-5, 2000).map(str), max_size=3)
paths = st.sampled_from(["/v1/classify", "/v1/models/efficientnet_lite0/classify",
                         "/v1/models/mobilenet_v2/classify", "/v1/models/%00/classify", "/v1/models/../classify"])


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(path=paths, ctype=content_types, body=bodies, query=queries, method=st.sampled_from(["POST", "PUT"]))
def test_fuzzed_requests_never_get_a_5xx(strict_gateway, path, ctype, body, query, method):
    resp = strict_gateway.request(method, path, params=query, data=body,
                                  headers={"Content-Type": ctype} if ctype else {})
    assert resp.status_code < 500, (resp.status_code, resp.text)
    if resp.status_code >= 400:
        assert "error" in resp.json()
