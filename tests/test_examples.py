"""The photos the README's walk-through uses (examples/cat.jpg, examples/astronaut.png) give the
figures the README shows, and each figure is in the README as written.

Tolerances, each figure against the README's printed digits:
- probabilities (printed with 3 or 4 decimals): 1e-3 absolute. Different x86-64 CPUs pick
  different ONNX Runtime kernels (AVX2, AVX-512, AMX), which move float32 sums in the last bits;
  1e-3 holds the printed digits' rounding and that, and is still far below the 0.02 between
  tiger cat and Egyptian cat.
- logits as the classification extension prints them (%f, 6 decimals): SAME_WEIGHTS_ATOL (1e-4):
  logits of order 10 move by a few 1e-6 between CPUs (helpers.py), so the 6th decimal may differ
  on another machine (this AMD EPYC prints 9.190563 where an Intel Xeon printed 9.190564).
- detection scores (printed with 2 decimals): half the last digit plus the 1e-3 above.
"""
import json

import numpy as np
import pytest
from PIL import Image

from gateway.v2.tensors import join_bytes

from conftest import ROOT
from helpers import SAME_WEIGHTS_ATOL, classify, post_detect

EXAMPLES = ROOT / "examples"
README = (ROOT / "README.md").read_text()
PROBABILITY_ATOL = 1e-3  # different CPUs' kernels, beside the printed rounding (above)
DETECTION_ATOL = 0.005 + PROBABILITY_ATOL  # printed with 2 decimals

# what the README prints for examples/cat.jpg on the embedded route
CLASSIFY = {"tiger cat": 0.381, "Egyptian cat": 0.361, "tabby": 0.170}  # `curl -T examples/cat.jpg .../classify`
CLASSIFY_CLI = ["0.3811 (282) = tiger cat", "0.3607 (285) = Egyptian cat"]  # `gateway classify examples/cat.jpg`
V2_CLASSES = ["9.190563:282:tiger cat", "9.135601:285:Egyptian cat", "8.385268:281:tabby"]  # M_image, classification 3
IMAGE_CLIENT = ["10.642342 (285) = Egyptian cat"]  # Triton's image_client.py -s INCEPTION -c 3
DETECTIONS = {"astronaut.png": ("person", 0.93), "cat.jpg": ("cat", 0.63)}  # yolox_nano's best box


def photo(name: str) -> bytes:
    return (EXAMPLES / name).read_bytes()


def test_examples_are_scikit_images_photos_with_their_licence():
    from skimage import data

    astronaut = np.asarray(Image.open(EXAMPLES / "astronaut.png").convert("RGB"))
    np.testing.assert_array_equal(astronaut, data.astronaut())  # the PNG itself: lossless
    cat = Image.open(EXAMPLES / "cat.jpg")
    assert cat.format == "JPEG" and cat.size == (451, 300)
    # JPEG quality 95 of chelsea: within a couple of levels per pixel of the original
    assert np.abs(np.asarray(cat, dtype=np.float64) - data.chelsea()).mean() < 2
    notes = (EXAMPLES / "README.md").read_text()
    assert "CC0" in notes and "public domain" in notes and "quality 95" in notes


def test_readme_walk_through_uses_the_shipped_photos():
    assert "curl -T examples/cat.jpg" in README and "curl -T examples/astronaut.png" in README
    assert 'open("examples/cat.jpg", "rb")' in README


def test_cat_jpg_gives_the_readmes_classify_figures(api):
    resp = classify(api, photo("cat.jpg"), "efficientnet_lite0", route="embedded", top_k=3)
    assert resp.status_code == 200, resp.text
    got = {p["label"]: p["score"] for p in resp.json()["results"][0]["predictions"]}
    assert list(got) == list(CLASSIFY)  # the same classes, in this order
    for label, printed in CLASSIFY.items():
        assert abs(got[label] - printed) <= PROBABILITY_ATOL, (label, got[label], printed)
    assert f'"label": "tiger cat", "index": 282, "score": {CLASSIFY["tiger cat"]}' in README
    assert "tiger cat 0.381, Egyptian cat 0.361, tabby 0.170" in README
    for line in CLASSIFY_CLI:
        assert line in README
        value, rest = line.split(" ", 1)
        assert abs(got[rest.split(" = ")[1]] - float(value)) <= PROBABILITY_ATOL, line


def v2_classes(api, model: str, tensor: dict, blob: bytes) -> list[str]:
    """The classification extension's top 3 on the embedded route, the input in binary."""
    header = json.dumps({"inputs": [{**tensor, "parameters": {"binary_data_size": len(blob)}}],
                         "outputs": [{"name": "logits", "parameters": {"classification": 3}}]}).encode()
    resp = api.post(f"/v2/models/{model}/versions/embedded/infer", data=header + blob,
                    headers={"Inference-Header-Content-Length": str(len(header))})
    assert resp.status_code == 200, resp.text
    return resp.json()["outputs"][0]["data"]


def assert_classes(got: list[str], printed: list[str]) -> None:
    for text, expected in zip(got, printed):
        value, rest = text.split(":", 1)
        want_value, want_rest = expected.split(":", 1)
        assert rest == want_rest and abs(float(value) - float(want_value)) <= SAME_WEIGHTS_ATOL, (got, printed)


def test_cat_jpg_gives_the_readmes_v2_figures(api):
    got = v2_classes(api, "efficientnet_lite0_image", {"name": "image", "datatype": "BYTES", "shape": [1, 1]},
                     join_bytes([photo("cat.jpg")]))
    assert_classes(got, V2_CLASSES)
    assert "[[b'" + "' b'".join(V2_CLASSES) + "']]" in README  # the V2 Python snippet's printout
    assert f"{V2_CLASSES[0].replace(':', ' (', 1).replace(':', ') = ', 1)}" in README  # ensemble_image_client.py


def test_cat_jpg_gives_the_readmes_image_client_figure(api):
    """Triton's image_client.py preprocesses on the client: a bilinear resize to 224x224 and
    ``-s INCEPTION`` (x / 127.5 - 1), NCHW (its preprocess(), unchanged)."""
    image = Image.open(EXAMPLES / "cat.jpg").convert("RGB").resize((224, 224), Image.BILINEAR)
    tensor = (np.asarray(image).astype(np.float32) / 127.5 - 1).transpose(2, 0, 1)[None]
    got = v2_classes(api, "efficientnet_lite0", {"name": "input", "datatype": "FP32", "shape": [1, 3, 224, 224]},
                     np.ascontiguousarray(tensor, dtype=np.float32).tobytes())
    for line in IMAGE_CLIENT:
        assert line in README
        value, rest = line.split(" ", 1)
        index, label = rest.strip("(").split(") = ")
        assert_classes(got[:1], [f"{value}:{index}:{label}"])


@pytest.mark.parametrize("name", list(DETECTIONS))
def test_examples_give_the_readmes_detection_figures(api, name):
    resp = post_detect(api, photo(name))
    assert resp.status_code == 200, resp.text
    best = resp.json()["results"][0]["detections"][0]
    label, printed = DETECTIONS[name]
    assert best["label"] == label and abs(best["score"] - printed) <= DETECTION_ATOL, best
    assert f"`examples/{name}`'s {label} {printed:.2f}" in README
