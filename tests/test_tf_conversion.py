"""The TF SavedModels converted from the torch models (torch -> ONNX -> onnx2tf, built by `make setup`).

Real TensorFlow against ONNX Runtime on real photos, a fresh conversion writing the same bytes,
the parity gate failing a build, `gateway models convert` on a user's TorchScript model, and the
TF routes through a real `gateway serve`: Triton's TensorFlow route on the real tritonserver and
TF Serving as its test double (tests/tfserving_double.py; no TF Serving binary exists here).

Tolerances: a converted graph computes the same float32 maths in another order (NHWC kernels,
folded constants): measured up to 1.1e-5 on EfficientNet-Lite0's logits and 1.4e-6 on
probabilities, so 1e-4 holds on any x86-64 CPU with margin.
"""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import onnxruntime as ort
import pytest
import requests
import torch

from gateway.cli import main as gateway_cli
from gateway.ops.export import tf_convert
from gateway.postprocess import softmax

from conftest import ROOT, load_yaml_config
from helpers import CAT, COFFEE, classify

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

TOLERANCE = 1e-4  # see the module docstring: measured differences are <= 1.1e-5
SAVEDMODELS = {  # model: (ONNX file, [Triton layout, TF Serving layout], input, output, answers probabilities)
    "efficientnet_lite0": ("onnx/efficientnet_lite0.onnx", ["model_repository/efficientnet_lite0_tf/1/model.savedmodel",
                                                            "tfserving/models/efficientnet_lite0/1"],
                           "images", "logits", False),
    "mobilenet_v2": ("onnx/mobilenet_v2.onnx", ["model_repository/tfmobilenet/1/model.savedmodel",
                                                "tfserving/models/tfmobilenet/1"],
                     "input_1", "predictions", True),
}


@pytest.fixture(scope="module")
def photos_nchw():
    """chelsea (a cat), coffee (an espresso), astronaut: 224x224, ImageNet mean/std, NCHW."""
    return tf_convert.photos_nchw(224, 224)


def onnx_answer(model: str, x: np.ndarray) -> np.ndarray:
    onnx_file, _, _, _, probabilities = SAVEDMODELS[model]
    logits = ort.InferenceSession(str(ROOT / onnx_file), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    return softmax(logits) if probabilities else logits


@pytest.mark.parametrize("model", SAVEDMODELS)
def test_savedmodels_load_in_tensorflow_and_match_onnx_runtime_on_real_photos(photos_nchw, model):
    import tensorflow as tf

    _, layouts, input_name, output_name, probabilities = SAVEDMODELS[model]
    expected = onnx_answer(model, photos_nchw)
    nhwc = tf.constant(photos_nchw.transpose(0, 2, 3, 1))
    for layout in layouts:
        signature = tf.saved_model.load(str(ROOT / layout)).signatures["serving_default"]
        spec = signature.structured_input_signature[1]
        assert list(spec) == [input_name] and spec[input_name].shape.as_list() == [None, 224, 224, 3]
        assert spec[input_name].dtype == tf.float32 and list(signature.structured_outputs) == [output_name]
        got = signature(**{input_name: nhwc})[output_name].numpy()
        np.testing.assert_allclose(got, expected, atol=TOLERANCE)
        assert got.argmax(axis=1).tolist() == expected.argmax(axis=1).tolist()
        alone = signature(**{input_name: nhwc[:1]})[output_name].numpy()  # the batch dimension is free
        np.testing.assert_allclose(alone, got[:1], atol=TOLERANCE)
    if probabilities:
        np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=1e-5)  # float32 sums of 1000 terms
    if model == "efficientnet_lite0":  # real weights: real classes
        assert got[0].argmax() in CAT and got[1].argmax() in COFFEE
    triton_layout, tfserving_layout = (ROOT / d for d in layouts)
    assert (triton_layout / "saved_model.pb").read_bytes() == (tfserving_layout / "saved_model.pb").read_bytes()


def test_manifest_records_the_conversion_and_shared_weights():
    models = json.loads((ROOT / "artifacts.json").read_text())["models"]
    for model, (onnx_file, layouts, input_name, output_name, probabilities) in SAVEDMODELS.items():
        record = models[model]["savedmodel"]
        assert record["from"] == onnx_file and record["onnx_sha256"] == tf_convert.sha256(ROOT / onnx_file)
        assert record["signature"] == {"input": input_name, "output": output_name,
                                       "output_is": "probabilities" if probabilities else "logits"}
        assert record["parity_max_abs_diff"] <= TOLERANCE and set(layouts) <= set(models[model]["files"])
    assert "keras_weights" not in models["mobilenet_v2"]
    assert models["mobilenet_v2"]["weights"] == models["mobilenet_v2"]["torch_weights"]


def _files(path):
    return {str(p.relative_to(path)): p for p in sorted(path.rglob("*")) if p.is_file()}


def test_a_fresh_conversion_writes_the_same_savedmodel(tmp_path, photos_nchw):
    """Same bytes, except fingerprint.pb's random UUID (its content hashes must match too)."""
    import tensorflow as tf

    fresh = tmp_path / "efficientnet_lite0"
    proc = subprocess.run([sys.executable, "-m", "gateway.ops.export.onnx2tf_worker",
                           str(ROOT / "onnx/efficientnet_lite0.onnx"), str(fresh),
                           "--input-name", "images", "--output-name", "logits"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    built = ROOT / "tfserving/models/efficientnet_lite0/1"
    ours, theirs = _files(fresh), _files(built)
    assert sorted(ours) == sorted(theirs)
    for name in ours:
        if name != "fingerprint.pb":
            assert ours[name].read_bytes() == theirs[name].read_bytes(), name
    fingerprints = [tf.saved_model.experimental.read_fingerprint(str(p)) for p in (fresh, built)]
    for field in ("saved_model_checksum", "graph_def_program_hash", "signature_def_hash",
                  "saved_object_graph_hash", "checkpoint_hash"):
        assert getattr(fingerprints[0], field) == getattr(fingerprints[1], field), field
    x = tf.constant(photos_nchw.transpose(0, 2, 3, 1))
    answers = [tf.saved_model.load(str(p)).signatures["serving_default"](images=x)["logits"].numpy()
               for p in (fresh, built)]
    np.testing.assert_array_equal(answers[0], answers[1])


def test_parity_measures_a_mismatch_between_models(photos_nchw):
    """The gate's measurement: a SavedModel that is not the ONNX model's shows a large difference."""
    checks = tf_convert.parity(ROOT / "onnx/efficientnet_lite0.onnx", ROOT / "tfserving/models/tfmobilenet/1",
                               "input_1", "predictions", softmax=True)
    assert checks["max_abs_diff"] > 0.1 and not checks["top1_agree"]


def test_parity_gate_fails_the_build_naming_the_model_and_removes_what_it_wrote(tmp_path, monkeypatch, capsys):
    """A gate stricter than any float32 conversion meets (1e-9): the real, measured ~1e-5
    difference must fail the build, name the model, and leave no SavedModel behind."""
    from gateway.ops.export import build as export_build

    root = tmp_path / "repo"
    for rel in ("onnx/efficientnet_lite0.onnx", "model_repository/efficientnet_lite0/1/model.pt"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).symlink_to(ROOT / rel)
    shutil.copy(ROOT / "gateway.yaml", root / "gateway.yaml")  # a copy: the config's folder is the repository
    monkeypatch.setattr(tf_convert, "PARITY_TOLERANCE", 1e-9)
    monkeypatch.setattr(export_build, "_torchserve_archives", lambda *a: [])  # not reached: the build stops first
    assert gateway_cli(["models", "build", "--config", str(root / "gateway.yaml")]) == 1
    err = capsys.readouterr().err
    assert "efficientnet_lite0: the TF SavedModel differs from efficientnet_lite0.onnx" in err, err
    assert not list(root.rglob("saved_model.pb")) and not list(root.rglob("*.partial")), list(root.rglob("*"))
    assert "savedmodel" not in json.loads((root / "artifacts.json").read_text())["models"]["efficientnet_lite0"]


class Tiny(torch.nn.Module):
    """A user's own model: conv, global pooling, a 10-class head."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 8, stride=8)
        self.fc = torch.nn.Linear(8, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean(dim=(2, 3)))


def test_convert_command_turns_a_users_torchscript_model_into_a_savedmodel(tmp_path, photos_nchw, capsys):
    import tensorflow as tf

    torch.manual_seed(0)
    model = Tiny().eval()
    with torch.no_grad():
        torch.jit.trace(model, torch.zeros(1, 3, 224, 224)).save(str(tmp_path / "tiny.pt"))
        expected = torch.softmax(model(torch.from_numpy(photos_nchw)), dim=1).numpy()
    outs = [tmp_path / "tfserving/tiny/1", tmp_path / "model_repository/tiny/1/model.savedmodel"]
    argv = ["models", "convert", str(tmp_path / "tiny.pt"), "--out", str(outs[0]), "--out", str(outs[1]),
            "--input-name", "x", "--output-name", "probs", "--softmax"]
    assert gateway_cli(argv) == 0, capsys.readouterr().err
    assert "serving_default x [None, H, W, C] float32 -> probs (probabilities)" in capsys.readouterr().out
    signature = tf.saved_model.load(str(outs[0])).signatures["serving_default"]
    assert signature.structured_input_signature[1]["x"].shape.as_list() == [None, 224, 224, 3]
    got = signature(x=tf.constant(photos_nchw.transpose(0, 2, 3, 1)))["probs"].numpy()
    np.testing.assert_allclose(got, expected, atol=TOLERANCE)
    assert (outs[0] / "saved_model.pb").read_bytes() == (outs[1] / "saved_model.pb").read_bytes()
    assert sorted(p.name for p in tmp_path.rglob("*.partial")) == []

    assert gateway_cli(argv) == 1  # refuses to overwrite
    assert "will not overwrite" in capsys.readouterr().err


def test_convert_command_refuses_unusable_inputs_with_a_clear_message(tmp_path, capsys):
    (tmp_path / "weights.pt").write_bytes(b"not a TorchScript archive")
    assert gateway_cli(["models", "convert", str(tmp_path / "weights.pt"), "--out", str(tmp_path / "a")]) == 1
    assert "not a TorchScript file" in capsys.readouterr().err
    torch.onnx.export(Tiny().eval(), torch.zeros(1, 3, 224, 224), str(tmp_path / "fixed.onnx"), dynamo=False,
                      input_names=["input"])  # no dynamic_axes: batch fixed at 1
    assert gateway_cli(["models", "convert", str(tmp_path / "fixed.onnx"), "--out", str(tmp_path / "b")]) == 1
    assert "the batch dimension is fixed at 1" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# --- through a real gateway: Triton's TF route (real tritonserver) and TF Serving (the double) ---

@pytest.fixture(scope="module")
def tf_api(triton_server, tfserving_double, make_api):
    """The gateway on gateway.yaml, TF Serving being the double (its tfmobilenet/1 is the real one)."""
    config = load_yaml_config()
    config["backends"]["tfserving"]["url"] = tfserving_double[0]
    for route in config["models"]["mobilenet_v2"]["routes"]:
        if route["backend"] == "tfserving":
            route["version"] = 1
    return make_api(config)


def predictions(api, model: str, route: str, jpeg: bytes) -> list:
    resp = classify(api, jpeg, model, route=route)
    assert resp.status_code == 200, (route, resp.text)
    body = resp.json()
    assert body["route"] == route, body
    return body["results"][0]["predictions"]


def test_efficientnet_tf_routes_answer_as_the_embedded_route(tf_api, photos):
    for jpeg, classes in zip(photos, (CAT, COFFEE)):
        embedded = predictions(tf_api, "efficientnet_lite0", "embedded", jpeg)
        assert embedded[0]["index"] in classes
        for route in ("triton-tf", "tfserving"):
            got = predictions(tf_api, "efficientnet_lite0", route, jpeg)
            assert [p["index"] for p in got] == [p["index"] for p in embedded], route
            np.testing.assert_allclose([p["score"] for p in got], [p["score"] for p in embedded], atol=TOLERANCE)
    assert predictions(tf_api, "efficientnet_lite0", "triton-tf", photos[0])[0]["index"] in CAT
    detail = tf_api.get("/v1/models/efficientnet_lite0").json()
    tf_route = next(r for r in detail["routes"] if r["name"] == "triton-tf")
    assert tf_route["ready"] and tf_route["metadata"]["platform"] == "tensorflow_savedmodel"


def test_mobilenet_v2_routes_all_agree(tf_api, photos):
    """The same weights on ONNX Runtime, Triton's libtorch and TF routes and TF Serving (TorchServe's
    route is held to the embedded one in test_torchserve.py)."""
    for jpeg in photos:
        answers = {route: predictions(tf_api, "mobilenet_v2", route, jpeg)
                   for route in ("embedded", "triton", "triton-tf", "tfserving")}
        embedded = answers.pop("embedded")
        for route, got in answers.items():
            assert got[0]["index"] == embedded[0]["index"], route
            np.testing.assert_allclose([p["score"] for p in got], [p["score"] for p in embedded], atol=TOLERANCE)


def test_triton_reports_the_canonical_config_of_the_tf_model(triton_server):
    base = triton_server.backends["triton"].url
    config = requests.get(f"{base}/v2/models/efficientnet_lite0_tf/config", timeout=10).json()
    assert config["platform"] == "tensorflow_savedmodel" and config["max_batch_size"] == 8
    assert [(i["name"], i["format"], i["dims"]) for i in config["input"]] == [("images", "FORMAT_NHWC", [224, 224, 3])]
    assert [(o["name"], o["label_filename"]) for o in config["output"]] == [("logits", "labels.txt")]
