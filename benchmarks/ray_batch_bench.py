"""`gateway batch --ray` vs `gateway batch` (through a `gateway serve` on a free port) vs a plain
onnxruntime loop with the same preprocessing, side by side in one run, on --images photos (default
2400) made from the 100 labelled ImageNet photos: six variants each (as is, mirrored,
centre-cropped, 2x upscaled so JPEG draft decoding is exercised, re-encoded at quality 70, grey),
the 600 variants repeated under new names up to --images.

Ray is started once (its start-up cost is printed); each Ray run then pays for planning the job
and starting its actors ("first results after") before streaming.  Rates:
- "after start": images / (end - job submitted), actor start-up included;
- "streaming": images after the first batch / time after it (decoding that ran while the actors
  loaded is credited here, so it is an upper bound).
Rounds alternate the contenders so background load on a shared machine hits all alike.
Target (issue 16): the Ray path >= 0.8x the plain loop once started.

    .venv/bin/python benchmarks/ray_batch_bench.py [--images 2400] [--rounds 2] [--batch-size 64]
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # a one-machine Ray on loopback
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from PIL import Image, ImageOps

from gateway.config import load_config
from gateway.tools.batch.http_engine import list_inputs, run_batch
from gateway.tools.batch.ray_engine import DEFAULT_BATCH, run_ray_batch
from gateway.tools.local_gateway import LocalGateway

from common import ROOT, plain_loop

SAMPLES = [ROOT / "tests" / "data" / "imagenet-sample", ROOT.parent / "shared" / "data" / "imagenet-sample"]
VARIANTS = {
    "orig": lambda im: im,
    "mirror": lambda im: ImageOps.mirror(im),
    "crop": lambda im: im.crop((im.width // 8, im.height // 8, im.width * 7 // 8, im.height * 7 // 8)),
    "up2x": lambda im: im.resize((im.width * 2, im.height * 2), Image.BICUBIC),
    "q70": lambda im: im,
    "grey": lambda im: ImageOps.grayscale(im).convert("RGB"),
}


def make_images(folder: Path, count: int) -> dict[str, int]:
    """Writes ``count`` photos; returns file name -> ImageNet class index."""
    sample = next(d for d in SAMPLES if (d / "labels.csv").is_file())
    with open(sample / "labels.csv") as f:
        rows = list(csv.DictReader(f))
    variants = []
    for name, change in VARIANTS.items():
        for row in rows:
            out = io.BytesIO()
            change(Image.open(sample / row["file"]).convert("RGB")).save(
                out, format="JPEG", quality=70 if name == "q70" else 90)
            variants.append((f"{Path(row['file']).stem}_{name}", out.getvalue(), int(row["class_index"])))
    labels = {}
    for i in range(count):
        stem, data, label = variants[i % len(variants)]
        file = f"{i:05d}_{stem}.jpg"
        (folder / file).write_bytes(data)
        labels[file] = label
    return labels


def top1(path: Path) -> dict[str, int]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return {r["file"]: r["predictions"][0]["index"] for r in rows if "predictions" in r}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--images", type=int, default=2400, help="photos in the folder (500 or more)")
    ap.add_argument("--batch-size", type=int, default=DEFAULT_BATCH)
    ap.add_argument("--concurrency", type=int, default=4, help="gateway batch's concurrent requests")
    ap.add_argument("--workers", type=int, default=2, help="gateway serve workers")
    ap.add_argument("--model", default="efficientnet_lite0")
    args = ap.parse_args()

    import ray

    config = ROOT / "gateway.yaml"
    spec = load_config(config).models[args.model].routes[0].preprocess
    cores = os.cpu_count() or 1
    table = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "images"
        folder.mkdir()
        labels = make_images(folder, args.images)
        files = list_inputs(folder)
        print(f"{len(files)} photos, model {args.model}, {cores} cores")

        t0 = time.perf_counter()
        ray.init(num_cpus=cores, include_dashboard=False, logging_level=logging.WARNING)
        ray_start = time.perf_counter() - t0
        print(f"ray.init (local, {cores} CPUs): {ray_start:.1f} s")
        gw = LocalGateway(Path(config), workers=args.workers, log_path=ROOT / "run" / "bench-gateway.log")
        try:
            run_batch(folder, Path(tmp) / "warmup.jsonl", url=gw.url, model=args.model, backend="embedded",
                      concurrency=args.concurrency, progress=False, limit=16, log=lambda m: None)
            for r in range(args.rounds):
                single = plain_loop(files, args.model, spec, threads=1)
                default = plain_loop(files, args.model, spec, threads=0)
                ray_out, gw_out = Path(tmp) / f"ray{r}.jsonl", Path(tmp) / f"gateway{r}.jsonl"
                rs = run_ray_batch(str(folder), str(ray_out), config_path=str(config), model=args.model,
                                   batch_size=args.batch_size, progress=False, log=lambda m: None)
                gs = run_batch(folder, gw_out, url=gw.url, model=args.model, backend="embedded",
                               concurrency=args.concurrency, progress=False, log=lambda m: None)
                plain = max(single, default)
                ray_top1, gw_top1 = top1(ray_out), top1(gw_out)
                row = {"plain_1thread": single, "plain_default": default, "ray": rs["images_per_s"],
                       "ray_streaming": rs.get("steady_images_per_s", 0.0), "ray_first_s": rs["first_s"],
                       "ray_actors": rs["actors"], "gateway_batch": gs["images_per_s"],
                       "ray_vs_plain": rs["images_per_s"] / plain,
                       "ray_streaming_vs_plain": rs.get("steady_images_per_s", 0.0) / plain,
                       "gateway_vs_plain": gs["images_per_s"] / plain,
                       "top1_same": sum(ray_top1[k] == gw_top1.get(k) for k in ray_top1) / len(ray_top1),
                       "top1_accuracy": sum(ray_top1[k] == labels[k] for k in ray_top1) / len(ray_top1)}
                table.append(row)
                print(f"round {r}: plain loop {single:6.1f} img/s (1 thread) {default:6.1f} (default threads) | "
                      f"ray {rs['images_per_s']:6.1f} after start, {row['ray_streaming']:6.1f} streaming, "
                      f"first results {rs['first_s']:.1f} s, {rs['actors']} actors | gateway batch "
                      f"{gs['images_per_s']:6.1f} | ray/plain {row['ray_vs_plain']:.2f}x "
                      f"(streaming {row['ray_streaming_vs_plain']:.2f}x), gateway batch/plain "
                      f"{row['gateway_vs_plain']:.2f}x | top-1 ray = gateway {row['top1_same']:.3f}, "
                      f"accuracy {row['top1_accuracy']:.3f}")
        finally:
            gw.stop()
            ray.shutdown()
    median = {k: statistics.median(row[k] for row in table) for k in table[0]}
    print(f"median over {len(table)} rounds: ray/plain {median['ray_vs_plain']:.2f}x after start "
          f"({median['ray_streaming_vs_plain']:.2f}x streaming; target >= 0.80x), gateway batch/plain "
          f"{median['gateway_vs_plain']:.2f}x; ray start {ray_start:.1f} s + {median['ray_first_s']:.1f} s "
          f"to first results; per core: {median['ray'] / cores:.1f} img/s after start")


if __name__ == "__main__":
    main()
