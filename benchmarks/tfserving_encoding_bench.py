"""JSON encodings of a TF Serving predict request, and decoding of its answer, side by side.

Request: json.dumps(arr.tolist()) vs orjson straight from the numpy buffer, in the row
("instances") and columnar ("inputs") formats. Answer: the (N, 1000) float list decoded by
json.loads vs orjson.loads (then np.asarray). Medians of 10 runs, one process, same data.

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
    opt = orjson.OPT_SERIALIZE_NUMPY
    for n in (1, 8):
        batch = rng.uniform(-1, 1, (n, 224, 224, 3)).astype(np.float32)
        std_cols = timed(lambda batch=batch: json.dumps({"inputs": {"input_1": batch.tolist()}}).encode())
        std_rows = timed(lambda batch=batch: json.dumps({"instances": batch.tolist()}).encode())
        fast_4d = timed(lambda batch=batch: orjson.dumps({"inputs": {"input_1": batch}}, option=opt))
        # the adapter's encoding
        fast_cols = timed(lambda batch=batch: orjson.dumps({"inputs": {"input_1": list(batch)}}, option=opt))
        fast_rows = timed(lambda batch=batch: orjson.dumps({"instances": list(batch)}, option=opt))
        cols = orjson.dumps({"inputs": {"input_1": list(batch)}}, option=opt)
        assert cols == orjson.dumps({"inputs": {"input_1": batch}}, option=opt)
        rows = orjson.dumps({"instances": list(batch)}, option=opt)
        print(f"batch {n} request: json.dumps(tolist) columnar {std_cols:7.1f} ms, row {std_rows:7.1f} ms | "
              f"orjson columnar 4-D array {fast_4d:6.1f} ms, list of images {fast_cols:6.1f} ms, "
              f"row {fast_rows:6.1f} ms | speed-up {std_cols / fast_cols:4.1f}x | body {len(cols) / 1e6:.1f} MB "
              f"columnar, {len(rows) / 1e6:.1f} MB row (raw float32 {batch.nbytes / 1e6:.1f} MB)")
        answer = json.dumps({"outputs": rng.dirichlet(np.ones(1000), n).astype(np.float32).tolist()}).encode()
        std_dec = timed(lambda answer=answer: np.asarray(json.loads(answer)["outputs"], dtype=np.float32))
        fast_dec = timed(lambda answer=answer: np.asarray(orjson.loads(answer)["outputs"], dtype=np.float32))
        print(f"batch {n} answer ({len(answer) / 1e3:.0f} kB): json.loads {std_dec:6.2f} ms, "
              f"orjson.loads {fast_dec:6.2f} ms, speed-up {std_dec / fast_dec:4.1f}x")


if __name__ == "__main__":
    main()
