"""YOLOX-Nano on the real TorchServe: torchserve/onnx_handler.py runs the ONNX file in the
worker, answering the gateway's preprocessed .npy batches with the raw output as .npy.
Needs the TorchServe ports: run under `flock /tmp/gateway-real-servers.lock`."""
import io
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import requests

from gateway.detection import DetectionSpec, detections, iou
from gateway.preprocess import decode_image, preprocess_bytes

from helpers import COCO_LABELS as LABELS
from helpers import HAND_BOXES, YOLOX_PREPROCESS, assert_routes_agree

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def photos(scene_photos):
    return scene_photos


@pytest.fixture(scope="module")
def yolox_url(torchserve_server):
    """yolox_nano.mar, loaded at start because gateway.yaml routes yolox_nano to TorchServe."""
    return f"{torchserve_server.backends['torchserve'].url}/predictions/yolox_nano"


def npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def post(url: str, body: bytes) -> requests.Response:
    return requests.post(url, data=body, headers={"Content-Type": "application/octet-stream"}, timeout=60)


@pytest.fixture(scope="module")
def batch_and_local(photos):
    batch = np.stack([preprocess_bytes(p, YOLOX_PREPROCESS) for p in photos.values()])
    session = ort.InferenceSession(str(ROOT / "onnx/yolox_nano.onnx"), providers=["CPUExecutionProvider"])
    return batch, session.run(None, {"images": batch})[0]


def test_torchserve_equals_onnxruntime_in_process_and_finds_the_same_boxes(yolox_url, photos, batch_and_local):
    batch, local = batch_and_local
    resp = post(yolox_url, npy(batch))
    assert resp.status_code == 200, resp.text
    via_ts = np.load(io.BytesIO(resp.content), allow_pickle=False)
    # the same onnxruntime and file, other thread counts: conv reductions may split differently
    # (~1e-6); outputs are offsets, log-sizes and scores of order 1..20
    np.testing.assert_allclose(via_ts, local, atol=1e-4)
    sizes = [decode_image(p).size for p in photos.values()]
    remote = detections(via_ts, sizes, LABELS, YOLOX_PREPROCESS, DetectionSpec())
    here = detections(local, sizes, LABELS, YOLOX_PREPROCESS, DetectionSpec())
    for name, theirs, ours in zip(photos, remote, here):
        assert theirs[0]["label"] == HAND_BOXES[name][0]
        assert [d["label"] for d in theirs] == [d["label"] for d in ours]
        for a, b in zip(theirs, ours):  # the route-parity criterion
            boxes = [np.array([d["box"][k] for k in ("x1", "y1", "x2", "y2")]) for d in (a, b)]
            assert iou(boxes[0], boxes[1][None])[0] >= 0.99 and abs(a["score"] - b["score"]) <= 1e-4


def test_torchserve_batches_concurrent_requests_without_mixing_rows(yolox_url, batch_and_local):
    batch, local = batch_and_local
    order = [0, 1, 2, 1, 0, 2, 2, 0]
    with ThreadPoolExecutor(4) as pool:  # TorchServe joins these into batches of up to 4
        answers = list(pool.map(lambda i: post(yolox_url, npy(batch[i])), order))
    for i, resp in zip(order, answers):
        assert resp.status_code == 200, resp.text
        np.testing.assert_allclose(np.load(io.BytesIO(resp.content))[0], local[i], atol=1e-4)  # as above


def test_torchserve_refuses_bad_input_and_keeps_serving(yolox_url, photos, batch_and_local):
    batch, local = batch_and_local
    jpeg = post(yolox_url, photos["chelsea"])
    assert jpeg.status_code == 400 and "expected a .npy" in jpeg.text
    wrong = post(yolox_url, npy(np.zeros((1, 3, 224, 224), np.float32)))
    assert wrong.status_code == 400 and "expected float32 (N, 3, 416, 416)" in wrong.text
    doubles = post(yolox_url, npy(batch[:1].astype(np.float64)))
    assert doubles.status_code == 400 and "float64" in doubles.text
    ok = post(yolox_url, npy(batch[:1]))
    assert ok.status_code == 200
    np.testing.assert_allclose(np.load(io.BytesIO(ok.content)), local[:1], atol=1e-4)  # as above


def test_the_gateways_torchserve_route_finds_what_embedded_finds(torchserve_server, make_api, photos):
    """Through the gateway: the same boxes (IoU >= 0.99) and scores (within 1e-4, float noise
    between two onnxruntime sessions with other thread counts) on the TorchServe route."""
    assert_routes_agree(make_api(torchserve_server), photos, "torchserve")
