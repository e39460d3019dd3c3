"""The int8 model (gateway/ops/export/quantize.py, built by `make setup`): its gate, its routes.

The gate fails a build on a broken quantization (calibrated on blank photos) and leaves no int8
file; the built model is the one recorded (same bytes when quantized again); the embedded int8
route agrees with FP32 and meets the accuracy floor on the 100 labelled photos; Triton's and
TorchServe's int8 routes (the same file in onnxruntime, real servers) agree with the embedded one;
/v1/models shows each route's precision, accuracy and speed from the last build.

Accuracy figures are exact counts over the 100 photos, not float comparisons. Tolerances on
logits are in steps of the int8 model's output grid (its last DequantizeLinear's scale): see
``GRID_STEPS``.
"""
import hashlib
import json
import shutil

import numpy as np
import pytest
import requests
from PIL import Image

from gateway.cli import main as gateway_cli
from gateway.config import load_config, parse_config
from gateway.ops.export import build as export_build
from gateway.ops.export import quantize
from gateway.ops.export.table import ENTRIES
from gateway.service import Gateway
from gateway.tools.evaluation import agreement, evaluate_route, in_process_classifier, read_labels

from conftest import ROOT, load_yaml_config
from helpers import CAT, COFFEE, classify, preprocessed, route_of

MODEL = "efficientnet_lite0"
ENTRY = ENTRIES[MODEL]
PHOTOS = ROOT / "tests" / "data" / "imagenet-sample"
TOP1_FLOOR = 0.85  # as tests/test_accuracy.py holds every FP32 route; the int8 model measured 0.89
AGREEMENT = 0.95  # the build's gate (quantize.MIN_AGREEMENT); measured 0.96: 4 flips, all on photos
#                   whose two best FP32 classes are within 0.15 of each other
# The same int8 file in the same onnxruntime on the same CPU (Triton's and TorchServe's workers run
# this venv's onnxruntime): the integer kernels are exact, and measured bitwise equal here across
# batch sizes (1, 5, 8) and thread counts (1, 2). The stem conv is float32, though, and another
# batch split may pick another float kernel on another CPU (AMD and Intel, VNNI or not): a stem
# value at a uint8 rounding boundary can then land one step over, which moves a logit by a step or
# two of its uint8 grid downstream. Two steps bound that; a wrong file or preprocessing moves whole units.
GRID_STEPS = 2


@pytest.fixture(scope="module")
def record() -> dict:
    return json.loads((ROOT / "artifacts.json").read_text())["models"][MODEL]["int8"]


@pytest.fixture(scope="module")
def grid_step() -> float:
    """The int8 model's logits come out of a DequantizeLinear: their grid step is its scale."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(ROOT / ENTRY.int8_files[0]))
    last = next(n for n in model.graph.node if model.graph.output[0].name in n.output)
    assert last.op_type == "DequantizeLinear"
    return float(next(numpy_helper.to_array(i) for i in model.graph.initializer if i.name == last.input[1]))


@pytest.fixture(scope="module")
def labelled():
    return read_labels(PHOTOS, PHOTOS / "labels.csv")


@pytest.fixture(scope="module")
def gateway():
    gw = Gateway(load_config(ROOT / "gateway.yaml"))
    gw.load()
    yield gw
    gw.close()


# --- the build ---

def test_the_manifest_records_the_int8_model_its_calibration_and_its_gate(record):
    files = [ROOT / f for f in ENTRY.int8_files]
    assert record["files"] == ENTRY.int8_files == ["onnx/efficientnet_lite0_int8.onnx",
                                                   "model_repository/efficientnet_lite0_int8/1/model.onnx"]
    assert files[0].read_bytes() == files[1].read_bytes()  # Triton's copy: the same bytes
    assert record["sha256"] == hashlib.sha256(files[0].read_bytes()).hexdigest()
    assert record["fp32_sha256"] == quantize.sha256(ROOT / ENTRY.onnx) and record["from"] == ENTRY.onnx
    assert record["method"] == quantize.METHOD and record["backend_model"] == "efficientnet_lite0_int8"
    calibration = record["calibration"]
    assert calibration["folder"] == "data/imagenet-calib" and calibration["photos"] == 100
    assert calibration["sha256"] == quantize.fingerprint(quantize.calibration_set(ROOT / "data/imagenet-calib"))
    # never the evaluation photos: the two sets share no photo (nor a class)
    assert not {p.name for p in (ROOT / "data/imagenet-calib").iterdir()} & {p.name for p in PHOTOS.glob("*.jpg")}
    gate = record["gate"]
    assert gate["passed"] and gate["photos"] == 100 and gate["agreement_top1"] >= AGREEMENT
    assert gate["top1_drop"] <= quantize.MAX_TOP1_DROP + quantize.EPS
    assert quantize.stale(ROOT, ENTRY, record) == ""  # what `gateway models build` keeps


def test_quantizing_again_writes_the_same_bytes(tmp_path, record):
    """Reproducible as the same bytes: MinMax ranges over a fixed, sorted set of photos and a
    deterministic rewrite (on this CPU and onnxruntime; the FP32 model that measures the ranges
    runs other float kernels on other CPUs, so another machine may differ in the last bits of a
    scale: the gate then holds its answers, not its bytes)."""
    spec = load_config(ROOT / "gateway.yaml").models[MODEL].preprocess
    out = tmp_path / "again.onnx"
    quantize.quantize_file(ROOT / ENTRY.onnx, out, spec, quantize.calibration_set(ROOT / "data/imagenet-calib"))
    assert hashlib.sha256(out.read_bytes()).hexdigest() == record["sha256"]


def _repo_with_the_fp32_models(tmp_path):
    """A repository holding links to the built FP32 models and their records, no int8 model."""
    root = tmp_path / "repo"
    for rel in [f for e in ENTRIES.values() for f in e.files] + ["tests/data/imagenet-sample"]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).symlink_to(ROOT / rel)
    shutil.copy(ROOT / "gateway.yaml", root / "gateway.yaml")  # the config's folder is the repository
    built = json.loads((ROOT / "artifacts.json").read_text())["models"]
    (root / "artifacts.json").write_text(json.dumps({"models": {
        name: {k: v for k, v in entry.items() if k != "int8"} for name, entry in built.items()}}))
    return root


def test_a_broken_quantization_fails_the_build_naming_the_figures_and_leaves_no_file(tmp_path, monkeypatch, capsys):
    """Calibrated on blank grey photos, every activation range collapses: the gate must stop the
    build, say the figures, and remove what it wrote."""
    root = _repo_with_the_fp32_models(tmp_path)
    blank = root / "data/imagenet-calib"
    blank.mkdir(parents=True)
    for i in range(10):
        Image.new("RGB", (256, 256), (128, 128, 128)).save(blank / f"{i:03d}_blank.jpg", quality=90)
    monkeypatch.setattr(export_build, "_torchserve_archives", lambda *a: [])  # not reached: the build stops first
    assert gateway_cli(["models", "build", "--config", str(root / "gateway.yaml")]) == 1
    err = capsys.readouterr().err
    assert "efficientnet_lite0: the int8 model fails the accuracy gate on tests/data/imagenet-sample: top-1 0.890 ->" \
        in err, err
    assert "top-1 agreement" in err and "needs a top-1 drop <= 0.015, agreement >= 95%" in err, err
    written = [p for p in root.rglob("*") if "int8" in p.name or ".partial" in p.name or ".quantize-" in p.name]
    assert written == [], written
    assert "int8" not in json.loads((root / "artifacts.json").read_text())["models"][MODEL]


def test_the_calibration_folder_is_never_the_evaluation_folder(capsys):
    argv = ["models", "quantize", MODEL, "--config", str(ROOT / "gateway.yaml"), "--calibration", str(PHOTOS)]
    assert gateway_cli(argv) == 1
    assert "is the gate's evaluation set" in capsys.readouterr().err


# --- the routes ---

def test_the_int8_route_agrees_with_fp32_and_meets_the_floor(gateway, labelled):
    classify_photos = in_process_classifier(gateway, MODEL)
    fp32 = evaluate_route(classify_photos, "embedded", labelled)
    int8 = evaluate_route(classify_photos, "embedded-int8", labelled)
    assert not fp32["errors"] and not int8["errors"], int8["errors"][:2]
    assert agreement(int8, fp32) >= AGREEMENT
    assert int8["top1"] >= TOP1_FLOOR and int8["top5"] >= 0.95


def test_the_int8_route_answers_like_every_route(gateway, photos):
    result = gateway.infer(MODEL, photos, task="classification", options={"top_k": 5}, route="embedded-int8")
    top1 = [r[0]["index"] for r in result.results]
    assert top1[0] in CAT and top1[1] in COFFEE
    info = gateway.backends["embedded"].metadata(route_of(gateway, MODEL, "embedded-int8"))
    assert info["file"].endswith("onnx/efficientnet_lite0_int8.onnx")


def _agrees_with_embedded_int8(gw, route: str, labelled, grid_step: float) -> None:
    images = [p.path.read_bytes() for p in labelled]
    r_remote = route_of(gw, MODEL, route)
    batch = np.concatenate([preprocessed(gw, MODEL, route, images[i:i + 50])[1] for i in range(0, len(images), 50)])
    r_embedded = route_of(gw, MODEL, "embedded-int8")
    remote = gw.backends[r_remote.backend].infer(r_remote, batch)
    local = gw.backends["embedded"].infer(r_embedded, batch)
    assert remote.shape == local.shape == (len(images), 1000)
    np.testing.assert_allclose(remote, local, rtol=0, atol=GRID_STEPS * grid_step * 1.001)  # see GRID_STEPS
    assert (remote.argmax(axis=1) == local.argmax(axis=1)).mean() >= 0.99  # a near tie may sit one step apart


def test_triton_int8_route_agrees_with_embedded_int8(triton_server, labelled, grid_step):
    """Triton's onnxruntime_onnx platform (model_repository/efficientnet_lite0_int8) on the real tritonserver."""
    gw = Gateway(triton_server)
    gw.load()
    try:
        base = triton_server.backends["triton"].url
        platform = requests.get(f"{base}/v2/models/efficientnet_lite0_int8", timeout=10).json()["platform"]
        assert platform == "onnxruntime_onnx"
        _agrees_with_embedded_int8(gw, "triton-int8", labelled, grid_step)
    finally:
        gw.close()


@pytest.fixture(scope="module")
def torchserve_int8(torchserve_server):
    """The int8 model as a TorchServe archive (torchserve/onnx_handler.py, as the detector's), built
    and registered on the running TorchServe for this module, with a route to it. gateway.yaml has
    no such route: compose's official TorchServe image has no onnxruntime for that handler."""
    from gateway.ops.servers.torchserve import build_archives

    data = load_yaml_config()
    data["models"][MODEL]["routes"].append(
        {"name": "torchserve-int8", "backend": "torchserve", "backend_model": "efficientnet_lite0_int8"})
    config = parse_config(data, ROOT)
    archives = build_archives(config, log=lambda *_: None)
    assert ROOT / "torchserve/model_store/efficientnet_lite0_int8.mar" in archives
    management = config.backends["torchserve"].management
    resp = requests.post(f"{management}/models", timeout=300, params={
        "url": "efficientnet_lite0_int8.mar", "initial_workers": 1, "synchronous": "true",
        "batch_size": 8, "max_batch_delay": 5})
    assert resp.status_code == 200, resp.text
    yield config
    requests.delete(f"{management}/models/efficientnet_lite0_int8", timeout=60)


def test_torchserve_int8_route_agrees_with_embedded_int8(torchserve_int8, labelled, grid_step):
    gw = Gateway(torchserve_int8)
    gw.load()
    try:
        _agrees_with_embedded_int8(gw, "torchserve-int8", labelled, grid_step)
    finally:
        gw.close()


def test_models_list_each_route_with_its_precision_accuracy_and_speed(api, record, chelsea_jpeg):
    body = api.get("/v1/models").json()
    routes = {r["name"]: r for r in next(m for m in body["models"] if m["name"] == MODEL)["routes"]}
    int8, fp32 = routes["embedded-int8"], routes["embedded"]
    assert (int8["precision"], fp32["precision"], routes["triton-int8"]["precision"]) == ("int8", "fp32", "int8")
    assert int8["accuracy"] == record["report"]["int8"]["accuracy"] and int8["accuracy"]["top1"] >= TOP1_FLOOR
    assert fp32["accuracy"]["top1"] == record["gate"]["accuracy"]["fp32"]["top1"]
    assert int8["speed"]["file"] == "onnx/efficientnet_lite0_int8.onnx" and int8["speed"]["ms_per_image"] > 0
    detector = next(m for m in body["models"] if m["name"] == "yolox_nano")["routes"][0]
    assert (detector["precision"], detector["accuracy"], detector["speed"]) == ("fp32", None, None)
    answer = classify(api, chelsea_jpeg, model=MODEL, route="embedded-int8")
    assert answer.status_code == 200 and answer.json()["route"] == "embedded-int8"
