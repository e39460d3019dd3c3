"""The exported artifacts (built by `make setup`): right classes, parity between formats,
the seed's tensor names, and the offline-testable torchvision weight path."""
import hashlib
import json
import shutil
import subprocess
import sys

import numpy as np
import onnxruntime as ort
import pytest
import torch

from gateway.ops.export import build as export_build
from gateway.ops.export import mobilenet_v2
from gateway.ops.export.artifacts import export_onnx, export_torchscript, verify_exports
from gateway.ops.export.build import build_models
from gateway.postprocess import softmax
from gateway.preprocess import PreprocessSpec, preprocess_bytes

from conftest import ROOT
from helpers import CAT, COFFEE, SAME_WEIGHTS_ATOL


def onnx_logits(name: str, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(ROOT / "onnx" / f"{name}.onnx"), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x})[0]


@pytest.fixture(scope="module")
def photo_batch(chelsea_jpeg, coffee_jpeg):
    """chelsea and coffee as one NCHW float32 batch (ImageNet scaling, stretched to 224)."""
    spec = PreprocessSpec()
    return np.stack([preprocess_bytes(chelsea_jpeg, spec), preprocess_bytes(coffee_jpeg, spec)])


def test_efficientnet_onnx_knows_cats_and_coffee(photo_batch):
    top1 = onnx_logits("efficientnet_lite0", photo_batch).argmax(axis=1)
    assert top1[0] in CAT and top1[1] in COFFEE


@pytest.mark.parametrize("onnx_name,torchscript", [("efficientnet_lite0", "efficientnet_lite0"),
                                                   ("mobilenet_v2", "torchmobilenet")])
def test_onnx_and_torchscript_agree(photo_batch, onnx_name, torchscript):
    scripted = torch.jit.load(str(ROOT / "model_repository" / torchscript / "1" / "model.pt"))
    with torch.no_grad():
        ts = softmax(scripted(torch.from_numpy(photo_batch)).numpy())
    ox = softmax(onnx_logits(onnx_name, photo_batch))
    np.testing.assert_array_equal(np.argsort(-ts)[:, :5], np.argsort(-ox)[:, :5])
    np.testing.assert_allclose(ts, ox, atol=SAME_WEIGHTS_ATOL)  # libtorch vs ONNX Runtime: see helpers


@pytest.mark.parametrize("torchscript", ["efficientnet_lite0", "torchmobilenet"])
def test_torchscript_batch_axis_is_dynamic(photo_batch, torchscript):
    """Traced with batch 2: batch 1 and batch 3 must give the same per-image answers."""
    scripted = torch.jit.load(str(ROOT / "model_repository" / torchscript / "1" / "model.pt"))
    batch3 = torch.from_numpy(np.concatenate([photo_batch, photo_batch[:1]]))
    with torch.no_grad():
        together = scripted(batch3).numpy()
        alone = np.concatenate([scripted(batch3[i:i + 1]).numpy() for i in range(3)])
    assert together.shape == (3, 1000)
    # logits of order 10, batch 1 vs 3 in libtorch: oneDNN picks kernels per batch size and CPU
    np.testing.assert_allclose(alone, together, atol=SAME_WEIGHTS_ATOL)


def test_random_mobilenet_answers_depend_on_the_image(photo_batch):
    manifest = json.loads((ROOT / "artifacts.json").read_text())
    if manifest["models"]["mobilenet_v2"]["torch_weights"] != "random":
        pytest.skip("mobilenet_v2 was built with ImageNet weights: the random-weight calibration is not in use")
    probs = softmax(onnx_logits("mobilenet_v2", photo_batch))
    assert probs.max() > 0.01  # not the flat ~0.001 of un-calibrated random weights
    assert probs[0].argmax() != probs[1].argmax()


def test_savedmodel_has_the_seed_signature(tmp_path, chelsea_jpeg, coffee_jpeg):
    spec = PreprocessSpec(layout="NHWC")  # the torch model's preprocessing: its weights, converted
    np.save(tmp_path / "x.npy", np.stack([preprocess_bytes(chelsea_jpeg, spec), preprocess_bytes(coffee_jpeg, spec)]))
    code = (
        "import os; os.environ['TF_CPP_MIN_LOG_LEVEL']='3'\n"
        "import json, sys, numpy as np, tensorflow as tf\n"
        "x = tf.constant(np.load(sys.argv[1]))\n"
        "out = {}\n"
        "for d in sys.argv[2:]:\n"
        "    f = tf.saved_model.load(d).signatures['serving_default']\n"
        "    p = f(input_1=x)\n"
        "    out[d] = {'shape': f.structured_input_signature[1]['input_1'].shape.as_list(),\n"
        "              'outputs': list(p), 'probs': p['predictions'].numpy().tolist()}\n"
        "print(json.dumps(out))\n"
    )
    dirs = [str(ROOT / "tfserving/models/tfmobilenet/1"), str(ROOT / "model_repository/tfmobilenet/1/model.savedmodel")]
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "x.npy"), *dirs],
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    tfserving, triton = (info[d] for d in dirs)
    assert tfserving["shape"] == [None, 224, 224, 3] and tfserving["outputs"] == ["predictions"]
    probs = np.array(tfserving["probs"])
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-4)  # a float32 softmax over 1000 classes
    # the same SavedModel bytes, the same input and batch, one TensorFlow process: the same kernels,
    # so equal up to float32 rounding of values below 1 on any CPU
    np.testing.assert_allclose(np.array(triton["probs"]), probs, atol=1e-6)
    weights = json.loads((ROOT / "artifacts.json").read_text())["models"]["mobilenet_v2"]["weights"]
    if weights == "random":  # calibrated: image-dependent answers, not a flat 0.001
        assert probs.max() > 0.01 and probs[0].argmax() != probs[1].argmax()


def test_torchvision_weight_download_path_works_offline_with_a_file_url(tmp_path, monkeypatch):
    """The same loader the build uses with a network, fed a torchvision-format file:// URL
    (named like torchvision's files, with its sha256 prefix, so the hash check runs too)."""
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    torch.manual_seed(3)
    source = mobilenet_v2.MobileNetV2().eval()
    staged = tmp_path / "staged.pth"
    torch.save(source.state_dict(), staged)
    path = tmp_path / f"mobilenet_v2-{hashlib.sha256(staged.read_bytes()).hexdigest()[:8]}.pth"
    staged.rename(path)
    target = mobilenet_v2.MobileNetV2().eval()
    mobilenet_v2.load_torchvision_weights(target, url=path.as_uri())  # strict=True inside
    assert (tmp_path / "hub" / "checkpoints" / path.name).is_file()  # it went through the downloader
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(target(x), source(x))
    assert sum(p.numel() for p in target.parameters()) == 3_504_872  # torchvision's count

    corrupt = tmp_path / "mobilenet_v2-00000000.pth"
    shutil.copy(path, corrupt)
    with pytest.raises(RuntimeError, match="invalid hash"):
        mobilenet_v2.load_torchvision_weights(target, url=corrupt.as_uri())
    state = source.state_dict()
    state["classifier.1.extra"] = torch.zeros(1)
    torch.save(state, tmp_path / "extra.pth")
    with pytest.raises(RuntimeError, match="Unexpected key"):
        target.load_state_dict(torch.load(tmp_path / "extra.pth"), strict=True)


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 8, stride=8)
        self.fc = torch.nn.Linear(4, 1000)

    def forward(self, x):
        return self.fc(self.conv(x).mean(dim=(2, 3)))


def test_export_functions_on_a_tiny_model(tmp_path):
    torch.manual_seed(0)
    model = Tiny().eval()
    onnx_path, ts_path = tmp_path / "tiny.onnx", tmp_path / "v1" / "model.pt"
    export_onnx(model, onnx_path)
    export_torchscript(model, ts_path)
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["model.pt", "tiny.onnx"]  # no leftovers
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input"] and [o.name for o in session.get_outputs()] == ["logits"]
    assert session.get_inputs()[0].shape[1:] == [3, 224, 224] and isinstance(session.get_inputs()[0].shape[0], str)
    diffs = verify_exports(model, onnx_path, ts_path, log=lambda _: None)
    assert max(diffs.values()) < SAME_WEIGHTS_ATOL  # eager torch vs ONNX Runtime vs TorchScript: see helpers
    other = Tiny().eval()  # different weights: the check must notice
    with pytest.raises(RuntimeError, match="disagree"):
        verify_exports(other, onnx_path, ts_path, log=lambda _: None)


def test_random_weights_give_way_to_imagenet_weights_once_they_can_be_had(tmp_path, monkeypatch):
    """A rebuild without --force replaces random mobilenet_v2 weights when torchvision's file
    is in torch.hub's cache (how a download that once succeeded looks offline), and the TF
    twin follows: it is reconverted from the new ONNX file."""
    root = tmp_path / "repo"
    for rel in ("onnx/efficientnet_lite0.onnx", "model_repository/efficientnet_lite0/1/model.pt",
                "model_repository/efficientnet_lite0_tf/1/model.savedmodel", "tfserving/models/efficientnet_lite0/1",
                "model_repository/tfmobilenet/1/model.savedmodel", "tfserving/models/tfmobilenet/1",
                "onnx/yolox_nano.onnx", "model_repository/yolox_nano/1/model.onnx",
                "onnx/efficientnet_lite0_int8.onnx", "model_repository/efficientnet_lite0_int8/1/model.onnx",
                "data/imagenet-calib"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).symlink_to(ROOT / rel)
    for rel in ("onnx/mobilenet_v2.onnx", "model_repository/torchmobilenet/1/model.pt"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / rel, root / rel)
    built = json.loads((ROOT / "artifacts.json").read_text())["models"]
    (root / "artifacts.json").write_text(json.dumps({"models": {
        "efficientnet_lite0": {"savedmodel": built["efficientnet_lite0"]["savedmodel"],
                               "int8": built["efficientnet_lite0"]["int8"]},
        "mobilenet_v2": {"torch_weights": "random", "savedmodel": built["mobilenet_v2"]["savedmodel"]}}}))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    monkeypatch.setattr(export_build, "_torchserve_archives", lambda *a: [])  # double: no .mar files here
    lines = []
    manifest = build_models(root, weights="random", log=lines.append)  # random asked: nothing to do
    assert not any(line.startswith("build") for line in lines), lines

    torch.manual_seed(7)
    published = mobilenet_v2.MobileNetV2().eval()
    cached = tmp_path / "torch/hub/checkpoints/mobilenet_v2-b0353104.pth"
    cached.parent.mkdir(parents=True)
    torch.save(published.state_dict(), cached)
    lines.clear()
    manifest = build_models(root, log=lines.append)
    assert [line.split()[1] for line in lines if line.startswith("build")] == \
        ["onnx/mobilenet_v2.onnx,", "model_repository/tfmobilenet/1/model.savedmodel,"], lines
    mob = manifest["models"]["mobilenet_v2"]
    assert (mob["torch_weights"], mob["weights"]) == ("imagenet", "imagenet")
    new_onnx = (root / "onnx/mobilenet_v2.onnx").read_bytes()
    assert mob["savedmodel"]["onnx_sha256"] == hashlib.sha256(new_onnx).hexdigest()
    assert not (root / "tfserving/models/tfmobilenet/1").is_symlink()  # a new SavedModel replaced the link
    x = np.random.default_rng(0).normal(size=(2, 3, 224, 224)).astype(np.float32)
    with torch.no_grad():
        expected = published(torch.from_numpy(x)).numpy()
    got = ort.InferenceSession(str(root / "onnx/mobilenet_v2.onnx"), providers=["CPUExecutionProvider"]).run(
        None, {"input": x})[0]
    np.testing.assert_allclose(got, expected, atol=SAME_WEIGHTS_ATOL)  # torch vs ONNX Runtime: see helpers
    assert (ROOT / "onnx/mobilenet_v2.onnx").stat().st_size > 0  # the repository's own files untouched


def test_rebuild_is_a_noop_and_manifest_names_weights(capsys, monkeypatch):
    from gateway.cli import main

    # double: TorchServe's archives belong to (and are tested with) gateway.ops.servers.torchserve
    monkeypatch.setattr(export_build, "_torchserve_archives", lambda *a: [])
    before = {p: p.stat().st_mtime_ns for p in (ROOT / "onnx").glob("*.onnx")}
    assert main(["models", "build", "--config", str(ROOT / "gateway.yaml")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert not any(line.startswith("build") for line in lines), lines
    # efficientnet: torch, TF, int8; mobilenet: torch, TF; yolox
    assert sum(line.startswith("keep") for line in lines) == 6, lines
    assert {p: p.stat().st_mtime_ns for p in before} == before
    manifest = json.loads((ROOT / "artifacts.json").read_text())
    assert manifest["models"]["efficientnet_lite0"]["weights"] == "imagenet"
    mob = manifest["models"]["mobilenet_v2"]
    assert mob["torch_weights"] in {"random", "imagenet"} and "keras_weights" not in mob
    assert mob["weights"] == mob["torch_weights"]  # the TF twin is converted from the torch model
    assert all((ROOT / f).exists() for entry in manifest["models"].values() for f in entry["files"])
