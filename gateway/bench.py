"""`gateway bench`: every reachable route of a model, plus direct-to-backend baselines, on the
same images - warm-up, a concurrency sweep, p50/p95/p99, images/s, errors - written as JSON,
CSV and a PNG chart.

Baselines bypass the gateway: an in-process onnxruntime loop (embedded), tritonclient with
client-side preprocessing (Triton, as its image_client does), and JPEGs straight to
TorchServe's own handler. Absolute figures depend on the machine; compare ratios.
"""
from __future__ import annotations

import csv
import json
import sys
import time
from pathlib import Path

import requests

from gateway.config import ConfigError, load_config
from gateway.loadgen import fmt, per_thread, run_load, sample_photos


def _gateway_call(url: str, model: str, route: str):
    @per_thread
    def factory():
        session = requests.Session()

        def call(data: bytes):
            resp = session.post(f"{url}/v1/models/{model}/classify", params={"backend": route}, data=data,
                                headers={"Content-Type": "application/octet-stream"}, timeout=120)
            resp.raise_for_status()
        return call
    return factory


def _embedded_baseline(config, route):
    import onnxruntime as ort

    from gateway.preprocess import preprocess_bytes

    path = config.path(config.backends[route.backend].options["model_dir"]) / f"{route.model}.onnx"
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda data: session.run(None, {name: preprocess_bytes(data, route.preprocess)[None]})


def _triton_baseline(config, route):
    import tritonclient.http as httpclient

    from gateway.preprocess import preprocess_bytes

    host = config.backends[route.backend].url.split("://", 1)[1]
    meta = requests.get(f"{config.backends[route.backend].url}/v2/models/{route.model}", timeout=10).json()
    inp, out = meta["inputs"][0], meta["outputs"][0]

    @per_thread
    def factory():  # tritonclient's HTTP client is not thread-safe: one per thread
        client = httpclient.InferenceServerClient(host, connection_timeout=10, network_timeout=120)

        def call(data: bytes):
            x = preprocess_bytes(data, route.preprocess)[None]
            tensor = httpclient.InferInput(inp["name"], list(x.shape), inp["datatype"])
            tensor.set_data_from_numpy(x, binary_data=True)
            client.infer(route.model, [tensor], outputs=[httpclient.InferRequestedOutput(out["name"],
                                                                                         binary_data=True)])
        return call
    return factory


def _torchserve_baseline(config, route):
    url = f"{config.backends[route.backend].url}/predictions/{route.model}"
    @per_thread
    def factory():
        session = requests.Session()
        return lambda data: session.post(url, data=data, timeout=120).raise_for_status()
    return factory


BASELINES = {"embedded": _embedded_baseline, "triton": _triton_baseline, "torchserve": _torchserve_baseline}


def targets(url: str, config, model: str, baselines: bool, log) -> list[tuple[str, str, object]]:
    """(name, kind, call) for each ready route and each direct baseline that can run."""
    detail = requests.get(f"{url}/v1/models/{model}", timeout=30).json()
    out = []
    for info in detail["routes"]:
        if not info["ready"]:
            log(f"skip route {info['name']}: not ready")
            continue
        out.append((f"gateway -> {info['name']}", "gateway", _gateway_call(url, model, info["name"])))
        make = BASELINES.get(info["kind"]) if baselines else None
        if make is None:
            continue
        route = next((r for r in config.models[model].routes if r.name == info["name"]), None)
        if route is None:
            continue
        try:
            out.append((f"direct {info['kind']} ({route.model})", "direct", make(config, route)))
        except Exception as exc:  # a baseline that cannot start is reported, not fatal
            log(f"skip direct {info['kind']} baseline: {type(exc).__name__}: {exc}")
    return out


def run_bench(url: str, config, model: str, images: list[bytes], concurrency: list[int], requests_per: int,
              out_dir: Path, baselines: bool = True, progress: bool = True, log=print) -> list[dict]:
    from tqdm import tqdm

    plan = targets(url, config, model, baselines, log)
    if not plan:
        raise RuntimeError(f"no ready route for model {model!r}")
    rows = []
    bar = tqdm(total=len(plan) * len(concurrency) * requests_per, unit="req", disable=not progress,
               file=sys.stderr, dynamic_ncols=True)
    for name, kind, call in plan:
        for c in concurrency:
            stats = run_load(call, images, concurrency=c, total=requests_per, warmup=min(4, requests_per),
                             on_done=lambda: bar.update(1))
            rows.append({"target": name, "kind": kind, "model": model, "concurrency": c, **stats})
    bar.close()
    write_results(rows, out_dir, model)
    return rows


def write_results(rows: list[dict], out_dir: Path, model: str) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "bench.json", "csv": out_dir / "bench.csv", "png": out_dir / "bench.png"}
    paths["json"].write_text(json.dumps({"model": model, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                         "results": rows}, indent=2))
    with open(paths["csv"], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    _chart(rows, paths["png"], model)
    return paths


def _chart(rows: list[dict], path: Path, model: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name in dict.fromkeys(r["target"] for r in rows):
        mine = [r for r in rows if r["target"] == name]
        style = "-o" if mine[0]["kind"] == "gateway" else "--s"
        ax1.plot([r["concurrency"] for r in mine], [r["throughput"] for r in mine], style, label=name)
        ax2.plot([r["concurrency"] for r in mine], [r["p50_ms"] for r in mine], style, label=name)
    ax1.set(title=f"{model}: throughput", xlabel="concurrent clients", ylabel="images/s")
    ax2.set(title=f"{model}: median latency", xlabel="concurrent clients", ylabel="p50 (ms)")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    ax1.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(rows: list[dict]) -> str:
    lines = ["| target | conc. | images/s | p50 ms | p95 ms | p99 ms | errors |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['target']} | {r['concurrency']} | {r['throughput']:.1f} | {r['p50_ms']:.1f} | "
                     f"{r['p95_ms']:.1f} | {r['p99_ms']:.1f} | {r['errors']} |")
    return "\n".join(lines)


def register(subparsers) -> None:
    p = subparsers.add_parser("bench", help="compare every reachable backend of a model (+ direct baselines)")
    p.add_argument("--model", default="efficientnet_lite0")
    p.add_argument("--url", default=None, help="a running gateway (default: start one on --config)")
    p.add_argument("--config", default="gateway.yaml", help="gateway config (routes, baselines' settings)")
    p.add_argument("--images", type=Path, default=None, help="folder of images (default: bundled photos)")
    p.add_argument("--concurrency", default="1,4,8", help="comma-separated client counts (default 1,4,8)")
    p.add_argument("--requests", type=int, default=100, help="requests per target and concurrency")
    p.add_argument("--workers", type=int, default=2, help="workers of the gateway it starts")
    p.add_argument("--out", type=Path, default=Path("bench_results"))
    p.add_argument("--no-baselines", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=bench_command)


def bench_command(args) -> int:
    try:
        config = load_config(args.config)
        concurrency = [int(c) for c in args.concurrency.split(",") if c.strip()]
    except (ConfigError, ValueError) as exc:
        print(f"gateway bench: {exc}", file=sys.stderr)
        return 2
    if args.images:
        images = [p.read_bytes() for p in sorted(args.images.iterdir()) if p.is_file()]
    else:
        images = list(sample_photos().values())
    log = lambda m: print(m, file=sys.stderr)  # noqa: E731
    gateway = None
    if args.url is None:
        from gateway.servers.local_gateway import LocalGateway

        gateway = LocalGateway(Path(args.config).resolve(), workers=args.workers,
                               log_path=config.root / "run" / "bench-gateway.log")
    try:
        rows = run_bench(args.url or gateway.url, config, args.model, images, concurrency, args.requests,
                         args.out, baselines=not args.no_baselines, progress=not args.no_progress, log=log)
    except RuntimeError as exc:
        print(f"gateway bench: {exc}", file=sys.stderr)
        return 1
    finally:
        if gateway:
            gateway.stop()
    for r in rows:
        print(fmt(f"{r['target']} @{r['concurrency']}", r))
    print(f"\nresults: {args.out / 'bench.json'}, {args.out / 'bench.csv'}, {args.out / 'bench.png'}")
    return 0
