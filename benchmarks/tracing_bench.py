"""Tracing's cost: the embedded classify path (efficientnet_lite0, ?route=embedded) through a real
`gateway serve`, with tracing off and on, in the same run.

Two gateways start as `make serve` starts one (gevent front; 1 worker each here, so the figures
are one process's), on the repo's gateway.yaml:

- off: ``OTEL_TRACES_EXPORTER=none`` (what an unset variable gives too);
- on: ``OTEL_TRACES_EXPORTER=otlp`` to a local OTLP/HTTP receiver run here (it decodes every
  export with opentelemetry-proto and counts the spans), the SDK's defaults otherwise (every
  request sampled; a batch exported every 5 s).

Then rounds of a closed loop (``--concurrency`` clients, keep-alive sessions, ``--duration`` s
each), off and on taking turns (the order alternating each round), so a busy machine weighs on
both alike. Reported per mode and concurrency: the median over rounds of p50 and images/s, the
gateway's CPU time per request (its process tree, from /proc), and the spans the receiver got
per request on. Inference costs ~50 ms of CPU a request, so on a busy machine those figures
cannot resolve a cost well under 1 ms; two more measure tracing's own work: one
``tracing.span(...)`` when off (the stage spans the service opens on every request), and one
request's spans alone (server span, 5 stage spans, an engine call's inject, their export) in CPU
time, off and on, each in a process of its own. JSON in bench_results/tracing/.

    .venv/bin/python benchmarks/tracing_bench.py            # make bench-tracing
    .venv/bin/python benchmarks/tracing_bench.py --duration 5 --rounds 2 --concurrency 1
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import timeit
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import requests
from concurrency_bench import tree_cpu_s

from gateway.tools.loadgen import sample_photos
from gateway.tools.local_gateway import LocalGateway

from common import ROOT, per_thread, run_load

MODEL = "efficientnet_lite0"
CLASSIFY = f"/v1/models/{MODEL}/classify?route=embedded"


class Receiver:
    """An OTLP/HTTP trace receiver on loopback that counts the spans it is sent."""

    def __init__(self):
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTraceServiceRequest,
            ExportTraceServiceResponse,
        )

        self.spans = self.exports = 0
        answer = ExportTraceServiceResponse().SerializeToString()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                message = ExportTraceServiceRequest.FromString(self.rfile.read(int(self.headers["Content-Length"])))
                receiver.exports += 1
                receiver.spans += sum(len(s.spans) for r in message.resource_spans for s in r.scope_spans)
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def span_cost_off_ns(n: int = 200_000) -> float:
    """ns per ``with tracing.span(...)`` with tracing off (as the service opens its stage spans)."""
    from gateway import tracing

    assert not tracing.enabled()

    def one():
        with tracing.span("decode", images=1, bytes=50_000):
            pass
    return min(timeit.repeat(one, number=n, repeat=5)) / n * 1e9


# One request's tracing work alone, no inference: the server span (gateway.tracing's WSGI layer, a
# client traceparent) around the stage spans the service opens and an engine call's inject, the
# batch processor's export to the receiver included (CPU time of the whole process, flushed).
TRACING_WORK = """
import json, sys, time
from gateway import tracing

on = tracing.setup()

def stages(environ, start_response):
    with tracing.span("body read"):
        pass
    with tracing.span("queue wait", model="efficientnet_lite0"):
        pass
    with tracing.span("decode", images=1, bytes=50_000):
        pass
    with tracing.span("preprocess", route="embedded"):
        pass
    with tracing.span("engine embedded", model="efficientnet_lite0", route="embedded", backend="embedded",
                      batch_size=1):
        tracing.inject({})
    start_response("200 OK", [("Content-Type", "application/json")])
    return [b"{}"]

app = tracing.TracingMiddleware(stages) if on else stages
environ = {"REQUEST_METHOD": "POST", "PATH_INFO": "/v1/models/efficientnet_lite0/classify",
           "CONTENT_LENGTH": "50000", "gateway.request_id": "0" * 32,
           "HTTP_TRACEPARENT": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}

def one():
    body = app(dict(environ), lambda status, headers, exc_info=None: None)
    for _ in body:
        pass
    body.close() if hasattr(body, "close") else None

n = int(sys.argv[1])
for _ in range(200):
    one()
if on:
    tracing._provider.force_flush()
best = float("inf")
for _ in range(5):
    t0 = time.process_time()
    for _ in range(n):
        one()
    if on:
        tracing._provider.force_flush()
    best = min(best, (time.process_time() - t0) / n)
print(json.dumps({"on": on, "us_per_request": best * 1e6}))
"""


def tracing_work_us(receiver_url: str, on: bool, n: int = 2000) -> float:
    """CPU µs of one request's tracing work (best of 5 x ``n``), in a process of its own."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env.update({"OTEL_TRACES_EXPORTER": "otlp" if on else "none", "OTEL_EXPORTER_OTLP_ENDPOINT": receiver_url,
                "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"})
    out = subprocess.run([sys.executable, "-c", TRACING_WORK, str(n)], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["on"] == on, result
    return result["us_per_request"]


def load(url: str, bodies: list[bytes], concurrency: int, duration: float) -> dict:
    @per_thread
    def client():
        session = requests.Session()

        def call(body: bytes) -> None:
            resp = session.post(url + CLASSIFY, data=body, headers={"Content-Type": "image/jpeg"}, timeout=60)
            if resp.status_code != 200:
                raise RuntimeError(resp.status_code)
        return call
    return run_load(client, bodies, concurrency, duration=duration, warmup=4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", default="1,4", help="clients, comma-separated (default: 1,4)")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per measurement (default: 10)")
    parser.add_argument("--rounds", type=int, default=3, help="off/on turns per concurrency (default: 3)")
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]

    photos = sample_photos()
    bodies = [photos[name] for name in sorted(photos) if name != "camera"]  # the small photos; camera is 1080p
    env_base = {"NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}
    receiver = Receiver()
    gateways: dict[str, LocalGateway] = {}
    with tempfile.TemporaryDirectory(prefix="tracing-bench-") as tmp:
        try:
            gateways["off"] = LocalGateway(ROOT / "gateway.yaml", workers=1, log_path=Path(tmp) / "off.log",
                                           env={**env_base, "OTEL_TRACES_EXPORTER": "none"})
            gateways["on"] = LocalGateway(ROOT / "gateway.yaml", workers=1, log_path=Path(tmp) / "on.log",
                                          env={**env_base, "OTEL_TRACES_EXPORTER": "otlp",
                                               "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url})
            runs: dict[str, dict[int, list[dict]]] = {"off": {c: [] for c in levels}, "on": {c: [] for c in levels}}
            spans_before = receiver.spans
            requests_on = 0
            for r in range(args.rounds):
                for c in levels:
                    for mode in (("off", "on") if r % 2 == 0 else ("on", "off")):
                        cpu0 = tree_cpu_s(gateways[mode].proc.pid)
                        result = load(gateways[mode].url, bodies, c, args.duration)
                        calls = result["requests"] + result["errors"] + 4  # + the warm-up calls
                        result["cpu_ms_per_request"] = (tree_cpu_s(gateways[mode].proc.pid) - cpu0) / calls * 1e3
                        runs[mode][c].append(result)
                        if mode == "on":
                            requests_on += calls
                        print(f"round {r + 1} c={c:<3} {mode:<3}  {result['throughput']:7.1f} img/s   "
                              f"p50 {result['p50_ms']:7.2f} ms   p95 {result['p95_ms']:7.2f} ms   "
                              f"CPU {result['cpu_ms_per_request']:6.2f} ms/request   errors {result['errors']}",
                              flush=True)
        finally:
            for gw in gateways.values():
                gw.stop()  # the traced worker exports what it still holds as it exits
    time.sleep(0.5)
    spans_on = receiver.spans - spans_before
    work = {"off": tracing_work_us(receiver.url, on=False), "on": tracing_work_us(receiver.url, on=True)}
    receiver.close()

    summary = {}
    for c in levels:
        row = {}
        for mode in ("off", "on"):
            row[mode] = {"p50_ms": statistics.median(x["p50_ms"] for x in runs[mode][c]),
                         "img_per_s": statistics.median(x["throughput"] for x in runs[mode][c]),
                         "cpu_ms_per_request": statistics.median(x["cpu_ms_per_request"] for x in runs[mode][c]),
                         "errors": sum(x["errors"] for x in runs[mode][c])}
        row["p50_delta_ms"] = row["on"]["p50_ms"] - row["off"]["p50_ms"]
        row["cpu_delta_ms"] = row["on"]["cpu_ms_per_request"] - row["off"]["cpu_ms_per_request"]
        row["img_per_s_ratio"] = row["on"]["img_per_s"] / row["off"]["img_per_s"] if row["off"]["img_per_s"] else None
        summary[c] = row
    results = {
        "machine": {"cpus": os.cpu_count(), "loadavg": Path("/proc/loadavg").read_text().split()[:3]},
        "duration_s": args.duration, "rounds": args.rounds,
        "span_off_ns": span_cost_off_ns(),
        "spans_per_request_on": spans_on / requests_on if requests_on else None,
        "tracing_work_us_per_request": work,
        "summary": {str(c): row for c, row in summary.items()},
        "runs": {mode: {str(c): v for c, v in by_c.items()} for mode, by_c in runs.items()},
    }
    out = ROOT / "bench_results" / "tracing"
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")

    print(f"\ntracing off vs on, {MODEL} ?route=embedded, 1 gevent worker, median of {args.rounds} rounds "
          f"x {args.duration:g} s (loadavg {' '.join(results['machine']['loadavg'])}, {os.cpu_count()} CPUs)")
    for c, row in summary.items():
        off, on = row["off"], row["on"]
        print(f"  c={c:<3} off: p50 {off['p50_ms']:7.2f} ms {off['img_per_s']:7.1f} img/s "
              f"{off['cpu_ms_per_request']:6.2f} CPU ms/req   on: p50 {on['p50_ms']:7.2f} ms {on['img_per_s']:7.1f} "
              f"img/s {on['cpu_ms_per_request']:6.2f} CPU ms/req   (p50 {row['p50_delta_ms']:+.2f} ms, "
              f"img/s x{row['img_per_s_ratio']:.3f}, CPU {row['cpu_delta_ms']:+.2f} ms/req)")
    print(f"  spans exported per request (on): {results['spans_per_request_on']:.2f}; "
          f"one tracing.span() when off: {results['span_off_ns']:.0f} ns")
    print(f"  one request's tracing work alone (server span + 5 stage spans + inject + export, CPU): "
          f"off {work['off']:.1f} us, on {work['on']:.1f} us")
    print(f"  -> {out / 'results.json'}")


if __name__ == "__main__":
    main()
