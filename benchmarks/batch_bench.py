"""`gateway batch` through the gateway (embedded backend) vs a plain onnxruntime loop over the
same folder with the same preprocessing. Target (issue 6): batch >= 0.8x the plain loop.

    .venv/bin/python benchmarks/batch_bench.py [--images 200] [--concurrency 4] [--workers 2]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import onnxruntime as ort

from common import ROOT, photos
from conftest import GatewayProcess
from gateway.batch import list_inputs, run_batch
from gateway.config import load_config
from gateway.preprocess import preprocess_bytes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--model", default="efficientnet_lite0")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "images"
        folder.mkdir()
        samples = list(photos().values())
        for i in range(args.images):
            (folder / f"{i:05d}.jpg").write_bytes(samples[i % len(samples)])

        config = load_config(ROOT / "gateway.yaml")
        spec = config.models[args.model].routes[0].preprocess
        session = ort.InferenceSession(str(ROOT / "onnx" / f"{args.model}.onnx"), providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        files = list_inputs(folder)
        session.run(None, {name: preprocess_bytes(files[0].read_bytes(), spec)[None]})
        t0 = time.perf_counter()
        for path in files:  # the plain loop: read, preprocess, run
            session.run(None, {name: preprocess_bytes(path.read_bytes(), spec)[None]})
        plain = len(files) / (time.perf_counter() - t0)

        gw = GatewayProcess(ROOT / "gateway.yaml", workers=args.workers)
        try:
            out = Path(tmp) / "results.jsonl"
            run_batch(folder, Path(tmp) / "warmup.jsonl", url=gw.url, model=args.model, progress=False, limit=8,
                      log=lambda m: None)
            stats = run_batch(folder, out, url=gw.url, model=args.model, backend="embedded",
                              concurrency=args.concurrency, progress=False, log=lambda m: None)
        finally:
            gw.stop()
    print(f"plain onnxruntime loop over {len(files)} files: {plain:.1f} images/s")
    print(f"gateway batch (embedded, {args.workers} workers, concurrency {args.concurrency}): "
          f"{stats['images_per_s']:.1f} images/s, {stats['errors']} errors")
    print(f"ratio batch / plain: {stats['images_per_s'] / plain:.2f}x  (target >= 0.80x)")


if __name__ == "__main__":
    main()
