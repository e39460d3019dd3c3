"""`gateway batch INPUT --out results.jsonl`: a model's task on a whole folder, like a batch transform job.

Two engines write the same lines (gateway.tools.batch.lines) to the same kind of results file
(gateway.tools.batch.results): through a running gateway (the default), or on Ray Data with
``--ray`` (no gateway: ONNX Runtime in Ray actors). Resumable: keys already answered in --out
are skipped (error lines are retried unless --keep-errors). Exit 0 when the run finished and
wrote at least one result, 1 when it stopped early or every line it wrote is an error, 2 for
a usage mistake.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gateway.tools.batch.progress import exit_status
from gateway.tools.client import DEFAULT_URL


def register(subparsers) -> None:
    p = subparsers.add_parser("batch", help="classify (or detect in) a folder or list of paths into a JSONL file")
    p.add_argument("input",
                   help="folder of images (its files in name order, not sub-folders), a text file of paths, "
                        "or with --ray an s3://bucket/prefix")
    p.add_argument("--out", required=True,
                   help="JSON Lines output (appended to; resumable); with --ray also s3://bucket/key.jsonl")
    p.add_argument("--url", default=None, help=f"the gateway (default {DEFAULT_URL})")
    p.add_argument("--model", default=None)
    p.add_argument("--backend", default=None, help="force a route (by its name or its backend)")
    p.add_argument("--top-k", type=int, default=None, dest="top_k")
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--shard", default=None, help="i/n: take every n-th file starting at i (0-based)")
    p.add_argument("--keep-errors", action="store_true", dest="keep_errors",
                   help="a re-run skips images whose line is an error too (default: it retries them)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--limit", type=int, default=None, help=argparse.SUPPRESS)  # stop after N (tests)
    ray = p.add_argument_group("Ray Data (gateway/tools/batch/ray_engine.py): no gateway, ONNX Runtime in Ray actors")
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
    log = lambda m: print(m, file=sys.stderr)
    try:
        if args.ray is not None:
            stats = _ray(args, log)
        elif args.input.startswith("s3://") or args.out.startswith("s3://"):
            raise ValueError("s3:// locations need --ray")
        else:
            from gateway.tools.batch.http_engine import run_batch

            stats = run_batch(Path(args.input), Path(args.out), url=args.url or DEFAULT_URL, model=args.model,
                              backend=args.backend, top_k=args.top_k, concurrency=args.concurrency,
                              shard_spec=args.shard, progress=not args.no_progress, limit=args.limit,
                              keep_errors=args.keep_errors, log=log)
    except (ValueError, OSError) as exc:  # bad input, output, config or location; unreachable store
        print(f"gateway batch: {exc}", file=sys.stderr)
        return 2
    return exit_status(stats)


def _ray(args, log) -> dict:
    from gateway.tools.batch.ray_engine import run_ray_batch

    if args.url:
        raise ValueError("--ray runs the model in Ray actors, without a gateway; drop --url")
    return run_ray_batch(args.input, args.out, address=args.ray or None, config_path=args.config,
                         model=args.model, backend=args.backend, top_k=args.top_k, actors=args.actors,
                         batch_size=args.batch_size, s3_endpoint=args.s3_endpoint, shard_spec=args.shard,
                         progress=not args.no_progress, limit=args.limit, keep_errors=args.keep_errors, log=log)
