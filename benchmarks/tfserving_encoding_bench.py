"""JSON encodings of a TF Serving predict body: json.dumps(arr.tolist()) vs orjson from numpy.

    .venv/bin/python benchmarks/tfserving_encoding_bench.py
"""
import json
import statistics
import time

import numpy as np
import orjson


def timed(fn, n=10) -> float:
    fn()
    runs = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        runs.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(runs)


def main() -> None:
    rng = np.random.default_rng(0)
    for n in (1, 8):
        batch = rng.uniform(-1, 1, (n, 224, 224, 3)).astype(np.float32)
        stdlib = timed(lambda: json.dumps({"inputs": {"input_1": batch.tolist()}}).encode())
        fast = timed(lambda: orjson.dumps({"inputs": {"input_1": batch}}, option=orjson.OPT_SERIALIZE_NUMPY))
        size = len(orjson.dumps({"inputs": {"input_1": batch}}, option=orjson.OPT_SERIALIZE_NUMPY))
        print(f"batch {n}: json.dumps(tolist) {stdlib:8.1f} ms   orjson(numpy) {fast:7.1f} ms   "
              f"speed-up {stdlib / fast:5.1f}x   body {size / 1e6:.1f} MB   (binary .npy would be "
              f"{batch.nbytes / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
