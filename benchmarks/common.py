"""Benchmark scripts' shared pieces: the package's load generator, the repo root, a plain loop."""
from __future__ import annotations

import time
from pathlib import Path

from gateway.tools.loadgen import fmt, per_thread, run_load, summarize  # noqa: F401

ROOT = Path(__file__).resolve().parent.parent


def plain_loop(files: list[Path], model: str, spec, threads: int) -> float:
    """images/s of read -> preprocess -> session.run, one file after another (the baseline)."""
    import onnxruntime as ort

    from gateway.preprocess import preprocess_bytes

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    session = ort.InferenceSession(str(ROOT / "onnx" / f"{model}.onnx"), opts, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    session.run(None, {name: preprocess_bytes(files[0].read_bytes(), spec)[None]})
    t0 = time.perf_counter()
    for path in files:
        session.run(None, {name: preprocess_bytes(path.read_bytes(), spec)[None]})
    return len(files) / (time.perf_counter() - t0)
