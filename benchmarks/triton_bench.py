"""Gateway -> Triton vs direct tritonclient with client-side preprocessing (Triton's image_client).

Same photos, one run, concurrency 1/4/8, each level measured direct then via the gateway back
to back so both see the same machine load. Direct: one ``tritonclient.http`` client per thread,
the JPEG decoded and preprocessed in the client (same PIL code as the gateway), binary tensors,
top-5 through Triton's classification extension, as image_client does. Gateway: the JPEG bytes
to ``POST /v1/models/<model>/classify?backend=triton``. A third line per level runs the
gateway's adapter in process (one ``TritonBackend`` shared by all threads) on preprocessed
tensors: the cost of the adapter alone, without HTTP to the gateway or image decoding.

Targets (issue 3): <= 3 ms added p50 at concurrency 1; >= 0.9x direct throughput at concurrency 8.

    .venv/bin/python benchmarks/triton_bench.py [--model efficientnet_lite0] [--requests 120]

Starts Triton (`gateway backends up triton`) unless it already runs, and a gateway (2 workers,
like `make serve`); stops what it started.
"""
from __future__ import annotations

import argparse
import threading
from urllib.parse import urlparse

import requests
import tritonclient.http as httpclient

from common import ROOT, fmt, photos, run_load
from conftest import GatewayProcess
from gateway.backends.triton import TritonBackend
from gateway.config import load_config
from gateway.preprocess import preprocess_bytes
from gateway.servers import triton as launcher


def direct_client(url: str, route, spec):
    """image_client's loop: preprocess here, binary tensor, classification extension top-5."""
    local = threading.local()
    target = urlparse(url).netloc

    def call(data: bytes):
        if not hasattr(local, "client"):
            local.client = httpclient.InferenceServerClient(target, connection_timeout=5, network_timeout=60)
        x = preprocess_bytes(data, spec)[None]
        tensor = httpclient.InferInput("input__0", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x, binary_data=True)
        out = httpclient.InferRequestedOutput("output__0", binary_data=True, class_count=5)
        result = local.client.infer(route.model, [tensor], outputs=[out])
        assert len(result.as_numpy("output__0").reshape(-1)) == 5

    return call


def gateway_client(url: str, model: str):
    local = threading.local()

    def call(data: bytes):
        if not hasattr(local, "s"):
            local.s = requests.Session()
        resp = local.s.post(f"{url}/v1/models/{model}/classify", params={"backend": "triton"}, data=data,
                            headers={"Content-Type": "image/jpeg"}, timeout=60)
        resp.raise_for_status()

    return call


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="efficientnet_lite0", choices=["efficientnet_lite0", "mobilenet_v2"])
    ap.add_argument("--requests", type=int, default=120, help="requests per measurement")
    ap.add_argument("--concurrency", default="1,4,8")
    ap.add_argument("--workers", type=int, default=2, help="gateway worker processes")
    args = ap.parse_args()

    config = load_config(ROOT / "gateway.yaml")
    route = next(r for r in config.models[args.model].routes if r.name == "triton")
    url = config.backends["triton"].url
    started = not launcher.status(config)["running"]
    if started:
        launcher.start(config, timeout=300)
    gw, adapter = None, TritonBackend(config.backends["triton"])
    try:
        gw = GatewayProcess(ROOT / "gateway.yaml", workers=args.workers, threads=4)
        items = list(photos().values())
        tensors = [preprocess_bytes(p, route.preprocess)[None] for p in items]
        direct = direct_client(url, route, route.preprocess)
        via_gateway = gateway_client(gw.url, args.model)
        in_process = lambda x: adapter.infer(route, x)  # noqa: E731
        results = []
        for conc in (int(c) for c in args.concurrency.split(",")):
            d = run_load(direct, items, concurrency=conc, total=args.requests, warmup=8)
            g = run_load(via_gateway, items, concurrency=conc, total=args.requests, warmup=8)
            a = run_load(in_process, tensors, concurrency=conc, total=args.requests, warmup=8)
            results.append((conc, d, g, a))
    finally:
        adapter.close()
        if gw is not None:
            gw.stop()
        if started:
            launcher.stop(config)

    print(f"model {args.model} (Triton model {route.model}); {len(items)} JPEG photos (up to 1920x1080); "
          f"{args.requests} requests each; gateway {args.workers} workers x 4 threads; "
          f"Triton 1 instance, dynamic batching up to 8")
    for conc, d, g, a in results:
        print(fmt(f"conc {conc}: direct tritonclient (client preproc)", d))
        print(fmt(f"conc {conc}: gateway -> Triton", g))
        print(fmt(f"conc {conc}: adapter in process (tensors)", a))
        print(f"conc {conc}: gateway/direct throughput {g['throughput'] / d['throughput']:.2f}x, "
              f"added p50 {g['p50_ms'] - d['p50_ms']:+.2f} ms, p95 {g['p95_ms'] / d['p95_ms']:.2f}x")
    first, last = results[0], results[-1]
    print(f"target at conc {first[0]}: added p50 <= 3 ms -> {first[2]['p50_ms'] - first[1]['p50_ms']:+.2f} ms")
    print(f"target at conc {last[0]}: gateway >= 0.90x direct throughput -> "
          f"{last[2]['throughput'] / last[1]['throughput']:.2f}x")
    if any(r[k]["errors"] for r in results for k in (1, 2, 3)):
        print("WARNING: some requests failed; figures above exclude them")


if __name__ == "__main__":
    main()
