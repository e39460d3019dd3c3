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
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import requests

from gateway.config import ConfigError, load_config
from gateway.tasks import TASKS
from gateway.tools.loadgen import fmt, per_thread, run_load, sample_photos


def _gateway_call(url: str, model: str, route: str, verb: str):
    @per_thread
    def factory():
        session = requests.Session()

        def call(data: bytes):
            resp = session.post(f"{url}/v1/models/{model}/{verb}", params={"route": route}, data=data,
                                headers={"Content-Type": "application/octet-stream"}, timeout=120)
            resp.raise_for_status()
        return call
    return factory


def _embedded_baseline(config, route):
    """A plain onnxruntime loop through the model's own task steps (decode, preprocess, the
    task's postprocessing): what the gateway's embedded route costs over doing it by hand."""
    import onnxruntime as ort

    from gateway import tasks

    settings = config.backends[route.backend]
    path = settings.model_dir / f"{route.backend_model}.onnx"
    # The gateway's per-call resources: one intra-op thread per call unless configured (concurrent
    # callers still use every core). ORT's default, a spinning thread per core, measured ~2x slower
    # per call on a busy 2-core machine, which would flatter the gateway.
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = settings.intra_op_threads or 1
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    model = config.models[route.model]
    options = model.task.options({}, config.server.default_top_k, len(model.labels))

    def infer(data: bytes):
        photos = tasks.decode([data], [route.preprocess], config.server.max_pixels)
        raw = session.run(None, {name: tasks.prepare(photos, route.preprocess)})[0]
        return model.task.finish(raw, route, model.labels, photos, options)
    return infer


def _triton_baseline(config, route):
    import tritonclient.http as httpclient

    from gateway.preprocess import preprocess_bytes

    host = config.backends[route.backend].url.split("://", 1)[1]
    meta = requests.get(f"{config.backends[route.backend].url}/v2/models/{route.backend_model}", timeout=10).json()
    inp, out = meta["inputs"][0], meta["outputs"][0]

    @per_thread
    def factory():  # tritonclient's HTTP client is not thread-safe: one per thread
        client = httpclient.InferenceServerClient(host, connection_timeout=10, network_timeout=120)

        def call(data: bytes):
            x = preprocess_bytes(data, route.preprocess)[None]
            tensor = httpclient.InferInput(inp["name"], list(x.shape), inp["datatype"])
            tensor.set_data_from_numpy(x, binary_data=True)
            client.infer(route.backend_model, [tensor], outputs=[httpclient.InferRequestedOutput(out["name"],
                                                                                         binary_data=True)])
        return call
    return factory


def _torchserve_baseline(config, route):
    url = f"{config.backends[route.backend].url}/predictions/{route.backend_model}"
    @per_thread
    def factory():
        session = requests.Session()
        return lambda data: session.post(url, data=data, timeout=120).raise_for_status()
    return factory


BASELINES = {"embedded": _embedded_baseline, "triton": _triton_baseline, "torchserve": _torchserve_baseline}


def targets(url: str, config, model: str, baselines: bool, log,
            only: list[str] | None = None) -> list[tuple[str, str, str, Callable]]:
    """(name, kind, route name, call) for each ready route and each direct baseline that can run."""
    resp = requests.get(f"{url}/v1/models/{model}", timeout=30)
    if resp.status_code != 200:
        raise RuntimeError(f"{url}/v1/models/{model} answered {resp.status_code}: {resp.text[:300]}")
    detail = resp.json()
    task = TASKS[detail.get("task", "classification")]
    out = []
    for info in detail["routes"]:
        if only and info["name"] not in only:
            continue
        if not info["ready"]:
            log(f"skip route {info['name']}: not ready")
            continue
        out.append((f"gateway -> {info['name']}", "gateway", info["name"],
                    _gateway_call(url, model, info["name"], task.verb)))
        direct = baselines and (task.name == "classification" or info["kind"] == "embedded")
        make = BASELINES.get(info["kind"]) if direct else None
        if make is None:
            continue
        route = next((r for r in config.models[model].routes if r.name == info["name"]), None)
        if route is None:
            continue
        try:
            out.append((f"direct {info['kind']} ({route.backend_model})", "direct", info["name"], make(config, route)))
        except Exception as exc:  # a baseline that cannot start is reported, not fatal
            log(f"skip direct {info['kind']} baseline: {type(exc).__name__}: {exc}")
    return out


def run_bench(url: str, config, model: str, images: list[bytes], concurrency: list[int], requests_per: int,
              out_dir: Path, baselines: bool = True, progress: bool = True, log=print,
              duration: float | None = None, only: list[str] | None = None) -> list[dict]:
    """Each target at each concurrency: ``requests_per`` requests, or ``duration`` seconds when given."""
    from tqdm import tqdm

    plan = targets(url, config, model, baselines, log, only)
    if not plan:
        raise RuntimeError(f"no ready route for model {model!r}")
    rows = []
    total = None if duration else len(plan) * len(concurrency) * requests_per
    bar = tqdm(total=total, unit="req", disable=not progress, file=sys.stderr, dynamic_ncols=True,
               mininterval=0.1 if sys.stderr.isatty() else 5.0)
    for c in concurrency:  # targets side by side at each level, so background noise hits them alike
        for name, kind, route_name, call in plan:
            bar.set_description(f"{name} @{c}", refresh=False)
            stats = run_load(call, images, concurrency=c, total=None if duration else requests_per,
                             duration=duration, warmup=max(4, 2 * c), on_done=lambda: bar.update(1))
            rows.append({"target": name, "kind": kind, "route": route_name, "model": model, "concurrency": c, **stats})
    bar.close()
    rows.sort(key=lambda r: [p[0] for p in plan].index(r["target"]))  # stable: by target, then level
    write_results(rows, out_dir, model)
    return rows


def write_results(rows: list[dict], out_dir: Path, model: str) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "bench.json", "csv": out_dir / "bench.csv", "png": out_dir / "bench.png"}
    machine = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
               "cpus": os.cpu_count(), "python": platform.python_version()}
    paths["json"].write_text(json.dumps({"model": model, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                         "machine": machine, "results": rows}, indent=2))
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
        style = "-o" if mine[0]["kind"] == "gateway" else "--s"  # one colour per route, direct dashed
        color = f"C{list(dict.fromkeys(r['route'] for r in rows)).index(mine[0]['route']) % 10}"
        ax1.plot([r["concurrency"] for r in mine], [r["throughput"] for r in mine], style, color=color, label=name)
        ax2.plot([r["concurrency"] for r in mine], [r["p50_ms"] for r in mine], style, color=color, label=name)
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
    p.add_argument("--duration", type=float, default=None,
                   help="seconds per target and concurrency (instead of --requests)")
    p.add_argument("--routes", default=None, help="comma-separated route names (default: every ready route)")
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
        if not args.images.is_dir():
            print(f"gateway bench: --images {args.images} is not a folder", file=sys.stderr)
            return 2
        images = [p.read_bytes() for p in sorted(args.images.iterdir()) if p.is_file()]
        if not images:
            print(f"gateway bench: no files in {args.images}", file=sys.stderr)
            return 2
    else:
        images = list(sample_photos().values())
    log = lambda m: print(m, file=sys.stderr)
    gateway = None
    try:
        if args.url is None:
            from gateway.tools.local_gateway import LocalGateway

            gateway = LocalGateway(Path(args.config).resolve(), workers=args.workers,
                                   log_path=config.root / "run" / "bench-gateway.log")
        url = args.url or gateway.url  # type: ignore[union-attr]  # one of the two exists
        rows = run_bench(url, config, args.model, images, concurrency, args.requests,
                         args.out, baselines=not args.no_baselines, progress=not args.no_progress, log=log,
                         duration=args.duration, only=args.routes.split(",") if args.routes else None)
    except (RuntimeError, requests.RequestException) as exc:
        print(f"gateway bench: {exc}", file=sys.stderr)
        return 1
    finally:
        if gateway:
            gateway.stop()
    for r in rows:
        print(fmt(f"{r['target']} @{r['concurrency']}", r))
    print(f"\nresults: {args.out / 'bench.json'}, {args.out / 'bench.csv'}, {args.out / 'bench.png'}")
    return 0
