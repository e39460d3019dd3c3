"""`gateway batch INPUT --out results.jsonl`: classify (or detect in) a whole folder, like a batch transform job.

- INPUT: a folder (its files, not sub-folders, in sorted name order; dot-files skipped) or a
  text file with one path per line (relative paths resolve against the text file's folder).
- One JSON line per image, in input order: ``{"file", "model", "backend", "predictions"}`` (a
  detector: ``"detections"`` instead) or
  ``{"file", "error": {"status", "code", "message"}}`` - a corrupt file is an error line, never a gap.
- Resumable: lines already in --out are kept and skipped (a torn last line from a crash is cut).
  Gateway outages (no answer, 503, 504) are retried, then stop the run *without* writing a line,
  so the next run picks the image up again; a 502 that persists through the retries is about
  this image's answer and becomes its error line.
- ``--shard i/n``: only every n-th file starting at i, so n machines split one dataset.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from gateway.client import DEFAULT_URL, ClientError, GatewayClient

RETRIES = 3
RETRY_DELAY_S = 0.5  # doubled per retry


def list_inputs(source: Path, exclude: tuple[Path, ...] = ()) -> list[Path]:
    """The images to classify. ``exclude`` names the run's own files (its output), which are
    never inputs even when they sit in the input folder; dot-files (temporary files) are skipped."""
    if source.is_dir():
        skip = {p.resolve() for p in exclude}
        return sorted((p for p in source.iterdir()
                       if p.is_file() and not p.name.startswith(".") and p.resolve() not in skip),
                      key=lambda p: p.name)
    paths = [Path(entry) for entry in list_file_entries(source.read_text())]
    return [p if p.is_absolute() else source.parent / p for p in paths]


def list_file_entries(text: str) -> list[str]:
    """A list file's paths: one a line, blank lines and # comments skipped."""
    lines = (line.strip() for line in text.splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def parse_shard(text: str) -> tuple[int, int]:
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard must look like i/n (e.g. 0/4), got {text!r}") from None
    if n < 1 or not 0 <= i < n:
        raise ValueError(f"--shard {text}: need 0 <= i < n")
    return i, n


def shard(files: list[Path], i: int, n: int) -> list[Path]:
    return files[i::n]


def file_key(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


def load_done(out: Path) -> set[str]:
    """Keys already written; cuts a torn (unterminated or unparsable) last line."""
    if not out.exists():
        return set()
    data = out.read_bytes()
    keep = data if data.endswith(b"\n") else data[: data.rfind(b"\n") + 1]
    done, good = set(), 0
    for line in keep.splitlines(keepends=True):
        try:
            done.add(json.loads(line)["file"])
        except (ValueError, KeyError, TypeError):
            break
        good += len(line)
    if good != len(data):
        with open(out, "r+b") as f:
            f.truncate(good)
    return done


class GatewayDown(Exception):
    pass


def classify_one(client: GatewayClient, path: Path, key: str, model, backend, top_k, task="classification") -> dict:
    """One image's line: its predictions (a classifier) or detections (a detector), or its error."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        return {"file": key, "error": {"status": None, "code": "unreadable_file", "message": str(exc)}}
    for attempt in range(RETRIES):
        try:
            if task == "detection":
                body = client.detect(data, model=model, backend=backend)
                found = {"detections": body["results"][0]["detections"]}
            else:
                body = client.classify(data, model=model, backend=backend, top_k=top_k)
                found = {"predictions": body["results"][0]["predictions"]}
            return {"file": key, "model": body["model"], "backend": body["backend"], **found}
        except ClientError as exc:
            if exc.status is not None and exc.status < 500:
                return {"file": key, "error": {"status": exc.status, "code": exc.code, "message": exc.message}}
            last = exc
            time.sleep(RETRY_DELAY_S * 2 ** attempt)
    if last.status == 502:  # the backend keeps answering this image badly: record it, move on
        return {"file": key, "error": {"status": 502, "code": last.code, "message": last.message}}
    raise GatewayDown(f"{key}: {last}")


def _task(client: GatewayClient, model: str | None) -> str:
    """What the model does (classification or detection), asked of the gateway once;
    classification when the gateway cannot say (the first request will report why)."""
    try:
        return client.model(model or client.models()["default_model"]).get("task", "classification")
    except (ClientError, KeyError, TypeError):
        return "classification"


def run_batch(source: Path, out: Path, url: str = DEFAULT_URL, model=None, backend=None, top_k=None,
              concurrency: int = 4, shard_spec: str | None = None, progress: bool = True, limit: int | None = None,
              log=print) -> dict:
    files = list_inputs(source, exclude=(out,))
    if shard_spec:
        files = shard(files, *parse_shard(shard_spec))
    root = source if source.is_dir() else source.parent
    done = load_done(out)
    pending = [(p, file_key(p, root)) for p in files if file_key(p, root) not in done]
    todo = pending if limit is None else pending[:limit]
    client = GatewayClient(url)
    task = _task(client, model)
    stats: dict[str, Any] = {"total": len(files), "skipped": len(files) - len(pending), "written": 0, "errors": 0}
    bar = _bar(len(todo), progress)
    started = time.perf_counter()
    with open(out, "a") as sink, ThreadPoolExecutor(concurrency) as pool:
        window: deque = deque()
        items = iter(todo)

        def submit_next() -> bool:
            item = next(items, None)
            if item is None:
                return False
            window.append(pool.submit(classify_one, client, item[0], item[1], model, backend, top_k, task))
            return True

        for _ in range(concurrency * 2):  # bounded read-ahead; answers are written in input order
            submit_next()
        try:
            while window:
                line = window.popleft().result()
                sink.write(json.dumps(line) + "\n")
                sink.flush()
                stats["written"] += 1
                stats["errors"] += "error" in line
                bar.update(1)
                submit_next()
        except GatewayDown as exc:
            for future in window:
                future.cancel()
            stats["aborted"] = str(exc)
    bar.close()
    elapsed = time.perf_counter() - started
    stats["seconds"] = round(elapsed, 3)
    stats["images_per_s"] = round(stats["written"] / elapsed, 2) if elapsed else 0.0
    log(summary_line(stats))
    return stats


def summary_line(stats: dict) -> str:
    return (f"batch: {stats['written']} written ({stats['errors']} errors), {stats['skipped']} already done, "
            f"{stats['images_per_s']} images/s" + (f"; stopped: {stats['aborted']}" if "aborted" in stats else ""))


def _bar(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="img", disable=not enabled, file=sys.stderr, dynamic_ncols=True)


def register(subparsers) -> None:
    p = subparsers.add_parser("batch", help="classify a folder (or a list of paths) into a JSONL file")
    p.add_argument("input",
                   help="folder of images (its files in name order, not sub-folders), a text file of paths, "
                        "or with --ray an s3://bucket/prefix")
    p.add_argument("--out", required=True,
                   help="JSON Lines output (appended to; resumable); with --ray also s3://bucket/key.jsonl")
    p.add_argument("--url", default=None, help=f"the gateway (default {DEFAULT_URL})")
    p.add_argument("--model", default=None)
    p.add_argument("--backend", default=None)
    p.add_argument("--top-k", type=int, default=None, dest="top_k")
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--shard", default=None, help="i/n: take every n-th file starting at i (0-based)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--limit", type=int, default=None, help=argparse.SUPPRESS)  # stop after N (tests)
    ray = p.add_argument_group("Ray Data (gateway/ray_batch.py): no gateway, ONNX Runtime in Ray actors")
    ray.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                     help="run on Ray: a local one, or the cluster at ADDRESS (or RAY_ADDRESS)")
    ray.add_argument("--config", default="gateway.yaml", help="models and preprocessing (default: gateway.yaml)")
    ray.add_argument("--s3-endpoint", default=None, dest="s3_endpoint",
                     help="S3-compatible endpoint URL (default: AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL, else AWS)")
    ray.add_argument("--actors", type=int, default=None, help="inference actors (default: from the cluster's CPUs)")
    ray.add_argument("--batch-size", type=int, default=64, dest="batch_size",
                     help="images per Ray batch (default 64; the model runs 4 at a time)")
    p.set_defaults(func=batch_command)


def batch_command(args) -> int:
    if args.ray is not None:
        return ray_batch_command(args)
    if args.input.startswith("s3://") or args.out.startswith("s3://"):
        print("gateway batch: s3:// locations need --ray", file=sys.stderr)
        return 2
    source = Path(args.input)
    if not source.exists():
        print(f"gateway batch: {source} does not exist", file=sys.stderr)
        return 2
    try:
        stats = run_batch(source, Path(args.out), url=args.url or DEFAULT_URL, model=args.model,
                          backend=args.backend, top_k=args.top_k, concurrency=args.concurrency,
                          shard_spec=args.shard, progress=not args.no_progress, limit=args.limit,
                          log=lambda m: print(m, file=sys.stderr))
    except ValueError as exc:
        print(f"gateway batch: {exc}", file=sys.stderr)
        return 2
    return 1 if "aborted" in stats else 0


def ray_batch_command(args) -> int:
    from gateway.ray_batch import run_ray_batch

    if args.url:
        print("gateway batch: --ray runs the model in Ray actors, without a gateway; drop --url", file=sys.stderr)
        return 2
    try:
        stats = run_ray_batch(args.input, args.out, address=args.ray or None, config_path=args.config,
                              model=args.model, backend=args.backend, top_k=args.top_k, actors=args.actors,
                              batch_size=args.batch_size, s3_endpoint=args.s3_endpoint, shard_spec=args.shard,
                              progress=not args.no_progress, limit=args.limit,
                              log=lambda m: print(m, file=sys.stderr))
    except (ValueError, OSError) as exc:  # bad config or location, unreachable store
        print(f"gateway batch: {exc}", file=sys.stderr)
        return 2
    return 1 if "aborted" in stats else 0
