"""Overload: the embedded route (efficientnet_lite0, ?route=embedded) offered 4x what it sustains.

The gateway runs as `make serve` starts it (`gateway serve`, its own defaults), on a config
that extends the repo's gateway.yaml (only the gRPC front moved to a free port). Then:

1. the unloaded p99: one client, one request after another;
2. the sustainable rate: a closed loop with enough clients to saturate it (default 16);
3. an open loop at 4x that rate for 30 s: requests fired on a fixed schedule whatever the
   answers, over an unbounded pool of keep-alive connections (a connection per request in
   flight), bounded in count (rate x duration) and in time (each request gives up after 90 s).

Reported: accepted (200) requests' p50/p99 against the unloaded p99 (target: within 2x);
how many were refused with 429, how fast (p50/p99) and whether each carried Retry-After;
nothing lost (every request sent got exactly one answer: counts by status, and any request
that got none: reset, timed out, never connected); the gateway's RSS (its process tree, from
/proc) before, at peak and after. Loopback only; every process it starts is stopped. JSON in
bench_results/overload/.

    .venv/bin/python benchmarks/overload_bench.py            # make bench-overload
    .venv/bin/python benchmarks/overload_bench.py --duration 10 --factor 4
    .venv/bin/python benchmarks/overload_bench.py --cpu-max-wait-ms 25   # shed sooner: a tighter p99
"""
from __future__ import annotations

import argparse
import asyncio
import resource
import tempfile
import time
from pathlib import Path

from concurrency_bench import (
    CLASSIFY,
    ROOT,
    Gateway,
    closed_loop,
    loadavg,
    machine_busy,
    pct,
    photos,
    write_config,
    write_results,
)

ROUTE = "embedded"


async def open_loop(gw: Gateway, bodies: list[bytes], rate: float, duration: float, max_outstanding: int,
                    timeout: float) -> dict:
    """``rate`` x ``duration`` requests on a fixed schedule, each answered or given up after
    ``timeout`` s; at most ``max_outstanding`` in flight (beyond: counted as not sent)."""
    import aiohttp

    url = f"{gw.url}{CLASSIFY}?route={ROUTE}"
    total = int(rate * duration)
    loop = asyncio.get_running_loop()
    records: list[tuple] = []  # (status or exception name, latency s, retry_after present, send lag s)
    outstanding = [0, 0]  # now, most
    not_sent = [0]
    rss: list[float] = []
    samples: list[str] = []

    async def fire(i: int, scheduled: float, session) -> None:
        t0 = loop.time()
        try:
            async with session.post(url, data=bodies[i % len(bodies)], headers={"Content-Type": "image/jpeg"}) as resp:
                payload = await resp.read()
                result = str(resp.status)
                retry = "Retry-After" in resp.headers
                if resp.status not in (200, 429) and len(samples) < 10:
                    samples.append(f"{resp.status}: {payload[:200].decode(errors='replace')}")
                if resp.status == 429 and len(samples) < 10 and not any(s.startswith("429") for s in samples):
                    samples.append(f"429 (Retry-After {resp.headers.get('Retry-After')}): "
                                   f"{payload[:200].decode(errors='replace')}")
        except Exception as exc:
            result, retry = type(exc).__name__, False
            if len(samples) < 10:
                samples.append(f"{result}: {exc}"[:200])
        finally:
            outstanding[0] -= 1
        records.append((result, loop.time() - t0, retry, t0 - scheduled))

    async def sample_rss() -> None:
        while True:
            rss.append(gw.rss_mb())
            await asyncio.sleep(0.5)

    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    tasks = []
    sampler = asyncio.create_task(sample_rss())
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=timeout)) as session:
        t0 = loop.time()
        for i in range(total):
            scheduled = t0 + i / rate
            delay = scheduled - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            if outstanding[0] >= max_outstanding:
                not_sent[0] += 1
                continue
            outstanding[0] += 1
            outstanding[1] = max(outstanding[1], outstanding[0])
            tasks.append(asyncio.create_task(fire(i, scheduled, session)))
        send_wall = loop.time() - t0
        # every request has its own timeout: this wait is bounded by it
        await asyncio.gather(*tasks, return_exceptions=True)
        drain_wall = loop.time() - t0
    sampler.cancel()
    return {"records": records, "offered": total, "not_sent": not_sent[0], "most_outstanding": outstanding[1],
            "send_wall_s": send_wall, "wall_s": drain_wall, "rss_samples": rss, "samples": samples}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--factor", type=float, default=4.0, help="offered load / sustainable rate (default: 4)")
    ap.add_argument("--duration", type=float, default=30.0, help="seconds of open-loop load (default: 30)")
    ap.add_argument("--saturate-clients", type=int, default=16, help="closed-loop clients for the sustainable rate")
    ap.add_argument("--measure", type=float, default=15.0, help="seconds of each closed-loop measurement")
    ap.add_argument("--max-outstanding", type=int, default=8000, help="requests in flight at most (client side)")
    ap.add_argument("--timeout", type=float, default=90.0, help="a request gives up after this many seconds")
    ap.add_argument("--cpu-max-wait-ms", type=int, default=None,
                    help="server.cpu_max_wait_ms for this run (default: gateway.yaml's, as `make serve`): "
                         "the wait for the CPU beyond which a request is refused with 429")
    ap.add_argument("--gateway-args", default="", help="more `gateway serve` arguments, for comparisons "
                                                       "(default: none, as `make serve`)")
    args = ap.parse_args()

    started = time.time()
    results: dict = {"benchmark": "overload", "route": ROUTE, "gateway_args": args.gateway_args,
                     "cpu_max_wait_ms": args.cpu_max_wait_ms,
                     "loadavg_start": loadavg()}
    bodies = photos()
    with tempfile.TemporaryDirectory(prefix="bench-overload-") as tmp:
        gw = None
        try:
            server = {} if args.cpu_max_wait_ms is None else {"cpu_max_wait_ms": args.cpu_max_wait_ms}
            gw = Gateway(write_config(Path(tmp), server=server), ROOT / "bench_results" / "overload", args.gateway_args)
            results["front"] = gw.startup_line()
            print(results["front"])
            url = f"{gw.url}{CLASSIFY}?route={ROUTE}"
            asyncio.run(closed_loop(url, bodies, 4, 3.0, warmup=0.0))  # warm the sessions
            unloaded = asyncio.run(closed_loop(url, bodies, 1, args.measure, warmup=1.0))
            print(f"unloaded (1 client): {unloaded['images_per_s']:.1f} img/s, p50 {unloaded['p50_ms']:.0f} ms, "
                  f"p99 {unloaded['p99_ms']:.0f} ms, errors {unloaded['errors']}", flush=True)
            saturated = asyncio.run(closed_loop(url, bodies, args.saturate_clients, args.measure, warmup=2.0))
            rate = saturated["images_per_s"]
            print(f"sustainable ({args.saturate_clients} clients, closed loop): {rate:.1f} img/s, "
                  f"p50 {saturated['p50_ms']:.0f} ms, p99 {saturated['p99_ms']:.0f} ms, "
                  f"statuses {saturated['statuses']}", flush=True)
            if rate <= 0:
                raise SystemExit("the gateway sustained no rate at all: nothing to overload")
            offered = args.factor * rate
            rss_before = gw.rss_mb()
            print(f"open loop: {offered:.0f} requests/s for {args.duration:g} s "
                  f"({int(offered * args.duration)} requests) ...", flush=True)
            cpu0, own0, (busy0, all0) = gw.cpu_s(), client_cpu_s(), machine_busy()
            run = asyncio.run(open_loop(gw, bodies, offered, args.duration, args.max_outstanding, args.timeout))
            busy1, all1 = machine_busy()
            run.update(gateway_cpu_s=gw.cpu_s() - cpu0, client_cpu_s=client_cpu_s() - own0,
                       machine_busy=(busy1 - busy0) / (all1 - all0))
            time.sleep(2.0)
            rss_after = gw.rss_mb()
            results.update(unloaded=unloaded, saturated=saturated,
                           open_loop=summarize(run, offered, args, rss_before, rss_after))
        finally:
            if gw is not None:
                gw.stop()
    results["loadavg_end"] = loadavg()
    results["wall_s"] = time.time() - started
    path = write_results("overload", results)
    report(results)
    print(f"JSON: {path.relative_to(ROOT)}  ({results['wall_s']:.0f} s)")


def client_cpu_s() -> float:
    """CPU seconds this process (the load generator) has used."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def summarize(run: dict, offered: float, args, rss_before: float, rss_after: float) -> dict:
    records = run["records"]
    by_status: dict[str, int] = {}
    for result, *_ in records:
        by_status[result] = by_status.get(result, 0) + 1
    ok_ms = [lat * 1e3 for result, lat, _, _ in records if result == "200"]
    refused = [(lat * 1e3, retry) for result, lat, retry, _ in records if result == "429"]
    lags = [lag * 1e3 for *_, lag in records]
    answered = sum(n for k, n in by_status.items() if k.isdigit())
    sent = len(records)
    return {
        "offered_per_s": offered, "duration_s": args.duration, "offered": run["offered"], "sent": sent,
        "not_sent_client_cap": run["not_sent"], "answered": answered, "no_answer": sent - answered,
        "by_status": by_status, "most_outstanding": run["most_outstanding"],
        "send_wall_s": run["send_wall_s"], "wall_s": run["wall_s"],
        "send_lag_p99_ms": pct(lags, 99),
        "accepted": len(ok_ms), "accepted_per_s": len(ok_ms) / run["wall_s"] if run["wall_s"] else 0.0,
        "accepted_p50_ms": pct(ok_ms, 50), "accepted_p99_ms": pct(ok_ms, 99),
        "refused_429": len(refused), "refused_p50_ms": pct([r[0] for r in refused], 50),
        "refused_p99_ms": pct([r[0] for r in refused], 99),
        "refused_with_retry_after": sum(1 for _, retry in refused if retry),
        "rss_before_mb": rss_before, "rss_peak_mb": max(run["rss_samples"], default=rss_before),
        "rss_after_mb": rss_after, "samples": run["samples"],
        "gateway_cpu_s": run["gateway_cpu_s"], "client_cpu_s": run["client_cpu_s"], "machine_busy": run["machine_busy"],
    }


def report(results: dict) -> None:
    u, s, o = results["unloaded"], results["saturated"], results["open_loop"]
    ratio = o["accepted_p99_ms"] / u["p99_ms"] if u["p99_ms"] else float("nan")
    lost = o["no_answer"] + o["not_sent_client_cap"]
    print(f"\nfront: {results['front']}")
    if results.get("cpu_max_wait_ms") is not None:
        print(f"server.cpu_max_wait_ms: {results['cpu_max_wait_ms']} (this run)")
    print(f"load average: {results['loadavg_start']} at start, {results['loadavg_end']} at end")
    print("\n| what | measured | target |")
    print("|---|---|---|")
    print(f"| unloaded (1 client) | {u['images_per_s']:.1f} img/s, p50 {u['p50_ms']:.0f} ms, "
          f"p99 {u['p99_ms']:.0f} ms | |")
    print(f"| sustainable ({s['clients']} clients, closed loop) | {s['images_per_s']:.1f} img/s, "
          f"p99 {s['p99_ms']:.0f} ms, {s['statuses']} | |")
    print(f"| open loop offered | {o['offered_per_s']:.0f} req/s x {o['duration_s']:g} s = {o['offered']} "
          f"(sent in {o['send_wall_s']:.1f} s, send lag p99 {o['send_lag_p99_ms']:.0f} ms; all answered "
          f"after {o['wall_s']:.0f} s; most in flight {o['most_outstanding']}) | |")
    print(f"| accepted (200) | {o['accepted']} ({o['accepted_per_s']:.1f}/s), p50 {o['accepted_p50_ms']:.0f} ms, "
          f"p99 {o['accepted_p99_ms']:.0f} ms = {ratio:.1f}x the unloaded p99 | <= 2x "
          f"({'met' if ratio <= 2 else 'not met'}) |")
    print(f"| refused (429) | {o['refused_429']}, p50 {o['refused_p50_ms']:.1f} ms, p99 {o['refused_p99_ms']:.1f} ms, "
          f"{o['refused_with_retry_after']} with Retry-After | fast, all with Retry-After |")
    print(f"| answers by status | {o['by_status']} | |")
    print(f"| lost (no answer, or not sent) | {lost} of {o['offered']} | 0 ({'met' if lost == 0 else 'not met'}) |")
    print(f"| gateway RSS | {o['rss_before_mb']:.0f} MB before, {o['rss_peak_mb']:.0f} MB peak, "
          f"{o['rss_after_mb']:.0f} MB after | bounded |")
    print(f"| CPU during the open loop | gateway {o['gateway_cpu_s']:.0f} s, load generator {o['client_cpu_s']:.0f} s "
          f"in {o['wall_s']:.0f} s; machine {100 * o['machine_busy']:.0f}% busy | |")
    for line in o["samples"][:6]:
        print(f"  sample: {line}")


if __name__ == "__main__":
    main()
