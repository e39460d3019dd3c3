"""What every build step shares: file hashes, staged writes, artifacts.json and the torch exports.

A leaf: it imports nothing else of the package (the build table, the converters and the
quantizer import it, never the other way round). torch and onnxruntime are imported inside the
functions that need them, so a no-op `gateway models build` loads neither.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

ONNX_OPSET = 17
TOLERANCE = 1e-3  # exports must match eager torch this closely (measured: ~1e-5)
MANIFEST = "artifacts.json"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def exists(path: Path) -> bool:
    """A built file, or a SavedModel directory with its graph."""
    return path.is_file() or (path.is_dir() and (path / "saved_model.pb").is_file())


def partial(path: Path) -> Path:
    """Where ``path`` is staged before it is renamed into place (a reader never sees half a file)."""
    return path.with_name(f".{path.name}.partial")


def place(data: bytes, targets: list[Path]) -> None:
    """The same bytes into every target, each staged beside it and renamed into place."""
    for target in targets:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = partial(target)
        try:
            tmp.write_bytes(data)
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)


def swap(new: Path, target: Path) -> None:
    """Replace a directory with as short a gap as a directory rename allows."""
    old = target.with_name(f".{target.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if target.is_symlink():
        target.unlink()
    elif target.exists():
        target.rename(old)
    new.rename(target)
    shutil.rmtree(old, ignore_errors=True)


class Manifest:
    """``artifacts.json``: per model, the weights it got, its files and how each was made.
    Saved after every step, so a later failure keeps what was built."""

    def __init__(self, root: Path):
        self.path = Path(root) / MANIFEST
        try:
            self.data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            self.data = {}
        self.models: dict = self.data.setdefault("models", {})

    def entry(self, name: str) -> dict:
        return self.models.setdefault(name, {})

    def save(self) -> None:
        tmp = partial(self.path)
        tmp.write_text(json.dumps(self.data, indent=2) + "\n")
        os.replace(tmp, self.path)


# --- torch -> ONNX and TorchScript, checked against eager torch ---

def export_onnx(model, path: Path, size: int = 224) -> None:
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = partial(path)
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
