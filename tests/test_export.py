"""The exported artifacts (built by `make setup`): right classes, parity between formats,
the seed's tensor names, and the offline-testable torchvision weight path."""
import json
import subprocess
import sys

import numpy as np
import onnxruntime as ort
import pytest
import torch

from conftest import ROOT
from gateway.export import mobilenet_v2
from gateway.export.build import build_models
from gateway.postprocess import softmax
from gateway.preprocess import PreprocessSpec, preprocess_bytes

CAT, COFFEE = {281, 282, 285}, {967, 968, 504}


def onnx_logits(name: str, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(ROOT / "onnx" / f"{name}.onnx"), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x})[0]


@pytest.fixture(scope="module")
def photos(chelsea_jpeg, coffee_jpeg):
    spec = PreprocessSpec()
    return np.stack([preprocess_bytes(chelsea_jpeg, spec), preprocess_bytes(coffee_jpeg, spec)])


def test_efficientnet_onnx_knows_cats_and_coffee(photos):
    top1 = onnx_logits("efficientnet_lite0", photos).argmax(axis=1)
    assert top1[0] in CAT and top1[1] in COFFEE


@pytest.mark.parametrize("onnx_name,torchscript", [("efficientnet_lite0", "efficientnet_lite0"),
                                                   ("mobilenet_v2", "torchmobilenet")])
def test_onnx_and_torchscript_agree(photos, onnx_name, torchscript):
    scripted = torch.jit.load(str(ROOT / "model_repository" / torchscript / "1" / "model.pt"))
    with torch.no_grad():
        ts = softmax(scripted(torch.from_numpy(photos)).numpy())
    ox = softmax(onnx_logits(onnx_name, photos))
    np.testing.assert_array_equal(np.argsort(-ts)[:, :5], np.argsort(-ox)[:, :5])
    np.testing.assert_allclose(ts, ox, atol=1e-4)


def test_random_mobilenet_answers_depend_on_the_image(photos):
    probs = softmax(onnx_logits("mobilenet_v2", photos))
    assert probs.max() > 0.01  # not the flat ~0.001 of un-calibrated random weights
    assert np.abs(probs[0] - probs[1]).max() > 1e-3


def test_savedmodel_has_the_seed_signature():
    code = (
        "import os; os.environ['TF_CPP_MIN_LOG_LEVEL']='3'\n"
        "import json, numpy as np, tensorflow as tf\n"
        f"f = tf.saved_model.load({str(ROOT / 'tfserving/models/tfmobilenet/1')!r}).signatures['serving_default']\n"
        "spec = f.structured_input_signature[1]['input_1']\n"
        "out = f(input_1=tf.constant(np.random.default_rng(0).uniform(-1, 1, (2, 224, 224, 3)).astype('float32')))\n"
        "print(json.dumps({'shape': spec.shape.as_list(), 'outputs': list(out),"
        " 'sums': out['predictions'].numpy().sum(axis=1).tolist()}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert info["shape"] == [None, 224, 224, 3] and info["outputs"] == ["predictions"]
    np.testing.assert_allclose(info["sums"], 1.0, atol=1e-4)
    assert (ROOT / "model_repository/tfmobilenet/1/model.savedmodel/saved_model.pb").is_file()


def test_torchvision_weight_download_path_works_offline_with_a_file_url(tmp_path):
    """The same loader the build uses with a network, fed a torchvision-format file:// URL."""
    torch.manual_seed(3)
    source = mobilenet_v2.MobileNetV2().eval()
    path = tmp_path / "mobilenet_v2-b0353104.pth"
    torch.save(source.state_dict(), path)
    torch.hub.set_dir(str(tmp_path / "hub"))
    target = mobilenet_v2.MobileNetV2().eval()
    mobilenet_v2.load_torchvision_weights(target, url=path.as_uri())  # strict=True inside
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(target(x), source(x))
    assert sum(p.numel() for p in target.parameters()) == 3_504_872  # torchvision's count


def test_rebuild_is_a_noop_and_manifest_names_weights():
    lines = []
    manifest = build_models(ROOT, log=lines.append)
    assert not any(line.startswith("build") for line in lines), lines
    assert manifest["models"]["efficientnet_lite0"]["weights"] == "imagenet"
    mob = manifest["models"]["mobilenet_v2"]
    assert mob["weights"] in {"random", "imagenet"}
    assert mob["weights"] == ("imagenet" if mob["torch_weights"] == mob["keras_weights"] == "imagenet" else "random")
    assert json.loads((ROOT / "artifacts.json").read_text()) == manifest
