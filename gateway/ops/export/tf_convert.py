"""ONNX -> TensorFlow SavedModel with a parity gate, for `gateway models build` and
`gateway models convert`.

onnx2tf runs in a child process (gateway/ops/export/onnx2tf_worker.py); the result is then loaded
in this process's TensorFlow, the one that serves it, and must equal ONNX Runtime's output
within ``PARITY_TOLERANCE`` on real photos (after softmax where the SavedModel answers
probabilities), for a batch of 3 and for each image alone (proves the free batch dimension).
A SavedModel that fails is removed before anything serves it. Writes are staged beside the
first target and renamed into place; further targets get a copy of the same bytes.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gateway.ops.export.artifacts import export_onnx, partial, sha256, swap

PARITY_TOLERANCE = 1e-4  # measured: ~1e-5 on logits, ~1e-6 on probabilities
PHOTOS = ("chelsea", "coffee", "astronaut")  # scikit-image's bundled photos: a cat, an espresso, a person
CONVERTER = "onnx2tf 1.29.24"  # as pinned in requirements-nodeps.txt


def onnx_input(onnx_path: Path) -> tuple[str, list]:
    """(name, shape) of the model's one input; refuses a fixed batch dimension."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    initializers = {i.name for i in graph.initializer}
    inputs = [i for i in graph.input if i.name not in initializers]
    if len(inputs) != 1:
        raise RuntimeError(f"{onnx_path.name}: expected one input, found {[i.name for i in inputs]}")
    dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
            for d in inputs[0].type.tensor_type.shape.dim]
    if len(dims) != 4 or not all(isinstance(d, int) and d > 0 for d in dims[1:]):
        raise RuntimeError(f"{onnx_path.name}: expected an NCHW image input with fixed C, H, W; got {dims}")
    if isinstance(dims[0], int) and dims[0] > 0:
        raise RuntimeError(f"{onnx_path.name}: the batch dimension is fixed at {dims[0]}; export with a dynamic "
                           f"one (torch.onnx.export(..., dynamic_axes={{'{inputs[0].name}': {{0: 'batch'}}}}))")
    return inputs[0].name, dims


def photos_nchw(height: int, width: int):
    """The real photos, stretched to the model's size, ImageNet mean/std, NCHW float32."""
    import numpy as np
    from PIL import Image
    from skimage import data

    from gateway.preprocess import PreprocessSpec, preprocess_image

    spec = PreprocessSpec(size=(height, width))
    return np.stack([preprocess_image(Image.fromarray(getattr(data, name)()), spec) for name in PHOTOS])


def parity(onnx_path: Path, savedmodel: Path, input_name: str, output_name: str, softmax: bool) -> dict:
    """Max |SavedModel - ONNX Runtime| on the photos (batch of 3, and one by one), and top-1 agreement."""
    import numpy as np
    import onnxruntime as ort

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    from gateway.postprocess import softmax as softmax_fn

    name, dims = onnx_input(onnx_path)
    x = photos_nchw(dims[2], dims[3])
    reference = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"]).run(None, {name: x})[0]
    if softmax:
        reference = softmax_fn(reference)
    signature = tf.saved_model.load(str(savedmodel)).signatures["serving_default"]
    nhwc = x.transpose(0, 2, 3, 1)
    together = signature(**{input_name: tf.constant(nhwc)})[output_name].numpy()
    alone = np.concatenate([signature(**{input_name: tf.constant(nhwc[i:i + 1])})[output_name].numpy()
                            for i in range(len(nhwc))])
    return {"max_abs_diff": float(np.abs(together - reference).max()),
            "batch1_vs_batch3": float(np.abs(alone - together).max()),
            "top1_agree": bool((together.argmax(axis=1) == reference.argmax(axis=1)).all()),
            "top1": together.argmax(axis=1).tolist()}


def convert(onnx_path: Path, targets: list[Path], input_name: str, output_name: str, softmax: bool,
            model: str, log=print) -> dict:
    """Convert, gate, place into every target; returns what to record in artifacts.json."""
    onnx_input(onnx_path)  # refuse what the converter cannot do, before spending a minute on it
    first = targets[0]
    staging = partial(first)
    shutil.rmtree(staging, ignore_errors=True)
    staging.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    try:
        command = [sys.executable, "-m", "gateway.ops.export.onnx2tf_worker", str(onnx_path), str(staging),
                   "--input-name", input_name, "--output-name", output_name] + (["--softmax"] if softmax else [])
        proc = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
        if proc.returncode != 0:
            tail = "\n".join(line for line in (proc.stdout + proc.stderr).splitlines()
                             if not line.startswith(("I0000", "W0000", "E0000", "WARNING: All log")))[-1500:]
            raise RuntimeError(f"{model}: onnx2tf could not convert {onnx_path.name} (exit {proc.returncode}):\n{tail}")
        seconds = time.perf_counter() - started
        checks = parity(onnx_path, staging, input_name, output_name, softmax)
        log(f"  check {model} SavedModel vs ONNX on {len(PHOTOS)} photos: max |diff| {checks['max_abs_diff']:.1e}"
            f"{' (probabilities)' if softmax else ''}, batch1_vs_batch3 {checks['batch1_vs_batch3']:.1e}, "
            f"top-1 {checks['top1']} (converted in {seconds:.1f} s)")
        if max(checks["max_abs_diff"], checks["batch1_vs_batch3"]) > PARITY_TOLERANCE:
            raise RuntimeError(f"{model}: the TF SavedModel differs from {onnx_path.name} by "
                               f"{max(checks['max_abs_diff'], checks['batch1_vs_batch3']):.2e} "
                               f"(> {PARITY_TOLERANCE:g}) on real photos: {checks}")
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    for target in targets[1:]:  # same bytes in every layout
        tmp = partial(target)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(staging, tmp)
        swap(tmp, target)
    swap(staging, first)
    return {"from": str(onnx_path.name), "onnx_sha256": sha256(onnx_path), "converter": CONVERTER,
            "signature": {"input": input_name, "output": output_name,
                          "output_is": "probabilities" if softmax else "logits"},
            "parity_max_abs_diff": checks["max_abs_diff"], "convert_seconds": round(seconds, 1)}


# --- `gateway models convert`: a user's own model ---

def register(subparsers) -> None:
    c = subparsers.add_parser(
        "convert", help="convert your own PyTorch model (TorchScript .pt or ONNX) into a TF SavedModel",
        description="TorchScript (.pt) or ONNX (.onnx) image classifier, NCHW -> TensorFlow SavedModel, NHWC, "
                    "free batch dimension, checked against ONNX Runtime on real photos.")
    c.add_argument("source", type=Path, help="a TorchScript file (torch.jit.trace/script, saved) or an ONNX file")
    c.add_argument("--out", type=Path, action="append", required=True,
                   help="SavedModel directory to write, e.g. tfserving/models/NAME/1 or "
                        "model_repository/NAME/1/model.savedmodel; repeat for several (same bytes)")
    c.add_argument("--input-name", default="images", help="the signature's input tensor (default images)")
    c.add_argument("--output-name", default="logits", help="the signature's output tensor (default logits)")
    c.add_argument("--softmax", action="store_true", help="the SavedModel answers probabilities, not logits")
    c.add_argument("--size", type=int, default=224, help="TorchScript only: input height and width (default 224)")
    c.set_defaults(func=run_convert)


def run_convert(args) -> int:
    import warnings

    try:
        if any(out.exists() for out in args.out):
            raise RuntimeError(f"will not overwrite {[str(o) for o in args.out if o.exists()]}: remove it first")
        with tempfile.TemporaryDirectory(prefix="gateway-convert-") as tmp, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            onnx_path = args.source
            if args.source.suffix != ".onnx":
                onnx_path = torchscript_to_onnx(args.source, Path(tmp) / "model.onnx", args.size)
            record = convert(onnx_path, args.out, args.input_name, args.output_name, args.softmax,
                             args.source.name)
    except (RuntimeError, OSError, ValueError) as exc:
        print(f"gateway models convert: failed: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {', '.join(map(str, args.out))}: serving_default {args.input_name} "
          f"[None, H, W, C] float32 -> {args.output_name} ({record['signature']['output_is']}); "
          f"max |diff| vs ONNX Runtime {record['parity_max_abs_diff']:.1e}")
    return 0


def torchscript_to_onnx(source: Path, onnx_path: Path, size: int) -> Path:
    """The build's own ONNX export (opset 17, dynamic batch), checked against the TorchScript model."""
    import numpy as np
    import onnxruntime as ort
    import torch

    try:
        model = torch.jit.load(str(source), map_location="cpu").eval()
    except Exception as exc:
        raise RuntimeError(f"{source}: not a TorchScript file ({type(exc).__name__}); save your model with "
                           f"torch.jit.trace(model, example).save(path) or export it to ONNX yourself") from None
    export_onnx(model, onnx_path, size=size)
    x = photos_nchw(size, size)
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    got = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    diff = float(np.abs(got - expected).max())
    if diff > PARITY_TOLERANCE:
        raise RuntimeError(f"{source.name}: the ONNX export differs from the TorchScript model by {diff:.2e}")
    return onnx_path
