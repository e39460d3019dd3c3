"""Load: N concurrent clients for S seconds against a gateway; errors, p50/p99, memory over time.

Starts its own gateway on gateway.yaml (2 workers) unless --url is given, forces one route
with --backend, samples the RSS of the gateway's processes every second and reports whether
memory stayed flat (last quarter vs. second quarter of the run).

    .venv/bin/python benchmarks/load_test.py --clients 8 --duration 60 --backend embedded
    .venv/bin/python benchmarks/load_test.py --clients 8 --duration 60 --backend triton
"""
from __future__ import annotations

import argparse
import os
import threading
import time
from pathlib import Path

import requests

from gateway.tools.local_gateway import LocalGateway

from common import ROOT, per_thread, photos, run_load


def rss_mb(root_pid: int) -> float:
    """Resident memory of a process and all its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    total, stack = 0, [root_pid]
    while stack:
        pid = stack.pop()
        stack.extend(children.get(pid, []))
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--duration", type=float, default=60.0)
    ap.add_argument("--model", default="efficientnet_lite0")
    ap.add_argument("--backend", default=None, help="force one route (?backend=)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--url", default=None, help="use a running gateway instead of starting one")
    args = ap.parse_args()

    gw = None if args.url else LocalGateway(ROOT / "gateway.yaml", workers=args.workers,
                                            log_path=ROOT / "run" / "bench-gateway.log")
    url = args.url or gw.url
    params = {"backend": args.backend} if args.backend else {}

    @per_thread
    def client():
        session = requests.Session()

        def call(data: bytes):
            session.post(f"{url}/v1/models/{args.model}/classify", params=params, data=data,
                         headers={"Content-Type": "image/jpeg"}, timeout=60).raise_for_status()
        return call

    memory: list[float] = []
    running = threading.Event()
    running.set()

    def sample_memory():
        while running.is_set():
            memory.append(rss_mb(gw.proc.pid))
            time.sleep(1.0)

    sampler = threading.Thread(target=sample_memory, daemon=True)
    if gw is not None:
        sampler.start()
    try:
        s = run_load(client, list(photos().values()), concurrency=args.clients, duration=args.duration)
    finally:
        running.clear()
        if gw is not None:
            sampler.join()
            gw.stop()

    print(f"{args.clients} clients x {args.duration:.0f} s, model {args.model}, backend {args.backend or 'auto'}")
    print(f"requests {s['requests']}  errors {s['errors']}  throughput {s['throughput']:.1f} req/s  "
          f"p50 {s['p50_ms']:.1f} ms  p99 {s['p99_ms']:.1f} ms")
    if memory:
        q = max(1, len(memory) // 4)
        early, late = sum(memory[q:2 * q]) / q, sum(memory[-q:]) / q
        print(f"gateway RSS (all processes): start {memory[0]:.0f} MB, 2nd quarter {early:.0f} MB, "
              f"last quarter {late:.0f} MB, max {max(memory):.0f} MB (growth {100 * (late - early) / early:+.1f}%)")
    os._exit(0 if s["errors"] == 0 else 1)


if __name__ == "__main__":
    main()
