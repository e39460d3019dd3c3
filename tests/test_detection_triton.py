"""YOLOX-Nano on the real tritonserver (nvidia-pytriton's binary, CPU) through the canonical
`platform: "onnxruntime_onnx"` config, served here by the python-based onnxruntime stand-in.
Needs the Triton ports: run under `flock /tmp/gateway-real-servers.lock`."""
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import requests
import tritonclient.http as httpclient

from gateway.detection import DetectionSpec, detections, iou
from gateway.preprocess import decode_image, preprocess_bytes

from helpers import COCO_LABELS as LABELS
from helpers import HAND_BOXES, YOLOX_PREPROCESS, assert_routes_agree

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def photos(scene_photos):
    return scene_photos


@pytest.fixture(scope="module")
def client(triton_server):
    url = triton_server.backends["triton"].url
    c = httpclient.InferenceServerClient(url.split("://", 1)[1])
    yield c, url
    c.close()


def infer(client, batch: np.ndarray) -> np.ndarray:
    inp = httpclient.InferInput("images", list(batch.shape), "FP32")
    inp.set_data_from_numpy(batch, binary_data=True)
    out = httpclient.InferRequestedOutput("output", binary_data=True)
    return client.infer("yolox_nano", [inp], outputs=[out]).as_numpy("output")


def test_triton_reports_the_canonical_onnxruntime_platform(client):
    _, url = client
    meta = requests.get(f"{url}/v2/models/yolox_nano", timeout=10).json()
    assert meta["platform"] == "onnxruntime_onnx"
    assert meta["inputs"] == [{"name": "images", "datatype": "FP32", "shape": [-1, 3, 416, 416]}]
    assert meta["outputs"] == [{"name": "output", "datatype": "FP32", "shape": [-1, 3549, 85]}]


def test_triton_equals_onnxruntime_in_process_and_finds_the_same_boxes(client, photos):
    c, _ = client
    batch = np.stack([preprocess_bytes(p, YOLOX_PREPROCESS) for p in photos.values()])
    via_triton = infer(c, batch)
    session = ort.InferenceSession(str(ROOT / "onnx/yolox_nano.onnx"), providers=["CPUExecutionProvider"])
    local = session.run(None, {"images": batch})[0]
    # the same onnxruntime and file on both sides, but other thread counts may split the conv
    # reductions differently (~1e-6); outputs are offsets, log-sizes and scores of order 1..20
    np.testing.assert_allclose(via_triton, local, atol=1e-4)
    singles = np.concatenate([infer(c, batch[i:i + 1]) for i in range(len(batch))])
    np.testing.assert_allclose(singles, via_triton, atol=1e-4)  # batch 1 vs batch 3: kernel choice only

    sizes = [decode_image(p).size for p in photos.values()]
    spec = DetectionSpec()
    remote = detections(via_triton, sizes, LABELS, YOLOX_PREPROCESS, spec)
    here = detections(local, sizes, LABELS, YOLOX_PREPROCESS, spec)
    for name, theirs, ours in zip(photos, remote, here):
        assert theirs[0]["label"] == HAND_BOXES[name][0]
        assert [d["label"] for d in theirs] == [d["label"] for d in ours]
        for a, b in zip(theirs, ours):  # the route-parity criterion
            boxes = [np.array([d["box"][k] for k in ("x1", "y1", "x2", "y2")]) for d in (a, b)]
            assert iou(boxes[0], boxes[1][None])[0] >= 0.99 and abs(a["score"] - b["score"]) <= 1e-4


def test_the_gateways_triton_route_finds_what_embedded_finds(triton_server, make_api, photos):
    """Through the gateway: the same boxes (IoU >= 0.99) and scores (within 1e-4) on Triton."""
    assert_routes_agree(make_api(triton_server), photos, "triton")
