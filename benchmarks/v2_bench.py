"""The V2 front's cost: tritonclient straight to Triton vs the same tritonclient call through
the gateway's Open Inference Protocol front (model efficientnet_lite0, version ``triton``:
the gateway forwards the tensor to the same Triton), side by side in one run.

The same preprocessed chelsea tensor (1x3x224x224 FP32, binary data) for both, over HTTP and
gRPC; at 1 client the added p50 (requests alternating one by one, and in rounds), at 8 clients
the throughput ratio; rounds alternate direct and gateway so both see the same machine.
Targets (issue 13): <= 1 ms added p50 at 1 client, >= 0.9x throughput at 8. Over HTTP a bare
pass-through (benchmarks/passthrough.py) is timed in the same pairs: the floor of any Python
front. Starts Triton (if down), a gateway with its gRPC front and the pass-through.

    .venv/bin/python benchmarks/v2_bench.py [--requests 200] [--rounds 3] [--protocols http,grpc]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from gateway.config import load_config
from gateway.ops.servers import triton as triton_launcher
from gateway.tools.local_gateway import LocalGateway, free_port

from common import ROOT, fmt, per_thread, run_load

MODEL = "efficientnet_lite0"


def chelsea_tensor() -> np.ndarray:
    from PIL import Image
    from skimage import data

    from gateway.preprocess import preprocess_image

    spec = load_config(ROOT / "gateway.yaml").models[MODEL].preprocess
    return preprocess_image(Image.fromarray(data.chelsea()), spec)[None]


def caller(protocol: str, url: str, version: str, tensor: np.ndarray, names: tuple[str, str]):
    """A per-thread factory of one tritonclient call (its clients are not thread-safe);
    ``names``: the model's input and output tensors on that server."""
    if protocol == "http":
        import tritonclient.http as lib
    else:
        import tritonclient.grpc as lib

    def make():
        client = lib.InferenceServerClient(url)
        tensor_in = lib.InferInput(names[0], list(tensor.shape), "FP32")
        if protocol == "http":
            tensor_in.set_data_from_numpy(tensor, binary_data=True)
            outputs = [lib.InferRequestedOutput(names[1], binary_data=True)]
        else:
            tensor_in.set_data_from_numpy(tensor)
            outputs = [lib.InferRequestedOutput(names[1])]

        def call(_):
            result = client.infer(MODEL, [tensor_in], model_version=version, outputs=outputs)
            assert result.as_numpy(names[1]).shape == (1, 1000)
        return call
    return per_thread(make)


def wait_for_port(port: int, timeout: float = 30.0) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port}")


def paired(calls: dict, count: int) -> dict:
    """1 client, requests alternating direct / gateway one by one, so both see Triton in the same
    state (its own latency drifts by several ms over seconds here): p50s and the median of the
    per-pair differences."""
    for call in calls.values():
        for _ in range(8):
            call(None)
    times: dict = {side: [] for side in calls}
    for _ in range(count):
        for side, call in calls.items():
            t0 = time.perf_counter()
            call(None)
            times[side].append((time.perf_counter() - t0) * 1e3)
    diffs = [g - d for d, g in zip(times["direct"], times["gateway"])]
    out: dict = {side: {"p50_ms": statistics.median(v)} for side, v in times.items()}
    out["added_p50_ms"] = out["gateway"]["p50_ms"] - out["direct"]["p50_ms"]
    out["median_pair_difference_ms"] = statistics.median(diffs)
    line = ", ".join(f"{side} p50 {out[side]['p50_ms']:.2f} ms" for side in times)
    print(f"paired x1: {line}; gateway - direct median difference {out['median_pair_difference_ms']:+.2f} ms "
          f"({count} rounds)", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=200, help="requests per cell and round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--protocols", default="http,grpc")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "bench_results" / "v2.json"))
    args = ap.parse_args()

    config = load_config(ROOT / "gateway.yaml")
    triton_launcher.start(config)
    triton_http = config.backends["triton"].url.removeprefix("http://")
    host, port = triton_http.rsplit(":", 1)
    triton_grpc = f"{host}:{int(port) + 1}"  # gateway/ops/servers/triton.py: gRPC on the HTTP port + 1
    passthrough_port = free_port()
    passthrough = subprocess.Popen(
        [str(Path(sys.executable).parent / "gunicorn"), "-k", "gthread", "--threads", "8", "-b",
         f"127.0.0.1:{passthrough_port}", "--chdir", str(ROOT / "benchmarks"), "passthrough:app"],
        env={**os.environ, "TRITON_URL": triton_http}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    grpc_port = free_port()
    gateway = LocalGateway(ROOT / "gateway.yaml", workers=args.workers, threads=8, grpc_port=grpc_port,
                           log_path=ROOT / "run" / "v2-bench-gateway.log")
    wait_for_port(passthrough_port)
    tensor = chelsea_tensor()
    # (address, version, tensor names): Triton's own names (model_repository/efficientnet_lite0/config.pbtxt)
    # and the gateway's V2 model, forced onto its triton route
    direct_names, gateway_names = ("input__0", "output__0"), ("input", "logits")
    targets = {"http": {"direct": (triton_http, "", direct_names),
                        "passthrough": (f"127.0.0.1:{passthrough_port}", "", direct_names),
                        "gateway": (gateway.url.removeprefix("http://"), "triton", gateway_names)},
               "grpc": {"direct": (triton_grpc, "", direct_names),
                        "gateway": (f"127.0.0.1:{grpc_port}", "triton", gateway_names)}}
    results: dict = {}
    try:
        for protocol in args.protocols.split(","):
            calls = {side: caller(protocol, *target[:2], tensor, target[2])()
                     for side, target in targets[protocol].items()}
            results[f"{protocol}_x1_paired"] = paired(calls, args.requests * args.rounds)
            for clients in (1, 8):
                cell: dict = {"direct": [], "gateway": []}  # the passthrough floor is timed paired only
                for _ in range(args.rounds):
                    for side in ("direct", "gateway"):
                        url, version, names = targets[protocol][side]
                        stats = run_load(caller(protocol, url, version, tensor, names), [None], clients,
                                         total=args.requests, warmup=8)
                        cell[side].append(stats)
                        print(fmt(f"{protocol} {side} x{clients}", stats), flush=True)
                med = {side: {k: statistics.median(s[k] for s in runs) for k in ("p50_ms", "throughput")}
                       for side, runs in cell.items()}
                results[f"{protocol}_x{clients}"] = {**med, "runs": cell,
                                                     "added_p50_ms": med["gateway"]["p50_ms"] - med["direct"]["p50_ms"],
                                                     "throughput_ratio": med["gateway"]["throughput"]
                                                     / med["direct"]["throughput"]}
    finally:
        gateway.stop()
        passthrough.terminate()
    print()
    for name, r in results.items():
        if name.endswith("_paired"):
            floor = f", bare passthrough {r['passthrough']['p50_ms']:.2f} ms" if "passthrough" in r else ""
            print(f"{name:<10} p50 direct {r['direct']['p50_ms']:7.2f} ms  gateway {r['gateway']['p50_ms']:7.2f} ms  "
                  f"added {r['added_p50_ms']:+6.2f} ms (median pair difference "
                  f"{r['median_pair_difference_ms']:+.2f}){floor}")
            continue
        print(f"{name:<10} p50 direct {r['direct']['p50_ms']:7.2f} ms  gateway {r['gateway']['p50_ms']:7.2f} ms  "
              f"added {r['added_p50_ms']:+6.2f} ms   throughput direct {r['direct']['throughput']:6.1f}  "
              f"gateway {r['gateway']['throughput']:6.1f}  ratio {r['throughput_ratio']:.2f}x")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
