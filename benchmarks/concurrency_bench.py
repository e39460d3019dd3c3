"""Concurrency: the gateway in front of an engine that takes any number of calls at once.

A STAND-IN engine (benchmarks/standin_engine.py: TorchServe's and Triton's HTTP APIs, no
model) answers every call after a fixed delay with unlimited concurrency, the shape of a GPU
engine that batches. The gateway runs as `make serve` starts it (`gateway serve`, its own
defaults for workers and threads) on a config that extends the repo's gateway.yaml and points
the torchserve and triton backends at the stand-in engine. Then, per route (?route=torchserve,
?route=triton) and client count (64, 256; asyncio + aiohttp, one connection per client, a
warm-up, then a fixed window):

- images/s, p50/p99, errors with the stand-in engine answering after 100 ms, and with it
  answering at once (the gateway's own CPU bound, measured in the same run): the ratio
  rate(100 ms) / rate(0 ms) is the figure (target >= 0.8), with the most calls the stand-in
  engine held at once (the gateway's in-flight ceiling shows there);
- then 1,000 keep-alive connections held for ~20 s: each sends GET /healthz, one classify
  request at a random moment, and a last GET /healthz at the end; the gateway's RSS (its whole
  process tree, from /proc) before, at peak and after; errors, and connections the gateway
  closed on its own.

Everything on loopback; every process it starts is stopped (process groups). JSON in
bench_results/concurrency/.

    .venv/bin/python benchmarks/concurrency_bench.py            # make bench-concurrency
    .venv/bin/python benchmarks/concurrency_bench.py --duration 10 --clients 64
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from common import ROOT

MODEL = "efficientnet_lite0"
CLASSIFY = f"/v1/models/{MODEL}/classify"


# -- processes -------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tree(root_pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, stack = [], [root_pid]
    while stack:
        pid = stack.pop()
        out.append(pid)
        stack.extend(children.get(pid, []))
    return out


def tree_rss_mb(root_pid: int) -> float:
    """Resident memory of a process and all its descendants (VmRSS from /proc), in MB."""
    total = 0
    for pid in _tree(root_pid):
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


def tree_cpu_s(root_pid: int) -> float:
    """CPU seconds (user + system) of a process tree's live processes."""
    ticks = 0
    for pid in _tree(root_pid):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            ticks += int(fields[11]) + int(fields[12])
        except (OSError, IndexError, ValueError):
            pass
    return ticks / os.sysconf("SC_CLK_TCK")


def machine_busy() -> tuple[float, float]:
    """(busy, total) jiffies of all CPUs since boot, from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + values[4]
    return sum(values) - idle, sum(values)


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


class Proc:
    """A subprocess in its own process group, stopped with SIGTERM then SIGKILL."""

    def __init__(self, argv: list[str], log_path: Path):
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                         cwd=ROOT)
        self.pid = self.proc.pid

    def log(self, tail: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-tail:]

    def wait_http(self, url: str, timeout: float) -> None:
        import urllib.error
        import urllib.request

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.log_path.name}: exited ({self.proc.returncode}):\n{self.log()}")
            try:
                with urllib.request.urlopen(url, timeout=2) as resp:
                    if resp.status == 200:
                        return
            except (OSError, urllib.error.URLError):
                pass
            time.sleep(0.2)
        raise RuntimeError(f"{url} not up after {timeout:.0f} s:\n{self.log()}")

    def stop(self) -> None:
        if self.proc.poll() is not None:
            return
        try:
            os.killpg(self.pid, signal.SIGTERM)
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(self.pid, signal.SIGKILL)
            self.proc.wait(5)
        except ProcessLookupError:
            pass


def start_standin(log_dir: Path, delay_ms: float = 100.0) -> tuple[Proc, int, int]:
    """The stand-in engine on two free loopback ports: (process, inference port, management port)."""
    port, mport = free_port(), free_port()
    proc = Proc([sys.executable, str(ROOT / "benchmarks" / "standin_engine.py"), "--port", str(port),
                 "--management-port", str(mport), "--delay-ms", str(delay_ms)], log_dir / "standin-engine.log")
    try:
        proc.wait_http(f"http://127.0.0.1:{port}/ping", 30)
    except BaseException:
        proc.stop()
        raise
    return proc, port, mport


def write_config(folder: Path, standin: tuple[int, int] | None = None, server: dict | None = None) -> Path:
    """A config that extends the repo's gateway.yaml: the gRPC front on a free port (so that
    it cannot clash with another gateway), ``server`` keys set as given and, given the stand-in
    engine's ports, the torchserve and triton backends pointed at it."""
    lines = [f"extends: {ROOT / 'gateway.yaml'}", "server:", f"  grpc_port: {free_port()}"]
    lines += [f"  {key}: {value}" for key, value in (server or {}).items()]
    if standin:
        port, mport = standin
        lines += ["backends:",
                  "  triton:", f"    url: http://127.0.0.1:{port}",
                  "  torchserve:", f"    url: http://127.0.0.1:{port}", f"    management_url: http://127.0.0.1:{mport}"]
    path = folder / "gateway.bench.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


class Gateway(Proc):
    """`gateway serve --config FILE --host 127.0.0.1 --port P`, as `make serve` starts it (no
    --workers/--threads: the defaults a user gets)."""

    def __init__(self, config: Path, log_dir: Path, extra_args: str = "", timeout: float = 180.0):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        exe = Path(sys.executable).parent / "gateway"
        argv = [str(exe)] if exe.exists() else [sys.executable, "-m", "gateway"]
        super().__init__([*argv, "serve", "--config", str(config), "--host", "127.0.0.1", "--port", str(self.port),
                          *shlex.split(extra_args)],
                         log_dir / "gateway.log")
        try:
            self.wait_http(self.url + "/healthz", timeout)
        except BaseException:
            self.stop()
            raise

    def startup_line(self) -> str:
        """What `gateway serve` says it runs (workers x threads, or whatever the front says)."""
        lines = self.log_path.read_text(errors="replace").splitlines()
        return next((line for line in lines if line.startswith("gateway:")), lines[0] if lines else "")

    def rss_mb(self) -> float:
        return tree_rss_mb(self.pid)

    def cpu_s(self) -> float:
        return tree_cpu_s(self.pid)


def photos() -> list[bytes]:
    """scikit-image's bundled photos as JPEG (chelsea, coffee, astronaut, rocket: 300-512 px)."""
    from gateway.tools.loadgen import sample_photos

    shots = sample_photos()
    return [shots[k] for k in ("chelsea", "coffee", "astronaut", "rocket")]


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def write_results(name: str, results: dict) -> Path:
    out = ROOT / "bench_results" / name
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    path.write_text(json.dumps(results, indent=2) + "\n")
    return path


# -- closed-loop load (asyncio + aiohttp) ------------------------------------------------------
@dataclass
class Tally:
    latencies: list[float] = field(default_factory=list)  # seconds, 200 answers started in the window
    statuses: dict[str, int] = field(default_factory=dict)
    done_in_window: int = 0  # 200 answers completed inside the window
    errors: list[str] = field(default_factory=list)  # samples: exceptions and non-200 answers
    retry_after: int = 0  # 429 answers that carried Retry-After

    def count(self, key: str) -> None:
        self.statuses[key] = self.statuses.get(key, 0) + 1

    def sample(self, text: str) -> None:
        if len(self.errors) < 20 and text not in self.errors:
            self.errors.append(text[:300])


def retry_after_s(value: str | None) -> float:
    try:
        return max(0.0, float(value)) if value else 1.0
    except ValueError:
        return 1.0


async def closed_loop(url: str, bodies: list[bytes], clients: int, duration: float, warmup: float = 3.0,
                      timeout: float = 120.0) -> dict:
    """``clients`` tasks, each posting one request after another on its own keep-alive
    connection: a ``warmup`` unrecorded, then ``duration`` seconds counted. A client told 429
    waits what Retry-After says (at most 2 s) before its next request, as a polite client does.
    Requests still in flight at the end finish (within ``timeout``) but count only as answers,
    not in the rate."""
    import aiohttp

    tally = Tally()
    loop = asyncio.get_running_loop()
    t_start = loop.time()
    t_window, t_end = t_start + warmup, t_start + warmup + duration
    connector = aiohttp.TCPConnector(limit=clients, limit_per_host=clients, force_close=False)
    client_timeout = aiohttp.ClientTimeout(total=timeout)

    async def client(i: int, session) -> None:
        n = i
        while loop.time() < t_end:
            body = bodies[n % len(bodies)]
            n += 1
            t0 = loop.time()
            pause = 0.0
            try:
                async with session.post(url, data=body, headers={"Content-Type": "image/jpeg"}) as resp:
                    payload = await resp.read()
                    status = resp.status
                    if status == 429:
                        pause = min(2.0, retry_after_s(resp.headers.get("Retry-After")))
                        if t0 >= t_window and "Retry-After" in resp.headers:
                            tally.retry_after += 1
            except Exception as exc:
                if t0 >= t_window:
                    tally.count(type(exc).__name__)
                    tally.sample(f"{type(exc).__name__}: {exc}")
                await asyncio.sleep(0.1)  # a refused connection would spin
                continue
            t1 = loop.time()
            if t0 >= t_window:
                tally.count(str(status))
                if status == 200:
                    tally.latencies.append(t1 - t0)
                else:
                    tally.sample(f"{status}: {payload[:240].decode(errors='replace').strip()}")
            if status == 200 and t_window <= t1 <= t_end:
                tally.done_in_window += 1
            if pause:
                await asyncio.sleep(min(pause, max(0.0, t_end - loop.time())))

    async with aiohttp.ClientSession(connector=connector, timeout=client_timeout) as session:
        await asyncio.gather(*(client(i, session) for i in range(clients)))
    ms = [x * 1e3 for x in tally.latencies]
    ok = tally.statuses.get("200", 0)
    return {"clients": clients, "window_s": duration, "images_per_s": tally.done_in_window / duration,
            "requests": sum(tally.statuses.values()), "ok": ok, "errors": sum(tally.statuses.values()) - ok,
            "statuses": tally.statuses, "p50_ms": pct(ms, 50), "p99_ms": pct(ms, 99),
            "answers_429_with_retry_after": tally.retry_after, "error_samples": tally.errors}


# -- 1,000 keep-alive connections --------------------------------------------------------------
async def http_exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes,
                        timeout: float) -> tuple[int, dict, bytes]:
    """One HTTP/1.1 request on an open connection: (status, headers, body)."""
    writer.write(request)
    await writer.drain()
    return await asyncio.wait_for(read_response(reader), timeout)


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            key, value = line.split(":", 1)
            headers[key.strip().lower()] = value.strip()
    if headers.get("transfer-encoding", "").lower() == "chunked":
        chunks = []
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            chunk = await reader.readexactly(size + 2)
            if size == 0:
                break
            chunks.append(chunk[:-2])
        body = b"".join(chunks)
    else:
        body = await reader.readexactly(int(headers.get("content-length", "0")))
    return status, headers, body


def raw_request(method: str, path: str, port: int, body: bytes = b"", content_type: str = "image/jpeg") -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
    if body or method in ("POST", "PUT"):
        head += f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
    return (head + "\r\n").encode("latin1") + body


async def hold_connections(gw: Gateway, bodies: list[bytes], connections: int, hold_s: float, route: str,
                           classify_rate: float, gap: tuple[float, float] = (2.5, 4.5)) -> dict:
    """``connections`` keep-alive connections (opened over the first 2 s) held for ``hold_s``
    seconds, each with a slow trickle of requests: one every ``gap`` s (under gunicorn's 5 s
    keep-alive), mostly GET /healthz, classify requests among them at about ``classify_rate``
    per second over all connections (kept well under what the gateway sustains: this holds
    connections, it does not overload). A connection the gateway closed while idle is counted
    and opened again (what any HTTP client does); a request that fails is an error."""
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    path = f"{CLASSIFY}?route={route}"
    p_classify = min(1.0, classify_rate * sum(gap) / 2 / connections)
    counts = {"opened": 0, "closed_by_gateway_while_idle": 0, "connect_failed": 0}
    statuses: dict[str, int] = {}
    errors: list[str] = []
    open_now = [0]
    open_samples: list[int] = []
    rss: list[float] = []
    latencies: list[float] = []

    def count(key: str) -> None:
        statuses[key] = statuses.get(key, 0) + 1

    async def connect():
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", gw.port), 30)
        counts["opened"] += 1
        open_now[0] += 1
        return reader, writer

    def close(writer) -> None:
        open_now[0] -= 1
        writer.close()

    async def one(i: int) -> None:
        rng = random.Random(i)
        await asyncio.sleep(rng.uniform(0, 2.0))
        try:
            reader, writer = await connect()
        except (OSError, TimeoutError) as exc:
            counts["connect_failed"] += 1
            errors.append(f"connect: {type(exc).__name__}: {exc}"[:200])
            return
        try:
            while loop.time() - t0 < hold_s:
                classify = rng.random() < p_classify
                method, target, body = ("POST", path, bodies[i % len(bodies)]) if classify else ("GET", "/healthz", b"")
                if reader.at_eof() or writer.is_closing():  # the gateway closed it while idle
                    counts["closed_by_gateway_while_idle"] += 1
                    close(writer)
                    reader, writer = await connect()
                started = loop.time()
                try:
                    status, headers, _ = await http_exchange(reader, writer, raw_request(method, target, gw.port, body),
                                                             timeout=120)
                except (TimeoutError, OSError, asyncio.IncompleteReadError, ValueError, IndexError) as exc:
                    count(type(exc).__name__)
                    if len(errors) < 20:
                        errors.append(f"{method} {target}: {type(exc).__name__}: {exc}"[:200])
                    close(writer)
                    reader, writer = await connect()
                    continue
                count(f"{'classify' if classify else 'healthz'} {status}")
                if classify and status == 200:
                    latencies.append(loop.time() - started)
                if headers.get("connection", "").lower() == "close":
                    counts["closed_by_gateway_while_idle"] += 1
                    close(writer)
                    reader, writer = await connect()
                await asyncio.sleep(min(rng.uniform(*gap), max(0.0, t0 + hold_s - loop.time())))
        except (TimeoutError, OSError) as exc:
            counts["connect_failed"] += 1
            errors.append(f"reconnect: {type(exc).__name__}: {exc}"[:200])
            return
        close(writer)

    async def sample() -> None:
        while True:
            rss.append(gw.rss_mb())
            open_samples.append(open_now[0])
            await asyncio.sleep(0.5)

    before = gw.rss_mb()
    sampler = asyncio.create_task(sample())
    try:
        await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(connections))), hold_s + 180)
    finally:
        sampler.cancel()
    wall = loop.time() - t0
    await asyncio.sleep(2.0)
    after = gw.rss_mb()
    ok = sum(n for k, n in statuses.items() if k.endswith(" 200"))
    total = sum(statuses.values())
    ms = [x * 1e3 for x in latencies]
    return {"connections": connections, "hold_s": hold_s, "wall_s": wall, "requests": total, "ok": ok,
            "classify_rate_target": classify_rate, "errors": total - ok + counts["connect_failed"],
            "statuses": statuses, **counts, "most_open_at_once": max(open_samples, default=0),
            "open_at_once_median": float(np.median(open_samples)) if open_samples else 0.0,
            "classify_p50_ms": pct(ms, 50), "classify_p99_ms": pct(ms, 99),
            "rss_before_mb": before, "rss_peak_mb": max(rss, default=before), "rss_after_mb": after,
            "error_samples": errors}


# -- the benchmark -----------------------------------------------------------------------------
def set_delay(mport: int, ms: float) -> None:
    import urllib.request

    urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{mport}/standin/delay?ms={ms:g}",
                                                  method="PUT"), timeout=5).read()


def standin_stats(mport: int, reset: bool = False) -> dict:
    import urllib.request

    req = urllib.request.Request(f"http://127.0.0.1:{mport}/standin/stats" + ("/reset" if reset else ""),
                                 method="POST" if reset else "GET")
    with urllib.request.urlopen(req, timeout=5) as resp:
        return json.loads(resp.read())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", default="64,256", help="client counts (default: 64,256)")
    ap.add_argument("--routes", default="torchserve,triton", help="routes forced with ?route= (default: both)")
    ap.add_argument("--delay-ms", type=float, default=100.0, help="the stand-in engine's delay (default: 100)")
    ap.add_argument("--duration", type=float, default=20.0, help="seconds counted per point (default: 20)")
    ap.add_argument("--warmup", type=float, default=3.0, help="seconds of warm-up per point (default: 3)")
    ap.add_argument("--connections", type=int, default=1000, help="keep-alive connections held (0: skip)")
    ap.add_argument("--hold", type=float, default=20.0, help="seconds they are held (default: 20)")
    ap.add_argument("--hold-classify-rate", type=float, default=10.0,
                    help="classify requests/s over the held connections (default: 10)")
    ap.add_argument("--gateway-args", default="", help="more `gateway serve` arguments, for comparisons "
                                                       "(default: none, as `make serve`)")
    args = ap.parse_args()
    client_counts = [int(c) for c in args.clients.split(",")]
    routes = args.routes.split(",")

    started = time.time()
    results: dict = {"benchmark": "concurrency", "engine": "stand-in engine (benchmarks/standin_engine.py)",
                     "delay_ms": args.delay_ms, "duration_s": args.duration, "warmup_s": args.warmup,
                     "gateway_args": args.gateway_args, "loadavg_start": loadavg(), "points": [], "ratios": []}
    bodies = photos()
    with tempfile.TemporaryDirectory(prefix="bench-concurrency-") as tmp:
        log_dir = ROOT / "bench_results" / "concurrency"
        standin = gw = None
        try:
            standin, port, mport = start_standin(log_dir, args.delay_ms)
            gw = Gateway(write_config(Path(tmp), (port, mport)), log_dir, args.gateway_args)
            results["front"] = gw.startup_line()
            print(results["front"])
            print(f"stand-in engine: pid {standin.pid}, delay {args.delay_ms:g} ms; gateway pid {gw.pid}, "
                  f"RSS {gw.rss_mb():.0f} MB; load average {loadavg()}")
            for clients in client_counts:
                for route in routes:
                    url = f"{gw.url}{CLASSIFY}?route={route}"
                    by_delay = {}
                    for delay in (0.0, args.delay_ms):
                        set_delay(mport, delay)
                        standin_stats(mport, reset=True)
                        cpu0, (busy0, all0) = gw.cpu_s(), machine_busy()
                        point = asyncio.run(closed_loop(url, bodies, clients, args.duration, args.warmup))
                        busy1, all1 = machine_busy()
                        engine = standin_stats(mport)
                        point.update(route=route, delay_ms=delay, engine_calls=engine["calls"],
                                     engine_max_in_flight=engine["max_in_flight"],
                                     gateway_cpu_s=gw.cpu_s() - cpu0, machine_busy=(busy1 - busy0) / (all1 - all0),
                                     loadavg=loadavg(), rss_mb=gw.rss_mb())
                        results["points"].append(point)
                        by_delay[delay] = point
                        print(f"  {route:<10} {clients:>4} clients  engine {delay:>5g} ms: "
                              f"{point['images_per_s']:7.1f} img/s  p50 {point['p50_ms']:7.0f} ms  "
                              f"p99 {point['p99_ms']:7.0f} ms  errors {point['errors']}  "
                              f"engine held <= {engine['max_in_flight']} at once  machine CPU "
                              f"{100 * point['machine_busy']:.0f}%", flush=True)
                    bound = by_delay[0.0]["images_per_s"]
                    ratio = by_delay[args.delay_ms]["images_per_s"] / bound if bound else float("nan")
                    results["ratios"].append({"route": route, "clients": clients, "ratio": ratio,
                                              "rate_delayed": by_delay[args.delay_ms]["images_per_s"],
                                              "rate_cpu_bound": bound})
            if args.connections:
                set_delay(mport, args.delay_ms)
                print(f"holding {args.connections} keep-alive connections for {args.hold:g} s ...", flush=True)
                results["hold"] = asyncio.run(hold_connections(gw, bodies, args.connections, args.hold, routes[0],
                                                               args.hold_classify_rate))
        finally:
            for proc in (gw, standin):
                if proc is not None:
                    proc.stop()
    results["loadavg_end"] = loadavg()
    results["wall_s"] = time.time() - started
    path = write_results("concurrency", results)
    report(results)
    print(f"JSON: {path.relative_to(ROOT)}  ({results['wall_s']:.0f} s)")


def report(results: dict) -> None:
    print(f"\nfront: {results.get('front', '?')}")
    print(f"load average: {results['loadavg_start']} at start, {results['loadavg_end']} at end")
    print("\n| route | clients | engine delay | img/s | p50 ms | p99 ms | errors | engine held at once |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for p in results["points"]:
        print(f"| {p['route']} | {p['clients']} | {p['delay_ms']:g} ms | {p['images_per_s']:.1f} | {p['p50_ms']:.0f} | "
              f"{p['p99_ms']:.0f} | {p['errors']} | {p['engine_max_in_flight']} |")
    print(f"\n| route | clients | rate({results['delay_ms']:g} ms) / rate(0 ms) | target |")
    print("|---|---:|---:|---|")
    for r in results["ratios"]:
        mark = "met" if r["ratio"] >= 0.8 else "not met"
        print(f"| {r['route']} | {r['clients']} | {r['ratio']:.2f} ({r['rate_delayed']:.1f} / "
              f"{r['rate_cpu_bound']:.1f}) | >= 0.8 ({mark}) |")
    hold = results.get("hold")
    if hold:
        growth = hold["rss_after_mb"] - hold["rss_before_mb"]
        print(f"\n| {hold['connections']} keep-alive connections held {hold['hold_s']:g} s | measured | target |")
        print("|---|---|---|")
        print(f"| requests (GET /healthz every 2.5-4.5 s, classify ~{hold['classify_rate_target']:g}/s) | "
              f"{hold['requests']}: {hold['statuses']} | |")
        print(f"| errors (failed requests, failed connects) | {hold['errors']} | 0 "
              f"({'met' if hold['errors'] == 0 else 'not met'}) |")
        print(f"| connections open at once (most / median) | {hold['most_open_at_once']} / "
              f"{hold['open_at_once_median']:.0f}; closed by the gateway while idle "
              f"{hold['closed_by_gateway_while_idle']} (reopened) | {hold['connections']} |")
        print(f"| classify p50 / p99 | {hold['classify_p50_ms']:.0f} / {hold['classify_p99_ms']:.0f} ms | |")
        print(f"| gateway RSS | {hold['rss_before_mb']:.0f} MB before, {hold['rss_peak_mb']:.0f} MB peak, "
              f"{hold['rss_after_mb']:.0f} MB after ({growth:+.0f} MB) | bounded |")
        for line in hold["error_samples"][:5]:
            print(f"  error: {line}")
    seen: dict[str, list[str]] = {}  # each distinct error once, with where it came
    for p in results["points"]:
        for line in p["error_samples"]:
            where = seen.setdefault(re.sub(r',?"request_id":"[^"]*"', "", line), [])
            if f"{p['route']}/{p['clients']}/{p['delay_ms']:g}ms" not in where:
                where.append(f"{p['route']}/{p['clients']}/{p['delay_ms']:g}ms")
    for line, where in list(seen.items())[:6]:
        print(f"  error ({', '.join(where)}): {line}")


if __name__ == "__main__":
    main()
