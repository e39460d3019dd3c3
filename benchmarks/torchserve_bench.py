"""Gateway -> TorchServe (.npy tensors) vs JPEG straight to TorchServe (its handler preprocesses).

Same photos, one run, concurrency 1/4/8, each level measured direct then via the gateway
back to back so both see the same machine load. Target (issue 4): gateway >= 0.9x direct
throughput at concurrency 8.

    .venv/bin/python benchmarks/torchserve_bench.py [--model efficientnet_lite0] [--requests 120]

Starts TorchServe (`gateway backends up torchserve`) unless it already runs, and a gateway
(2 workers, like `make serve`); stops what it started.
"""
from __future__ import annotations

import argparse
import threading

import requests

from common import ROOT, fmt, photos, run_load
from conftest import GatewayProcess
from gateway.config import load_config
from gateway.servers import torchserve as launcher

ARCHIVE = {"efficientnet_lite0": "efficientnet_lite0", "mobilenet_v2": "mobilenet"}


def session_call(make_request):
    """One keep-alive session per thread, like a real client pool."""
    local = threading.local()

    def call(data: bytes):
        if not hasattr(local, "s"):
            local.s = requests.Session()
        resp = make_request(local.s, data)
        resp.raise_for_status()

    return call


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="efficientnet_lite0", choices=sorted(ARCHIVE))
    ap.add_argument("--requests", type=int, default=120, help="requests per measurement")
    ap.add_argument("--concurrency", default="1,4,8")
    ap.add_argument("--workers", type=int, default=2, help="gateway worker processes")
    args = ap.parse_args()

    config = load_config(ROOT / "gateway.yaml")
    ts_url = config.backends["torchserve"].url
    started_ts = not launcher.status(config)["running"]
    if started_ts:
        launcher.start(config, timeout=300)
    gw = None
    try:
        gw = GatewayProcess(ROOT / "gateway.yaml", workers=args.workers, threads=4)
        items = list(photos().values())
        direct = session_call(lambda s, data: s.post(
            f"{ts_url}/predictions/{ARCHIVE[args.model]}", data=data,
            headers={"Content-Type": "application/octet-stream"}, timeout=60))
        via_gateway = session_call(lambda s, data: s.post(
            f"{gw.url}/v1/models/{args.model}/classify", params={"backend": "torchserve"}, data=data,
            headers={"Content-Type": "image/jpeg"}, timeout=60))
        results = []
        for conc in (int(c) for c in args.concurrency.split(",")):
            d = run_load(direct, items, concurrency=conc, total=args.requests, warmup=8)
            g = run_load(via_gateway, items, concurrency=conc, total=args.requests, warmup=8)
            results.append((conc, d, g))
    finally:
        if gw is not None:
            gw.stop()
        if started_ts:
            launcher.stop(config)

    print(f"model {args.model}; {len(items)} JPEG photos (up to 1920x1080); {args.requests} requests each; "
          f"gateway {args.workers} workers x 4 threads; TorchServe 1 worker, dynamic batching")
    for conc, d, g in results:
        print(fmt(f"conc {conc}: JPEG straight to TorchServe", d))
        print(fmt(f"conc {conc}: gateway -> TorchServe (.npy)", g))
        print(f"conc {conc}: ratio gateway/direct throughput {g['throughput'] / d['throughput']:.2f}x, "
              f"p50 {g['p50_ms'] / d['p50_ms']:.2f}x, p95 {g['p95_ms'] / d['p95_ms']:.2f}x")
    conc, d, g = results[-1]
    print(f"target at conc {conc}: gateway >= 0.90x direct throughput -> {g['throughput'] / d['throughput']:.2f}x")


if __name__ == "__main__":
    main()
