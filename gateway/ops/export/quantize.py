"""`gateway models quantize MODEL`: an int8 model from the FP32 ONNX file, proven on labelled photos.

ONNX Runtime's static quantization (``onnxruntime.quantization``), as its documentation lays it
out: ``quant_pre_process`` first (symbolic shape inference and graph optimisation), then
``quantize_static`` in the QDQ format with per-channel int8 weights and uint8 activations (the
stem conv stays float32; ``METHOD`` says why), their ranges calibrated (MinMax) on a
calibration folder fed through the model's own preprocessing
(gateway.yaml's spec, decoded and prepared by ``gateway.tasks`` exactly as a request is). The
calibration folder (default ``data/imagenet-calib``) is never the evaluation folder.

The gate: the int8 model is evaluated against the FP32 one on ``tests/data/imagenet-sample`` with
`gateway eval`'s code (``gateway.tools.evaluation``). A classifier may lose at most
``MAX_TOP1_DROP`` top-1 and must agree with FP32's top-1 on at least ``MIN_AGREEMENT`` of the
photos; a detector's FP32 boxes must be found again (same class, IoU >= ``MATCH_IOU``) for at
least ``MIN_MATCHED`` of them, and astronaut's person too. Nothing is placed unless the gate
passes, and the error names the figures; `gateway models build` (which quantizes again only when
the int8 model is stale) then removes the stale one and its record.

Reproducible as the same bytes: MinMax ranges over a fixed, sorted set of photos and a
deterministic graph rewrite (tests/test_int8.py quantizes again and compares sha256).
"""
from __future__ import annotations

import hashlib
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

from gateway.ops.export.artifacts import Manifest, partial, place, sha256
from gateway.ops.export.table import ENTRIES, Entry

CALIBRATION = Path("data/imagenet-calib")  # the project's copy of ../shared/data/imagenet-calib
EVALUATION = Path("tests/data/imagenet-sample")  # the gate's labelled photos: never calibrated on
IMAGES = (".jpg", ".jpeg", ".png")
BATCH = 10  # calibration photos per run of the FP32 model (ranges are the same for any batch size)
# The recipe, recorded in artifacts.json; a recorded recipe that differs makes the build quantize again.
METHOD = {
    "tool": "onnxruntime.quantization quantize_static",
    "pre_process": "onnxruntime.quantization.shape_inference.quant_pre_process",
    "format": "QDQ", "weights": "int8, per channel", "activations": "uint8, per tensor",
    "calibration": f"MinMax, {BATCH} photos per pass (CalibStridedMinMax: memory bounded, the same ranges)",
    # The stem (the first Conv, on the image itself) stays float32: quantizing it too cost a point
    # of top-1 and 1 of the 4-5 top-1 flips on the labelled photos, for ~1 ms of ~10 ms per image.
    "float32": "the first Conv (the stem)",
    # 7-bit weights: MLAS's u8s8 kernels on CPUs without VNNI (AVX2's vpmaddubsw) add pairs of
    # u8 x s8 products in int16 and saturate on full-range weights. Measured on this AMD EPYC
    # (AVX2, no VNNI), stem quantized too: top-1 0.85 and 90% agreement with 8-bit weights, flips
    # on photos FP32 is sure of; 0.88 / 95% with 7-bit, flips only among the photos FP32 itself
    # hesitates on. VNNI (vpdpbusd) adds in int32 and does not saturate: the same integers.
    "reduce_range": True,
}
MAX_TOP1_DROP = 0.015  # 1.5 points of top-1
MIN_AGREEMENT = 0.95  # top-1 the same as FP32's on this share of the photos
MIN_MATCHED = 0.95  # a detector's FP32 boxes found again by the int8 model
MATCH_IOU = 0.5
# Fractions of 100 photos compared with limits given to 3 decimals: 1e-9 absorbs the float
# division (0.89 - 0.875 is 0.015000000000000013), never a photo.
EPS = 1e-9


class GateFailed(RuntimeError):
    """The int8 model is not good enough; its files are gone."""


def register(subparsers) -> None:
    q = subparsers.add_parser(
        "quantize", help="int8 model from a model's FP32 ONNX file, gated on labelled photos",
        description="ONNX Runtime static quantization (QDQ, per-channel int8 weights, uint8 activations), "
                    "calibrated through the model's own preprocessing, then evaluated against the FP32 model "
                    f"on {EVALUATION}; writes onnx/<model>_int8.onnx (and Triton's copy) only if it passes.")
    q.add_argument("model", choices=sorted(ENTRIES), help="a model of the build table")
    q.add_argument("--calibration", type=Path, default=None,
                   help=f"folder of photos to calibrate on (default: {CALIBRATION} beside the config)")
    q.add_argument("--config", default="gateway.yaml", help="the repository is this file's folder")
    q.set_defaults(func=run)


def run(args) -> int:
    from gateway.config import ConfigError, load_config

    try:
        config = load_config(args.config)
        entry = ENTRIES[args.model]
        manifest = Manifest(config.root)
        record = quantize(config, entry, calibration=args.calibration)
        manifest.entry(entry.name)["int8"] = record
        manifest.save()
    except (RuntimeError, OSError, ValueError, ConfigError) as exc:
        print(f"gateway models quantize: failed: {exc}", file=sys.stderr)
        return 1
    return 0


def calibration_set(folder: Path) -> list[Path]:
    photos = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGES) if folder.is_dir() else []
    if not photos:
        raise RuntimeError(f"{folder}: no photos to calibrate on ({', '.join(IMAGES)})")
    return photos


def fingerprint(photos: list[Path]) -> str:
    """sha256 over the calibration photos' names and bytes, in order."""
    digest = hashlib.sha256()
    for p in photos:
        digest.update(p.name.encode() + b"\0" + sha256(p).encode())
    return digest.hexdigest()


def stale(root: Path, entry: Entry, record: dict | None, force: bool = False) -> str:
    """Why `gateway models build` must quantize again, or "" when the int8 model is current."""
    if force:
        return "forced"
    if not record:
        return "not quantized"
    if not all((root / f).is_file() for f in entry.int8_files):
        return "missing"
    if record.get("fp32_sha256") != sha256(root / entry.onnx):
        return f"{Path(entry.onnx).name} changed"
    if record.get("method") != METHOD:
        return "the recipe changed"
    if record.get("calibration", {}).get("sha256") != fingerprint(calibration_set(root / CALIBRATION)):
        return "the calibration photos changed"
    if record.get("sha256") != sha256(root / entry.int8_files[0]):
        return f"{Path(entry.int8_files[0]).name} is not the one recorded"
    return ""


def quantize(config, entry: Entry, calibration: Path | None = None, why: str = "", log=print) -> dict:
    """Quantize, gate, place; returns artifacts.json's ``int8`` record. Nothing is placed unless
    the gate passes (a model that fails it, or any step, leaves no new file behind)."""
    root = config.root
    model = config.models[entry.name]
    fp32 = root / entry.onnx
    if not fp32.is_file():
        raise RuntimeError(f"{fp32} is missing: run `gateway models build` first")
    folder = Path(calibration) if calibration else root / CALIBRATION
    evaluation = root / EVALUATION
    if folder.resolve() == evaluation.resolve():
        raise RuntimeError(f"{folder} is the gate's evaluation set: calibrate on other photos")
    photos = calibration_set(folder)
    targets = [root / f for f in entry.int8_files]
    started = time.perf_counter()
    log(f"build {', '.join(entry.int8_files)} ({why + '; ' if why else ''}int8, calibrated on {len(photos)} "
        f"photos of {_shown(folder, root)})")
    try:
        with tempfile.TemporaryDirectory(dir=fp32.parent, prefix=".quantize-") as tmp:
            staged = Path(tmp) / targets[0].name
            quantize_file(fp32, staged, model.preprocess, photos)
            seconds = time.perf_counter() - started
            gate = check(config, entry, fp32, staged, log)
            data = staged.read_bytes()
        place(data, targets)
    except BaseException:
        for target in targets:
            partial(target).unlink(missing_ok=True)
        raise
    log(f"  int8 {entry.name}: quantized in {seconds:.1f} s, gate passed ({gate['summary']})")
    return {
        "backend_model": entry.int8_name, "files": entry.int8_files, "from": entry.onnx,
        "fp32_sha256": sha256(fp32), "sha256": hashlib.sha256(data).hexdigest(),
        "method": METHOD, "onnxruntime": version("onnxruntime"),
        "calibration": {"folder": _shown(folder, root), "photos": len(photos), "sha256": fingerprint(photos)},
        "gate": gate, "quantize_seconds": round(seconds, 1), "reproducible": "same bytes",
        # what /v1/models shows beside each route, by precision (gateway/api/models.py)
        "report": {p: {"accuracy": gate["accuracy"][p], "speed": {**gate["speed"][p], "file": f}}
                   for p, f in (("fp32", entry.onnx), ("int8", entry.int8_files[0]))},
    }


def _shown(folder: Path, root: Path) -> str:
    try:
        return str(folder.resolve().relative_to(root.resolve()))
    except ValueError:
        return str(folder)


def quantize_file(fp32: Path, out: Path, spec, photos: list[Path]) -> None:
    """ONNX Runtime's documented recipe: quant_pre_process, then quantize_static on ``photos``."""
    import onnx
    import onnxruntime as ort
    from onnx import version_converter
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from gateway import tasks

    input_name = ort.InferenceSession(str(fp32), providers=["CPUExecutionProvider"]).get_inputs()[0].name

    class Photos(CalibrationDataReader):
        """The calibration photos in batches of BATCH, decoded and prepared as the gateway serves
        them; ``set_range`` (in batches) lets the calibrator take one batch per pass."""

        def __init__(self):
            self.set_range(0, len(self))

        def __len__(self) -> int:
            return -(-len(photos) // BATCH)

        def set_range(self, start_index: int, end_index: int) -> None:
            self.batches = iter(range(start_index * BATCH, min(end_index * BATCH, len(photos)), BATCH))

        def get_next(self):
            start = next(self.batches, None)
            if start is None:
                return None
            images = tasks.decode([p.read_bytes() for p in photos[start:start + BATCH]], [spec], 40_000_000)
            return {input_name: tasks.prepare(images, spec)}

    source, prepared = fp32, out.with_name("prepared.onnx")
    model = onnx.load(str(fp32))
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    if opset < 13:  # per-channel QuantizeLinear/DequantizeLinear (their axis) need opset 13
        source = out.with_name("opset13.onnx")
        onnx.save(version_converter.convert_version(model, 13), str(source))
    try:
        quant_pre_process(str(source), str(prepared))
    except Exception:  # its symbolic shape inference gives up on some graphs (yolox_nano's batch-0
        # Reshapes); ONNX's own shape inference and the graph optimisation still run
        quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
    stem = next(n.name for n in onnx.load(str(prepared)).graph.node if n.op_type == "Conv")
    quantize_static(str(prepared), str(out), Photos(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    reduce_range=METHOD["reduce_range"], calibrate_method=CalibrationMethod.MinMax,
                    nodes_to_exclude=[stem], extra_options={"CalibStridedMinMax": 1})
    for scratch in {source, prepared} - {fp32}:
        scratch.unlink()


# --- the gate ---

def session(path: Path, threads: int = 0):
    """An ONNX Runtime CPU session as the embedded backend makes one (every graph optimisation:
    the QDQ pairs around each Conv fuse into one integer kernel)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def check(config, entry: Entry, fp32: Path, int8: Path, log=print) -> dict:
    """The gate: the figures (raises GateFailed naming them when the int8 model falls short)."""
    model = config.models[entry.name]
    if model.task.name == "classification":
        gate = classifier_gate(config, model, fp32, int8)
    else:
        gate = detector_gate(config, model, fp32, int8)
    gate["speed"] = {"fp32": speed(fp32, model.preprocess), "int8": speed(int8, model.preprocess)}
    gate["speed"]["ratio"] = round(gate["speed"]["fp32"]["ms_per_image"] / gate["speed"]["int8"]["ms_per_image"], 2)
    log(f"  gate {entry.name} int8 vs FP32 on {gate['photos']} photos of {EVALUATION}: {gate['summary']}; "
        f"1 thread, batch 1: {gate['speed']['fp32']['ms_per_image']} -> {gate['speed']['int8']['ms_per_image']} "
        f"ms/image ({gate['speed']['ratio']}x)")
    if not gate["passed"]:
        raise GateFailed(f"{entry.name}: the int8 model fails the accuracy gate on {EVALUATION}: {gate['summary']} "
                         f"(needs {gate['needs']}); nothing written")
    return gate


def _labelled(config):
    from gateway.tools.evaluation import read_labels

    folder = config.root / EVALUATION
    return read_labels(folder, folder / "labels.csv")


def classifier_gate(config, model, fp32: Path, int8: Path) -> dict:
    """`gateway eval`'s measurement (gateway.tools.evaluation) of both files, the model's preprocessing."""
    import numpy as np

    from gateway import tasks
    from gateway.tools.evaluation import TOP_K, agreement, evaluate_route

    spec, photos = model.preprocess, _labelled(config)
    sessions = {"fp32": session(fp32), "int8": session(int8)}

    def classify(images: list[bytes], route: str) -> list[list[int]]:
        s = sessions[route]
        x = tasks.prepare(tasks.decode(images, [spec], config.server.max_pixels), spec)
        logits = s.run(None, {s.get_inputs()[0].name: x})[0]
        return np.argsort(-logits, axis=1, kind="stable")[:, :TOP_K].tolist()

    ref, got = (evaluate_route(classify, route, photos) for route in ("fp32", "int8"))
    errors = ref["errors"] + got["errors"]
    if errors:
        raise RuntimeError(f"{model.name}: the gate could not evaluate: {errors[:2]}")
    agree = agreement(got, ref)
    assert agree is not None
    drop = ref["top1"] - got["top1"]
    passed = drop <= MAX_TOP1_DROP + EPS and agree >= MIN_AGREEMENT - EPS
    where = {"photos": len(photos), "set": str(EVALUATION)}
    return {**where, "passed": passed,
            "accuracy": {"fp32": {"top1": ref["top1"], "top5": ref["top5"], **where},
                         "int8": {"top1": got["top1"], "top5": got["top5"], "agreement_top1_with_fp32": agree,
                                  **where}},
            "top1_drop": round(drop, 4), "agreement_top1": agree,
            "summary": f"top-1 {ref['top1']:.3f} -> {got['top1']:.3f} (top-5 {ref['top5']:.3f} -> {got['top5']:.3f}), "
                       f"top-1 agreement {agree:.1%}",
            "needs": f"a top-1 drop <= {MAX_TOP1_DROP:.3f}, agreement >= {MIN_AGREEMENT:.0%}"}


def detector_gate(config, model, fp32: Path, int8: Path) -> dict:
    """FP32's boxes on the labelled photos and astronaut found again by the int8 model."""
    import io

    import numpy as np
    from PIL import Image
    from skimage import data as skdata

    from gateway import tasks
    from gateway.detection import iou

    photos = [p.path.read_bytes() for p in _labelled(config)]
    buf = io.BytesIO()
    Image.fromarray(skdata.astronaut()).save(buf, "PNG")
    photos.append(buf.getvalue())
    corners = lambda b: np.array([b["box"][k] for k in ("x1", "y1", "x2", "y2")], dtype=np.float64)
    route = model.routes[0]
    options = model.task.options({}, config.server.default_top_k, len(model.labels))

    def detect(path: Path) -> list[list[dict]]:
        s, found = session(path), []
        for i in range(0, len(photos), 8):
            images = tasks.decode(photos[i:i + 8], [model.preprocess], config.server.max_pixels)
            x = tasks.prepare(images, model.preprocess)
            raw = s.run(None, {s.get_inputs()[0].name: x})[0]
            found += model.task.answer(raw, route, model.labels, tasks.sizes(images), options)
        return found

    ref, got = detect(fp32), detect(int8)
    total = matched = 0
    for want, have in zip(ref, got):
        free = list(have)  # each int8 box matches one FP32 box at most
        for box in want:
            total += 1
            same = [b for b in free if b["index"] == box["index"]]
            if same:
                overlaps = iou(corners(box), np.stack([corners(b) for b in same]))
                if overlaps.max() >= MATCH_IOU:
                    matched += 1
                    free.remove(same[int(overlaps.argmax())])
    share = matched / total if total else 1.0
    person = any(b["label"] == "person" for b in got[-1])
    passed = share >= MIN_MATCHED - EPS and person
    where = {"photos": len(photos), "set": f"{EVALUATION} + scikit-image astronaut"}
    return {**where, "passed": passed,
            "accuracy": {"fp32": {"boxes": total, **where},
                         "int8": {"boxes": sum(map(len, got)), "fp32_boxes_found": round(share, 4),
                                  "astronaut_person": person, **where}},
            "fp32_boxes": total, "int8_boxes": sum(map(len, got)), "matched": round(share, 4),
            "astronaut_person": person,
            "summary": f"{matched} of {total} FP32 boxes found again ({share:.1%}; same class, IoU >= {MATCH_IOU}), "
                       f"int8 boxes {sum(map(len, got))}, astronaut's person {'found' if person else 'missed'}",
            "needs": f">= {MIN_MATCHED:.0%} of the boxes and astronaut's person"}


def speed(path: Path, spec, runs: int = 30) -> dict:
    """Median ms per image, batch 1, one intra-op thread (the model alone; no HTTP, no decoding)."""
    import numpy as np

    s = session(path, threads=1)
    x = np.random.default_rng(0).normal(size=(1, *spec.tensor_dims())).astype(np.float32)
    feed = {s.get_inputs()[0].name: x}
    for _ in range(3):
        s.run(None, feed)
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        s.run(None, feed)
        times.append(time.perf_counter() - t)
    return {"ms_per_image": round(1000 * float(np.median(times)), 2), "threads": 1, "batch": 1,
            "cpu": cpu_kernels()}


def cpu_kernels() -> str:
    """Which integer dot-product instructions this CPU gives MLAS (/proc/cpuinfo's flags)."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return "unknown"
    names = set(flags.split(":", 1)[1].split())
    for flag, kernels in (("amx_int8", "AMX"), ("avx512_vnni", "AVX-512 VNNI"), ("avx_vnni", "AVX-VNNI"),
                          ("avx512bw", "AVX-512 (no VNNI)"), ("avx2", "AVX2 (no VNNI)")):
        if flag in names:
            return kernels
    return "SSE"
