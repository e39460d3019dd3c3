"""`gateway batch` through the gateway (embedded backend) vs a plain onnxruntime loop over the
same folder with the same preprocessing. Target (issue 6): batch >= 0.8x the plain loop.

Rounds alternate the plain loops and the batch run, so background load on a shared machine hits
both sides alike; the ratio per round and its median are printed. The plain loop runs with ORT's
default threads and with one intra-op thread (the default spins a thread per core and measured
~2x slower on a busy 2-core machine); the faster of the two is the baseline.

    .venv/bin/python benchmarks/batch_bench.py [--images 120] [--rounds 3] [--concurrency 4] [--workers 2]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from gateway.config import load_config
from gateway.tools.batch.http_engine import list_inputs, run_batch
from gateway.tools.local_gateway import LocalGateway

from common import ROOT, photos, plain_loop


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=120)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--model", default="efficientnet_lite0")
    args = ap.parse_args()

    spec = load_config(ROOT / "gateway.yaml").models[args.model].routes[0].preprocess
    ratios = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "images"
        folder.mkdir()
        samples = list(photos().values())
        for i in range(args.images):
            (folder / f"{i:05d}.jpg").write_bytes(samples[i % len(samples)])
        files = list_inputs(folder)

        gw = LocalGateway(ROOT / "gateway.yaml", workers=args.workers, log_path=ROOT / "run" / "bench-gateway.log")
        try:
            run_batch(folder, Path(tmp) / "warmup.jsonl", url=gw.url, model=args.model, backend="embedded",
                      concurrency=args.concurrency, progress=False, limit=16, log=lambda m: None)
            for r in range(args.rounds):
                default = plain_loop(files, args.model, spec, threads=0)
                single = plain_loop(files, args.model, spec, threads=1)
                stats = run_batch(folder, Path(tmp) / f"results{r}.jsonl", url=gw.url, model=args.model,
                                  backend="embedded", concurrency=args.concurrency, progress=False,
                                  log=lambda m: None)
                ratio = stats["images_per_s"] / max(default, single)
                ratios.append(ratio)
                print(f"round {r}: plain loop {default:6.1f} img/s (default threads), {single:6.1f} img/s "
                      f"(1 thread) | gateway batch ({args.workers} workers, concurrency {args.concurrency}) "
                      f"{stats['images_per_s']:6.1f} img/s, {stats['errors']} errors | ratio {ratio:.2f}x")
        finally:
            gw.stop()
    print(f"{args.images} files, model {args.model}: median ratio gateway batch / faster plain loop "
          f"{statistics.median(ratios):.2f}x  (target >= 0.80x)")


if __name__ == "__main__":
    main()
