"""Peers (issue 21): the same job on the servers a user would pick instead of the gateway.

Every server classifies a POSTed JPEG with the same ONNX file (onnx/efficientnet_lite0.onnx), the
gateway's own decoding and preprocessing imported from gateway/preprocess.py (the PreprocessSpec
of gateway.yaml's efficientnet_lite0) and answers the top-5 as JSON. The peers, one small app file
each in benchmarks/peers/ (what each is configured as, and why, is written at its top):
a hand-written Flask app under gunicorn (gthread), a hand-written FastAPI app under uvicorn,
LitServe, BentoML, Ray Serve, KServe's model server and MLServer, each in its own venv
run/peers/<name>/venv, created on first use from benchmarks/peers/requirements-<name>.txt (PyPI,
pinned; never torch). The gateway runs as `make serve` starts it (`gateway serve --config
gateway.yaml`, here on a free port, gRPC off), on its embedded route.

One server at a time, on a free loopback port: start, wait until it answers, check its answer on
examples/cat.jpg (top-1 must be a cat, ImageNet 281-285, else it is reported broken), warm up,
then the load generator of `gateway bench` (gateway/tools/loadgen.py) at 1, 4 and 8 clients for a
fixed time each (images/s, p50, p99, and the CPU time the server's processes spent per image),
then stop it (its whole process group, and any process it left). Two interleaved rounds: A..Z,
then Z..A. Prints a table per round and gateway / best peer at each client count (p50 at 1
client too); writes JSON and CSV to bench_results/peers/.

    .venv/bin/python benchmarks/peers_bench.py [--duration 15] [--clients 1,4,8] [--rounds 2]
        [--only gateway,flask] [--install-only]
"""
from __future__ import annotations

import argparse
import base64
import csv
import hashlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import requests

from gateway.config import load_config
from gateway.tools.loadgen import sample_photos
from gateway.tools.local_gateway import free_port

from common import ROOT, per_thread, run_load

MODEL = "efficientnet_lite0"
PEERS_DIR = ROOT / "benchmarks" / "peers"
RUN_DIR = ROOT / "run" / "peers"
OUT_DIR = ROOT / "bench_results" / "peers"
CATS = range(281, 286)  # ImageNet: tabby, tiger cat, Persian, Siamese, Egyptian cat
# never in a peer's venv: none of them needs torch, and a CUDA torch is gigabytes
FORBIDDEN = ("torch", "torchvision", "triton")
# answers that mean "up, but this request is wrong" (404 and 503 may come while a model loads)
REFUSED = (400, 405, 411, 413, 415, 422)


@dataclass(frozen=True)
class Server:
    name: str
    label: str
    path: str  # the URL the photo is POSTed to
    body: str = "raw"  # raw: the JPEG itself; b64json: {"image": "<base64>"} (LitServe parses JSON only)
    packages: tuple[str, ...] = ()  # versions reported beside numpy, pillow, onnxruntime
    start_timeout: float = 180.0


SERVERS = [  # A..Z: round 1 in this order, round 2 reversed
    Server("bentoml", "BentoML", "/classify", packages=("bentoml", "uvicorn")),
    Server("fastapi", "FastAPI + uvicorn (by hand)", "/classify", packages=("fastapi", "uvicorn")),
    Server("flask", "Flask + gunicorn (by hand)", "/classify", packages=("flask", "gunicorn")),
    Server("gateway", "gateway (embedded)", f"/v1/models/{MODEL}/classify?route=embedded",
           packages=("flask", "gunicorn", "gevent")),
    Server("kserve", "KServe model server", f"/v1/models/{MODEL}:predict", packages=("kserve", "uvicorn")),
    Server("litserve", "LitServe", "/classify", body="b64json", packages=("litserve", "uvicorn")),
    Server("mlserver", "MLServer", "/classify", packages=("mlserver", "uvicorn")),
    Server("rayserve", "Ray Serve", "/classify", packages=("ray",), start_timeout=300.0),
]


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# --- venvs ---------------------------------------------------------------------------------------

def venv_python(name: str) -> Path:
    return RUN_DIR / name / "venv" / "bin" / "python"


def requirements_digest(path: Path) -> str:
    """The requirements file and any file it includes with -r, so an edited pin reinstalls."""
    digest = hashlib.sha256()
    for line in path.read_text().splitlines():
        digest.update(line.encode())
        if line.startswith("-r "):
            digest.update(requirements_digest(path.parent / line[3:].strip()).encode())
    return digest.hexdigest()


def ensure_venv(name: str) -> str | None:
    """Create run/peers/<name>/venv from benchmarks/peers/requirements-<name>.txt once; None when
    it is ready, else why not (the peer is then reported as not installed)."""
    reqs = PEERS_DIR / f"requirements-{name}.txt"
    home = RUN_DIR / name
    stamp = home / "venv" / ".installed"
    digest = requirements_digest(reqs)
    if stamp.is_file() and stamp.read_text() == digest and venv_python(name).is_file():
        return None
    home.mkdir(parents=True, exist_ok=True)
    install_log = home / "install.log"
    log(f"{name}: creating {home / 'venv'} from {reqs.relative_to(ROOT)} (log: {install_log.relative_to(ROOT)})")
    base = getattr(sys, "_base_executable", sys.executable)
    pip = [str(venv_python(name)), "-m", "pip", "--disable-pip-version-check"]
    with open(install_log, "w") as out:
        steps = [[base, "-m", "venv", "--clear", str(home / "venv")],
                 # what pip would install, before it does: refuse anything that brings torch
                 [*pip, "install", "--dry-run", "--quiet", "--report", str(home / "resolve.json"), "-r", str(reqs)]]
        for step in steps:
            if subprocess.run(step, stdout=out, stderr=subprocess.STDOUT, timeout=1200).returncode != 0:
                return f"`{' '.join(step[-4:])}` failed: {tail(install_log)}"
        resolved = json.loads((home / "resolve.json").read_text())
        names = {item["metadata"]["name"].lower() for item in resolved.get("install", [])}
        bad = sorted(n for n in names if n in FORBIDDEN or (n.startswith("nvidia-") and "-cu" in n))
        if bad:
            return f"its requirements would install {', '.join(bad)}; refused"
        step = [*pip, "install", "--quiet", "-r", str(reqs)]
        if subprocess.run(step, stdout=out, stderr=subprocess.STDOUT, timeout=3600).returncode != 0:
            return f"pip install failed: {tail(install_log)}"
    stamp.write_text(digest)
    return None


def tail(path: Path, chars: int = 1500) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    lines = [x for x in text.splitlines() if "is ignored: it is neither a file nor a directory" not in x]
    return "\n".join(lines)[-chars:]


def versions(server: Server) -> dict:
    python = Path(sys.executable) if server.name == "gateway" else venv_python(server.name)
    wanted = [*server.packages, "numpy", "pillow", "onnxruntime"]
    code = ("import importlib.metadata as m, json, sys\n"
            "out = {}\n"
            "for p in sys.argv[1:]:\n"
            "    try: out[p] = m.version(p)\n"
            "    except m.PackageNotFoundError: out[p] = None\n"
            "print(json.dumps(out))")
    try:
        done = subprocess.run([str(python), "-c", code, *wanted], capture_output=True, text=True, timeout=60)
        return json.loads(done.stdout)
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return {}


# --- processes -----------------------------------------------------------------------------------

def process_tree(root: int) -> list[int]:
    """A process and all its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, stack = [], [root]
    while stack:
        pid = stack.pop()
        out.append(pid)
        stack.extend(children.get(pid, []))
    return out


def _stat(pid: int) -> list[str] | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def start_time(pid: int) -> str | None:
    stat = _stat(pid)
    return stat[19] if stat and len(stat) > 19 else None  # starttime, field 22 of stat


def zombie(pid: int) -> bool:
    stat = _stat(pid)
    return bool(stat) and stat[0] == "Z"


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time of these processes (their own, not reaped children's)."""
    ticks = 0
    for pid in pids:
        stat = _stat(pid)
        if stat and len(stat) > 12:
            ticks += int(stat[11]) + int(stat[12])  # utime, stime (fields 14 and 15 of stat)
    return ticks / os.sysconf("SC_CLK_TCK")


class Running:
    """One server process (in its own session, so its process group is its own)."""

    def __init__(self, server: Server, port: int, model_json: str):
        self.server, self.port = server, port
        self.url = f"http://127.0.0.1:{port}{server.path}"
        home = RUN_DIR / server.name
        home.mkdir(parents=True, exist_ok=True)
        self.log_path = home / "server.log"
        # Ray's session folder: short (its socket paths have a length limit), removed at stop
        self.ray_tmp = f"/tmp/ray-peers-{os.getpid()}-{port}"
        env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONHOME", "PYTHONPATH")}
        if server.name == "gateway":  # as `make serve` starts it, on a free port, gRPC off
            cmd = [str(Path(sys.executable).parent / "gateway"), "serve", "--config", "gateway.yaml",
                   "--host", "127.0.0.1", "--port", str(port), "--grpc-port", "0"]
            cwd = ROOT
        else:
            cmd = [str(venv_python(server.name)), str(PEERS_DIR / f"{server.name}_app.py"), str(port)]
            cwd = home
            env.update(PEER_MODEL=model_json, PYTHONPATH=str(PEERS_DIR),  # worker processes import the app too
                       RAY_USAGE_STATS_ENABLED="0", BENTOML_DO_NOT_TRACK="true", BENTOML_HOME=str(home / "bentoml"),
                       PEER_RAY_TMP=self.ray_tmp)
        with open(self.log_path, "wb") as out:  # the child keeps its own copy of the descriptor
            self.proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        self.seen: dict[int, str] = {}  # every process the server ever had: pid -> its start time

    def pids(self) -> list[int]:
        tree = process_tree(self.proc.pid)
        for pid in tree:
            started = start_time(pid)
            if started is not None:
                self.seen.setdefault(pid, started)
        return tree

    def wait_ready(self, body: bytes, headers: dict) -> dict:
        """POST the check photo until the server answers 200 (it has loaded the model); its JSON."""
        deadline = time.monotonic() + self.server.start_timeout
        last = "no answer"
        while time.monotonic() < deadline:
            self.pids()
            if self.proc.poll() is not None:
                raise RuntimeError(f"exited ({self.proc.returncode}) before answering: {tail(self.log_path)}")
            try:
                answer = requests.post(self.url, data=body, headers=headers, timeout=30)
                if answer.status_code == 200:
                    return answer.json()
                last = f"HTTP {answer.status_code}: {answer.text[:300]}"
                if answer.status_code in REFUSED:  # up, and refuses the request itself: no use waiting
                    raise RuntimeError(f"refuses the check photo: {last}")
            except (requests.RequestException, ValueError) as exc:
                last = type(exc).__name__
            time.sleep(0.5)
        raise RuntimeError(f"not answering after {self.server.start_timeout:.0f} s ({last}): {tail(self.log_path)}")

    def stop(self) -> None:
        """SIGTERM to the process group, SIGKILL to whatever of it (or of the processes it ever had)
        is left after 20 s; never anything else."""
        self.pids()
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            pass
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and self._alive():
            time.sleep(0.5)
        for pid in self._alive():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass
        shutil.rmtree(self.ray_tmp, ignore_errors=True)

    def _alive(self) -> list[int]:
        """Processes of this server still running, even those that left its session (a pid since
        reused by another process does not count: its start time differs)."""
        return [pid for pid, started in self.seen.items() if start_time(pid) == started and not zombie(pid)]


# --- one server ----------------------------------------------------------------------------------

def encode(server: Server, jpeg: bytes) -> tuple[bytes, dict]:
    if server.body == "b64json":
        return json.dumps({"image": base64.b64encode(jpeg).decode()}).encode(), {"Content-Type": "application/json"}
    return jpeg, {"Content-Type": "image/jpeg"}


def top1(answer) -> int | None:
    """The first {"index": ...} in the answer, wherever the server put its list."""
    if isinstance(answer, dict):
        if isinstance(answer.get("index"), int):
            return answer["index"]
        values = list(answer.values())
    elif isinstance(answer, list):
        values = answer
    else:
        return None
    for value in values:
        found = top1(value)
        if found is not None:
            return found
    return None


def caller(url: str, headers: dict):
    @per_thread
    def make():
        session = requests.Session()

        def call(body: bytes):
            answer = session.post(url, data=body, headers=headers, timeout=60)
            answer.raise_for_status()
        return call
    return make


def measure(server: Server, photos: list[bytes], cat: bytes, model_json: str, clients: list[int],
            duration: float, warmup: float) -> dict:
    """Start, check, warm up, load at each client count, stop. Never raises."""
    result: dict = {"server": server.name, "label": server.label, "status": "ok", "points": {}}
    running = None
    try:
        port = free_port()
        t0 = time.perf_counter()
        running = Running(server, port, model_json)
        cat_body, headers = encode(server, cat)
        answer = running.wait_ready(cat_body, headers)
        result["start_s"] = round(time.perf_counter() - t0, 1)
        result["processes"] = len(running.pids())
        index = top1(answer)
        result["check"] = {"top1": index, "answer": answer}
        if server.name == "gateway":  # its front changes over time: keep the line that names it
            banner = [x for x in tail(running.log_path, 100_000).splitlines() if x.startswith("gateway: serving")]
            result["front"] = banner[0] if banner else None
            log(str(result["front"]))
        if index not in CATS:
            result["status"] = f"broken: top-1 on examples/cat.jpg is {index}, not a cat (281-285)"
            log(f"{server.name}: {result['status']}")
            return result
        bodies = [encode(server, photo)[0] for photo in photos]
        call = caller(running.url, headers)
        warm = run_load(call, bodies, concurrency=max(clients), duration=warmup)
        log(f"{server.name}: up in {result['start_s']} s, {result['processes']} processes, cat -> {index}; "
            f"warm-up {warm['requests']} requests, {warm['errors']} errors")
        for n in clients:
            load_before = os.getloadavg()[0]
            cpu0 = cpu_seconds(running.pids())
            stats = run_load(call, bodies, concurrency=n, duration=duration)
            cpu = cpu_seconds(running.pids()) - cpu0
            stats["cpu_ms_per_image"] = 1e3 * cpu / stats["requests"] if stats["requests"] else float("nan")
            stats["loadavg_1m_before"] = load_before
            result["points"][n] = stats
            log(f"{server.name} x{n}: {stats['throughput']:6.1f} img/s  p50 {stats['p50_ms']:6.1f} ms  "
                f"p99 {stats['p99_ms']:6.1f} ms  server CPU {stats['cpu_ms_per_image']:5.1f} ms/img  "
                f"errors {stats['errors']}  (load average before: {load_before:.1f})")
        # processes of the server that ended while it served (KServe, for one, kills and respawns a
        # worker that does not answer its 5 s liveness ping, as happens while one starts on a busy machine)
        result["processes_ended"] = len(set(running.seen) - set(running.pids()))
        if result["processes_ended"]:
            log(f"{server.name}: {result['processes_ended']} of its processes ended while it served "
                f"(see {running.log_path.relative_to(ROOT)})")
    except Exception as exc:  # one broken peer must not stop the others
        result["status"] = f"broken: {type(exc).__name__}: {exc}"[:3000]
        log(f"{server.name}: {result['status']}")
    finally:
        if running is not None:
            running.stop()
    return result


# --- report --------------------------------------------------------------------------------------

def table(results: list[dict], clients: list[int]) -> list[str]:
    head = "| server | " + " | ".join(f"{n} client{'s' if n > 1 else ''}: img/s, p50 / p99 ms" for n in clients)
    lines = [head + " | CPU ms/img at " + str(max(clients)) + " |",
             "|---|" + "---:|" * (len(clients) + 1)]
    for r in results:
        if r["status"] != "ok":
            lines.append(f"| {r['label']} | {r['status'].splitlines()[0][:100]} |" + " |" * len(clients))
            continue
        cells = []
        for n in clients:
            s = r["points"].get(n)
            cells.append(f"{s['throughput']:.1f}, {s['p50_ms']:.1f} / {s['p99_ms']:.1f}"
                         + (f" ({s['errors']} errors)" if s["errors"] else "") if s else "-")
        last = r["points"].get(max(clients))
        cpu = f"{last['cpu_ms_per_image']:.1f}" if last else "-"
        lines.append(f"| {r['label']} | " + " | ".join(cells) + f" | {cpu} |")
    return lines


def ratios(rounds: list[list[dict]], clients: list[int]) -> dict:
    """gateway / best peer, images/s at each client count and p50 at the fewest clients, per round
    and on the mean of the rounds (each server's mean over the rounds it completed)."""
    def cell(by_server: dict[str, dict]) -> dict:
        gateway = by_server.get("gateway")
        peers = {k: v for k, v in by_server.items() if k != "gateway"}
        out: dict = {}
        if not gateway or not peers:
            return out
        for n in clients:
            rates = {k: v[n]["throughput"] for k, v in peers.items() if n in v}
            if n in gateway and rates:
                best = max(rates, key=rates.__getitem__)
                out[f"throughput_x{n}"] = {"gateway": gateway[n]["throughput"], "best_peer": best,
                                           "best_peer_value": rates[best],
                                           "ratio": gateway[n]["throughput"] / rates[best]}
        n = min(clients)
        p50s = {k: v[n]["p50_ms"] for k, v in peers.items() if n in v}
        if n in gateway and p50s:
            best = min(p50s, key=p50s.__getitem__)
            out[f"p50_x{n}"] = {"gateway": gateway[n]["p50_ms"], "best_peer": best, "best_peer_value": p50s[best],
                                "ratio": gateway[n]["p50_ms"] / p50s[best]}
        return out

    per_round = [cell({r["server"]: r["points"] for r in results if r["status"] == "ok"}) for results in rounds]
    merged: dict[str, dict] = {}
    for results in rounds:
        for r in results:
            if r["status"] == "ok":
                for n, s in r["points"].items():
                    merged.setdefault(r["server"], {}).setdefault(n, []).append(s)
    mean = {server: {n: {"throughput": sum(s["throughput"] for s in runs) / len(runs),
                         "p50_ms": sum(s["p50_ms"] for s in runs) / len(runs)} for n, runs in points.items()}
            for server, points in merged.items()}
    return {"rounds": per_round, "mean_of_rounds": cell(mean)}


def ratio_lines(name: str, r: dict, labels: dict[str, str]) -> list[str]:
    out = []
    for key, v in r.items():
        what = key.replace("throughput_x", "img/s at ").replace("p50_x", "p50 (lower is better) at ")
        unit = " ms" if key.startswith("p50") else ""
        out.append(f"  {name:<15} {what:<28} gateway {v['gateway']:7.1f}{unit} / best peer {v['best_peer_value']:7.1f}"
                   f"{unit} ({labels.get(v['best_peer'], v['best_peer'])}) = {v['ratio']:.2f}x")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=15.0, help="seconds of load per point (default 15)")
    ap.add_argument("--warmup", type=float, default=5.0, help="seconds of untimed load after the check (default 5)")
    ap.add_argument("--clients", default="1,4,8")
    ap.add_argument("--rounds", type=int, default=2, help="round 1 A..Z, round 2 Z..A, and so on")
    ap.add_argument("--only", default="", help="comma-separated server names (default: all)")
    ap.add_argument("--install-only", action="store_true", help="create the peers' venvs and stop")
    ap.add_argument("--out", default=str(OUT_DIR))
    args = ap.parse_args()
    # a SIGTERM to the driver unwinds like Ctrl-C, through the finally that stops the running server
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    clients = [int(x) for x in args.clients.split(",")]
    names = [s.name for s in SERVERS]
    only = [x for x in args.only.split(",") if x] or names
    unknown = sorted(set(only) - set(names))
    if unknown:
        sys.exit(f"unknown server(s) {unknown}; known: {names}")
    servers = [s for s in SERVERS if s.name in only]
    started = time.perf_counter()

    installs: dict[str, str | None] = {}
    for server in servers:
        if server.name != "gateway":
            installs[server.name] = ensure_venv(server.name)
            if installs[server.name]:
                log(f"{server.name}: not installed: {installs[server.name]}")
    install_s = time.perf_counter() - started
    log(f"venvs ready in {install_s:.0f} s")
    if args.install_only:
        return

    config = load_config(ROOT / "gateway.yaml")
    model = config.models[MODEL]
    model_json = json.dumps({"onnx": str(ROOT / "onnx" / f"{MODEL}.onnx"), "preprocess": model.preprocess.to_dict(),
                             "labels": str(ROOT / "gateway" / "data" / "imagenet_labels.txt"),
                             "output": model.output, "top_k": config.server.default_top_k,
                             "max_pixels": config.server.max_pixels})
    if not (ROOT / "onnx" / f"{MODEL}.onnx").is_file():
        sys.exit(f"onnx/{MODEL}.onnx is missing: run `make models` (or `.venv/bin/gateway models build`)")
    if model.labels_source != "imagenet":
        sys.exit(f"{MODEL} in gateway.yaml no longer uses the imagenet labels this benchmark checks against")
    photos = list(sample_photos().values())
    cat = (ROOT / "examples" / "cat.jpg").read_bytes()
    runnable = [s for s in servers if not installs.get(s.name)]
    machine = {"cores": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
               "loadavg_at_start": os.getloadavg()}
    log(f"{len(runnable)} servers, {args.rounds} rounds, clients {clients}, {args.duration:.0f} s per point; "
        f"{os.cpu_count()} cores, load average {machine['loadavg_at_start'][0]:.1f} (a shared machine: other "
        "work runs beside this benchmark, so absolute figures are noisy; compare within a round)")

    rounds: list[list[dict]] = []
    for i in range(args.rounds):
        order = runnable if i % 2 == 0 else runnable[::-1]
        log(f"round {i + 1}: {', '.join(s.name for s in order)}")
        results = [measure(s, photos, cat, model_json, clients, args.duration, args.warmup) for s in order]
        rounds.append(sorted(results, key=lambda r: names.index(r["server"])))

    labels = {s.name: s.label for s in SERVERS}
    report = ratios(rounds, clients)
    lines = [f"Peers: {MODEL}, same ONNX file and preprocessing, POST one JPEG, top-5 JSON; "
             f"{args.duration:.0f} s per point after a {args.warmup:.0f} s warm-up; {os.cpu_count()} cores shared "
             "with other work (absolute figures are noisy: compare within a round)"]
    for i, results in enumerate(rounds):
        lines += ["", f"Round {i + 1} ({'A..Z' if i % 2 == 0 else 'Z..A'}):", *table(results, clients)]
    lines += ["", "gateway / best peer (images/s: higher is better; p50: lower is better):"]
    for i, r in enumerate(report["rounds"]):
        lines += ratio_lines(f"round {i + 1}", r, labels)
    lines += ratio_lines("mean of rounds", report["mean_of_rounds"], labels)
    for name, why in installs.items():
        if why:
            lines.append(f"{labels[name]}: not installed: {why}")
    total_s = time.perf_counter() - started
    lines.append(f"\nTotal {total_s / 60:.1f} min (venvs {install_s:.0f} s)")
    print("\n" + "\n".join(lines), flush=True)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    document = {"model": MODEL, "clients": clients, "duration_s": args.duration, "warmup_s": args.warmup,
                "machine": machine, "installs": installs,
                "versions": {s.name: versions(s) for s in runnable},
                "rounds": rounds, "ratios": report, "total_s": total_s, "install_s": install_s,
                "report": lines}
    for path in (out / f"peers-{stamp}.json", out / "peers.json"):
        path.write_text(json.dumps(document, indent=2, default=str))
    for path in (out / f"peers-{stamp}.csv", out / "peers.csv"):
        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["round", "server", "status", "clients", "images_per_s", "p50_ms", "p95_ms", "p99_ms",
                             "requests", "errors", "server_cpu_ms_per_image", "loadavg_1m_before"])
            for i, results in enumerate(rounds):
                for r in results:
                    if r["status"] != "ok":
                        writer.writerow([i + 1, r["server"], r["status"][:200]] + [""] * 9)
                    for n, s in r["points"].items():
                        writer.writerow([i + 1, r["server"], r["status"][:200], n, f"{s['throughput']:.2f}",
                                         f"{s['p50_ms']:.2f}", f"{s['p95_ms']:.2f}", f"{s['p99_ms']:.2f}",
                                         s["requests"], s["errors"], f"{s['cpu_ms_per_image']:.2f}",
                                         f"{s['loadavg_1m_before']:.2f}"])
    log(f"wrote {out / 'peers.json'} and {out / 'peers.csv'} (and timestamped copies)")


if __name__ == "__main__":
    main()
