"""Preprocessing one 1920x1080 JPEG for each model of gateway.yaml: decode (JPEG draft mode on and
off) + resize + normalize, median of N runs in one process. Target: <= 10 ms with draft mode.
Usage: .venv/bin/python benchmarks/preprocess_bench.py [--runs 30]
"""
from __future__ import annotations

import argparse
import statistics
import time

from gateway.config import load_config
from gateway.preprocess import decode_image, preprocess_image

from common import ROOT, photos


def median_ms(fn, runs: int) -> float:
    fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=30)
    args = ap.parse_args()
    jpeg = photos()["astronaut_1080p"]
    for model in load_config(ROOT / "gateway.yaml").models.values():
        spec = model.preprocess
        drafted = median_ms(lambda spec=spec: preprocess_image(decode_image(jpeg, draft_size=spec.decode_size()), spec),
                            args.runs)
        full = median_ms(lambda spec=spec: preprocess_image(decode_image(jpeg), spec), args.runs)
        print(f"{model.name:<20} {spec.resize:<12} 1920x1080 JPEG: {drafted:6.2f} ms with draft decoding, "
              f"{full:6.2f} ms without (target <= 10 ms)")


if __name__ == "__main__":
    main()
