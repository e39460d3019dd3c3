"""YOLOX-Nano (COCO detector, vendored in models/yolox_nano/): checked, given a free batch axis.

The vendored ONNX (see its README) has a fixed batch of 1: its input and output say
``[1, ...]`` and the three Reshapes that flatten the head's grids have the constant shape
``[1, 85, -1]``, so a batch of 4 comes out as one image of 4 x 3549 anchor points. The
derived file declares ``batch`` symbolically and reshapes to ``[0, 85, -1]`` (0: keep the
input's batch size), nothing else; ``derive`` verifies that it equals the original image by
image; the build table (gateway/ops/export/table.py) says where it goes.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

from gateway.ops.export.artifacts import sha256

SOURCE = Path("models/yolox_nano/yolox_nano.onnx")
SHA256 = "695e750a5d5754bb5a8d5325643b59282191a7e7a564e435a415fd3c578eab14"
PROVENANCE = "models/yolox_nano (Megvii YOLOX-Nano, Apache-2.0; see its README)"
INPUT_SHAPE = (3, 416, 416)
# The derived graph must reproduce the original per image. Outputs are grid offsets and
# log-sizes (|x| < ~20) and sigmoid scores in 0..1; a batch of 4 may pick other conv kernels
# than a batch of 1 (oneDNN/MLAS differ per CPU: ~1e-6 here), while a broken reshape mixes
# images (differences of whole units). 1e-3 separates the two by orders of magnitude.
TOLERANCE = 1e-3


def free_batch(model):
    """The ONNX model with its batch axis made symbolic (a modified copy)."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    for value in [*graph.input, *graph.output]:
        dim = value.type.tensor_type.shape.dim[0]
        dim.ClearField("dim_value")
        dim.dim_param = "batch"
    del graph.value_info[:]  # shapes inferred for batch 1; onnxruntime infers them again
    shapes = {node.input[1] for node in graph.node if node.op_type == "Reshape"}
    users: dict = {}
    for node in graph.node:
        for name in node.input:
            users[name] = users.get(name, 0) + 1
    rewritten = 0
    for init in graph.initializer:
        if init.name in shapes:
            shape = numpy_helper.to_array(init)
            if shape.ndim == 1 and shape.size and shape[0] == 1 and users[init.name] == 1:
                init.CopyFrom(numpy_helper.from_array(np.concatenate([[0], shape[1:]]).astype(shape.dtype), init.name))
                rewritten += 1
    if rewritten != 3:  # the head's three grids (strides 8, 16, 32)
        raise RuntimeError(f"expected 3 batch-1 Reshapes in {SOURCE.name}, found {rewritten}")
    onnx.checker.check_model(model, full_check=True)
    return model


def verify_free_batch(original: Path, derived: Path, log=print) -> float:
    """Batch 4 through the derived file == each image alone through the original; returns max |diff|."""
    import numpy as np
    import onnxruntime as ort

    x = np.random.default_rng(3).uniform(0, 255, (4, *INPUT_SHAPE)).astype(np.float32)
    one = ort.InferenceSession(str(original), providers=["CPUExecutionProvider"])
    free = ort.InferenceSession(str(derived), providers=["CPUExecutionProvider"])
    expected = np.concatenate([one.run(None, {"images": x[i:i + 1]})[0] for i in range(len(x))])
    batch4 = free.run(None, {"images": x})[0]
    batch1 = np.concatenate([free.run(None, {"images": x[i:i + 1]})[0] for i in range(len(x))])
    if batch4.shape != expected.shape or batch1.shape != expected.shape:
        raise RuntimeError(f"{derived.name}: batch of 4 gave {batch4.shape}, expected {expected.shape}")
    diff = float(max(np.abs(batch4 - expected).max(), np.abs(batch1 - expected).max()))
    log(f"  check yolox_nano: free batch, max |diff| batch 4 and batch 1 vs the original {diff:.1e}")
    if diff > TOLERANCE:
        raise RuntimeError(f"{derived.name}: free-batch graph differs from the original by {diff}")
    return diff


def derive(root: Path, log=print) -> bytes:
    """The free-batch model's bytes, from the vendored file (its sha256 checked), verified."""
    import onnx

    source = root / SOURCE
    got = sha256(source)
    if got != SHA256:
        raise RuntimeError(f"{SOURCE}: sha256 {got}, expected {SHA256} (see models/yolox_nano/README.md)")
    derived = free_batch(onnx.load(str(source))).SerializeToString()
    with tempfile.TemporaryDirectory(prefix="yolox-") as tmp:
        staged = Path(tmp) / "yolox_nano.onnx"
        staged.write_bytes(derived)
        verify_free_batch(source, staged, log)
    return derived
