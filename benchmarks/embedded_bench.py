"""Gateway (embedded ONNX Runtime, over HTTP) vs a plain onnxruntime loop, side by side.

Target (issue 2): (a) gateway, 2 workers, concurrency 4 >= 0.7x (b) plain loop throughput,
and preprocessing a 1920x1080 JPEG <= 10 ms.  Usage: .venv/bin/python benchmarks/embedded_bench.py
"""
from __future__ import annotations

import argparse
import statistics
import time

import onnxruntime as ort
import requests

from common import ROOT, fmt, photos, run_load, summarize
from conftest import GatewayProcess
from gateway.config import load_config
from gateway.preprocess import decode_image, preprocess_bytes, resize, normalize


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="efficientnet_lite0")
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--concurrency", type=int, default=4)
    args = ap.parse_args()

    config = load_config(ROOT / "gateway.yaml")
    spec = config.models[args.model].routes[0].preprocess
    images = photos()
    items = list(images.values())

    # preprocessing alone, 1920x1080 JPEG
    big = images["astronaut_1080p"]
    for _ in range(5):
        preprocess_bytes(big, spec)
    times = []
    for _ in range(50):
        t0 = time.perf_counter()
        preprocess_bytes(big, spec)
        times.append((time.perf_counter() - t0) * 1e3)
    no_draft = []
    for _ in range(10):
        t0 = time.perf_counter()
        normalize(resize(decode_image(big), spec), spec)
        no_draft.append((time.perf_counter() - t0) * 1e3)
    print(f"preprocess 1920x1080 JPEG: median {statistics.median(times):.2f} ms "
          f"(without JPEG draft mode: {statistics.median(no_draft):.2f} ms)")

    # (b) plain onnxruntime loop, same preprocessing, default threads (all cores)
    session = ort.InferenceSession(str(ROOT / "onnx" / f"{args.model}.onnx"), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def plain(data: bytes):
        session.run(None, {name: preprocess_bytes(data, spec)[None]})

    baseline = run_load(plain, items, concurrency=1, total=args.requests)

    # (a) the gateway over HTTP
    gw = GatewayProcess(ROOT / "gateway.yaml", workers=args.workers)
    try:
        local = __import__("threading").local()

        def via_gateway(data: bytes):
            s = getattr(local, "s", None) or setattr(local, "s", requests.Session()) or local.s
            r = s.post(f"{gw.url}/v1/models/{args.model}/classify?backend=embedded", data=data,
                       headers={"Content-Type": "image/jpeg"}, timeout=60)
            r.raise_for_status()

        gateway = run_load(via_gateway, items, concurrency=args.concurrency, total=args.requests)
    finally:
        gw.stop()

    print(fmt("(b) plain onnxruntime loop (1 thread caller)", baseline))
    print(fmt(f"(a) gateway HTTP, {args.workers} workers, conc {args.concurrency}", gateway))
    print(f"ratio (a)/(b) throughput: {gateway['throughput'] / baseline['throughput']:.2f}x  (target >= 0.70x)")


if __name__ == "__main__":
    main()
