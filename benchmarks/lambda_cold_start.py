"""Lambda cold start, each run a fresh process: init (imports, then build_app: config, Flask app
and ONNX Runtime sessions) and the first request (chelsea, an HTTP API 2.0 event), then the
median of 5 warm ones. "process" is the whole child's wall time, interpreter start included.

Two ways side by side: the unpacked zip in a bare interpreter (python -I -S: only the bundle
on sys.path, the bundle's onnxruntime 1.16 / numpy 1.26 - what Lambda runs) and the project's
venv. Target (issue 15): init <= 2 s on this machine. Medians of --runs processes.

Usage: .venv/bin/python benchmarks/lambda_cold_start.py [--runs 5]
(builds the bundle into build/lambda/ first, as `gateway package lambda` does)
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from gateway.ops import lambda_package as package
from gateway.tools.loadgen import sample_photos

from common import ROOT

sys.path.insert(0, str(ROOT / "tests"))  # the Lambda tests' event builders (AWS's documented shapes), shared
from lambda_events import Request, http_v2

CHILD = """
import time
t0 = time.perf_counter()
import json, os, resource
import apig_wsgi, gateway.app, onnxruntime
t1 = time.perf_counter()
from gateway.serverless import lambda_handler
lambda_handler.init()
t2 = time.perf_counter()
event = json.load(open(os.environ["EVENT"]))
first = lambda_handler.handler(event, None)
t3 = time.perf_counter()
warm = []
for _ in range(5):
    t = time.perf_counter()
    lambda_handler.handler(event, None)
    warm.append(time.perf_counter() - t)
warm.sort()
body = json.loads(first["body"])
print(json.dumps({"imports": t1 - t0, "build_app": t2 - t1, "init": t2 - t0, "first": t3 - t2, "warm": warm[2],
                  "status": first["statusCode"], "top1": body["results"][0]["predictions"][0]["label"],
                  "onnxruntime": onnxruntime.__version__,
                  "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def run_once(mode: str, folder: Path, env: dict) -> dict:
    started = time.perf_counter()
    if mode == "zip":
        done = package.run_bare(folder, CHILD, env=env)
    else:
        clean = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
        done = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True,
                              env={**clean, **env}, cwd=ROOT, timeout=120)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{mode}: {done.stderr[-2000:]}")
    result = json.loads(done.stdout.splitlines()[-1])
    result["process"] = wall
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--out", type=Path, default=ROOT / "build" / "lambda")
    args = ap.parse_args()

    t0 = time.perf_counter()
    bundle = package.build(args.out, log=lambda line: None)
    mib = package.MIB
    print(f"bundle built in {time.perf_counter() - t0:.1f} s: unzipped {bundle.unzipped_bytes / mib:.1f} MiB "
          f"(limit {package.UNZIPPED_LIMIT / mib:.0f} MiB), zip {bundle.zip_bytes / mib:.1f} MiB")

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "var-task"
        with zipfile.ZipFile(bundle.zip_path) as zf:
            zf.extractall(folder)
        event_file = Path(tmp) / "event.json"
        event_file.write_text(json.dumps(http_v2(Request("POST", "/v1/classify", sample_photos()["chelsea"],
                                                         "image/jpeg"))))
        env = {"EVENT": str(event_file)}
        results: dict[str, list[dict]] = {"zip": [], "venv": []}
        for _ in range(args.runs):  # interleaved, so both see the same machine load
            for mode in results:
                results[mode].append(run_once(mode, folder, env))

    print(f"{platform.machine()} {os.cpu_count()} cores, Python {platform.python_version()}, "
          f"median of {args.runs} fresh processes each (seconds; RSS in MB)")
    keys = ("imports", "build_app", "init", "first", "warm", "process", "max_rss_mb")
    print(f"{'':28}" + "".join(f"{k:>11}" for k in keys))
    for mode, runs in results.items():
        label = f"{mode} (onnxruntime {runs[0]['onnxruntime']})"
        print(f"{label:28}" + "".join(f"{statistics.median(r[k] for r in runs):>11.3f}" for k in keys))
        assert all(r["status"] == 200 for r in runs), runs
    print(f"top-1 (zip): {results['zip'][0]['top1']}")
    init = statistics.median(r["init"] for r in results["zip"])
    print(f"init from the zip: {init:.2f} s (target <= 2 s: {'met' if init <= 2 else 'MISSED'})")


if __name__ == "__main__":
    main()
