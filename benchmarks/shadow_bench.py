"""What a shadow route costs the client: p50/p99 with and without a shadow that takes 1 s.

A real `gateway serve` (2 workers, the gevent front) answers efficientnet_lite0 on its embedded
route; its shadow is a STAND-IN engine (tests/slow_engine.py: TorchServe's API on loopback,
answering each call after ``--delay`` seconds). The same gateway runs alternating phases,
shadow off / shadow on (100% of requests, through the admin endpoint: no restart), so load from
elsewhere on the machine falls on both alike; each phase is ``--seconds`` of ``--concurrency``
clients sending one photo per request. Printed: each phase's p50/p99, the medians over the
phases of each kind, and what the shadows did (calls, copies dropped by the full queue).

    .venv/bin/python benchmarks/shadow_bench.py [--seconds 15] [--concurrency 4] [--rounds 2]

Not a test: timings depend on the machine. README "Switching engines under live traffic" has the
figures measured here.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import requests
import yaml

from gateway.tools.local_gateway import LocalGateway

from common import ROOT, fmt, run_load

sys.path.insert(0, str(ROOT / "tests"))
from slow_engine import SlowEngine

MODEL = "efficientnet_lite0"
ADMIN = "bench-admin"


def config(engine_url: str, folder: Path) -> Path:
    base = yaml.safe_load((ROOT / "gateway.yaml").read_text())
    model = base["models"][MODEL]
    data = {
        "server": {"admin_keys": [ADMIN], "artifacts": str(ROOT / "artifacts.json"), "grpc_port": 0},
        "backends": {"embedded": {**base["backends"]["embedded"], "model_dir": str(ROOT / "onnx")},
                     "slow": {"kind": "torchserve", "url": engine_url, "management_url": engine_url,
                              "timeout_s": 30}},
        "models": {MODEL: {**{k: v for k, v in model.items() if k != "routes"},
                           "routes": [{"backend": "embedded"},
                                      {"name": "slow", "backend": "slow", "backend_model": "m"}]}},
    }
    path = folder / "gateway.shadow-bench.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def set_shadow(url: str, on: bool) -> None:
    shadows = [{"route": "slow", "fraction": 1.0, "timeout_s": 5}] if on else []
    resp = requests.put(f"{url}/v1/models/{MODEL}/traffic", json={"shadows": shadows, "by": "shadow_bench"},
                        headers={"X-Admin-Key": ADMIN}, timeout=30)
    resp.raise_for_status()


def hook_cost(calls: int = 20000) -> dict[str, float]:
    """The request path's own cost of the traffic bookkeeping, in process: microseconds per answered
    request for ``Traffic.answered`` without a shadow, and with one (sampling, the job, the queue's
    put; a queue that only counts, so no shadow runs and nothing else competes)."""
    from types import SimpleNamespace

    from gateway.config import parse_config
    from gateway.traffic import Traffic

    out = {}
    for label, shadows in (("no shadow", []), ("shadow 100%", [{"route": "triton", "fraction": 1.0}])):
        data = yaml.safe_load((ROOT / "gateway.yaml").read_text())
        data["models"][MODEL]["shadows"] = shadows
        config = parse_config(data, ROOT)
        model = config.models[MODEL]
        answer = SimpleNamespace(model=model, route=model.routes[0], results=[[{"index": 1, "score": 0.9}]],
                                 timings_ms={"total": 50.0, "inference": 30.0, "postprocess": 1.0})
        traffic = Traffic(config, state_dir=None)
        traffic.queue.submit = lambda job: True  # type: ignore[method-assign]  (counted as queued; none runs)
        t0 = time.perf_counter()
        for _ in range(calls):
            traffic.answered(None, answer, lambda r: None, lambda r, raw: None, {})
        out[label] = (time.perf_counter() - t0) / calls * 1e6
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=15.0, help="each phase's length (default 15)")
    parser.add_argument("--concurrency", type=int, default=4, help="clients at once (default 4)")
    parser.add_argument("--rounds", type=int, default=2, help="off/on pairs (default 2)")
    parser.add_argument("--delay", type=float, default=1.0, help="the shadow engine's time per call, s (default 1)")
    parser.add_argument("--workers", type=int, default=2, help="gateway worker processes (default 2)")
    args = parser.parse_args()

    cost = hook_cost()
    print("request-path cost of the traffic hook (in process): "
          + ", ".join(f"{label} {us:.1f} us" for label, us in cost.items()))
    photo = (ROOT / "tests" / "data" / "imagenet-sample").glob("*.jpg").__next__().read_bytes()
    engine = SlowEngine(args.delay)
    folder = Path(tempfile.mkdtemp(prefix="shadow-bench-"))
    gateway = LocalGateway(config(engine.url, folder), workers=args.workers, log_path=folder / "gateway.log")
    try:
        def classify(_item) -> None:
            resp = session.post(f"{gateway.url}/v1/models/{MODEL}/classify", data=photo, timeout=60)
            if resp.status_code != 200 or resp.json()["route"] != "embedded":
                raise RuntimeError(resp.text[:200])

        session = requests.Session()
        results: dict[bool, list[dict]] = {False: [], True: []}
        print(f"efficientnet_lite0 on embedded, {args.concurrency} clients, {args.seconds:g} s per phase, "
              f"{args.workers} gateway workers; shadow: a stand-in engine taking {args.delay:g} s per call")
        for _ in range(args.rounds):
            for on in (False, True):
                set_shadow(gateway.url, on)
                summary = run_load(classify, [None], args.concurrency, duration=args.seconds)
                results[on].append(summary)
                print(fmt(f"shadow {'on  (100% -> 1 s engine)' if on else 'off'}", summary)
                      + f"   p99 {summary['p99_ms']:7.2f} ms")
        set_shadow(gateway.url, False)
        for _ in range(100):  # until the copies in flight have answered and every worker wrote its stats
            time.sleep(0.5)
            traffic = requests.get(f"{gateway.url}/v1/models/{MODEL}/traffic", timeout=30).json()
            shadow = next(s for s in traffic["shadows"] if s["route"] == "slow")
            if shadow["submitted"] == shadow["calls"] + shadow["cancelled"]:
                break
        log_tail = gateway.log()
    finally:
        gateway.stop()
        engine.close()
    for on in (False, True):
        runs = results[on]
        print(f"shadow {'on ' if on else 'off'}: p50 {statistics.median(r['p50_ms'] for r in runs):7.2f} ms   "
              f"p99 {statistics.median(r['p99_ms'] for r in runs):7.2f} ms   (median over {len(runs)} phases; "
              f"{sum(r['requests'] for r in runs)} requests, {sum(r['errors'] for r in runs)} errors)")
    print(f"shadow copies: {shadow['submitted']} queued, {shadow['dropped']} dropped (queue full: "
          f"{args.workers} workers x 8 calls at once), {shadow['calls']} called, {shadow['cancelled']} cancelled "
          f"(still queued when the shadow was switched off), {shadow['errors']} errors "
          f"{shadow['errors_by_code']}; shadow latency p50 {shadow['latency_ms']['p50']} ms; top-1 agreement "
          f"{shadow['top1_agreement']} (the stand-in always answers class 282); the stand-in received {engine.calls}")
    if "Traceback" in log_tail:
        print(log_tail, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
