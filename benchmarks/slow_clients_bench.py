"""Slow clients: 64 clients upload a 1 MB photo at 10 KB/s while 4 normal clients classify.

The gateway runs as `make serve` starts it (`gateway serve`, its own defaults), on a config
that extends the repo's gateway.yaml (only the gRPC front moved to a free port). 4 normal
clients (asyncio + aiohttp, one keep-alive connection each, embedded route) classify small
photos: first alone, then while 64 slow clients each send the headers of a 1 MB JPEG upload
and then its body in 1 KB pieces every 0.1 s (10 KB/s: the whole body would take ~100 s),
then alone again once the slow clients have gone. The slow clients stop after 40 s at most
(their sockets closed). Target: the normal clients keep >= 80% of their rate alone.

Reported as well: what happened to each slow upload (an answer, e.g. 408 when the gateway
cut it under its minimum upload rate, and when; the connection closed or reset by the
gateway; or still uploading when stopped, and how many bytes it had sent). Loopback only;
every process it starts is stopped. JSON in bench_results/slow-clients/.

    .venv/bin/python benchmarks/slow_clients_bench.py        # make bench-slow-clients
"""
from __future__ import annotations

import argparse
import asyncio
import io
import tempfile
import time
from pathlib import Path

from concurrency_bench import (
    CLASSIFY,
    ROOT,
    Gateway,
    closed_loop,
    loadavg,
    photos,
    read_response,
    write_config,
    write_results,
)

ROUTE = "embedded"


def big_photo(target: int = 1_000_000) -> bytes:
    """A real JPEG of at least ``target`` bytes (scikit-image's astronaut, enlarged)."""
    from PIL import Image
    from skimage import data

    image = Image.fromarray(data.astronaut())
    for side in range(1400, 4200, 200):
        buf = io.BytesIO()
        image.resize((side, side), Image.Resampling.BICUBIC).save(buf, format="JPEG", quality=95)
        if buf.tell() >= target:
            return buf.getvalue()
    raise RuntimeError("could not make a 1 MB JPEG")


async def slow_upload(i: int, port: int, body: bytes, rate: float, chunk: int, stop_at: float, t0: float) -> dict:
    """One client: the headers at once, then ``chunk`` bytes every ``chunk / rate`` s until the
    body is sent, the gateway answers or closes, or ``stop_at`` (loop time) comes."""
    loop = asyncio.get_running_loop()
    out = {"client": i, "sent": 0, "outcome": "still uploading when stopped", "status": None, "at_s": None}
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 30)
    except (OSError, TimeoutError) as exc:
        out.update(outcome=f"could not connect: {type(exc).__name__}", at_s=loop.time() - t0)
        return out
    head = (f"POST {CLASSIFY}?route={ROUTE} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: image/jpeg\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode("latin1")
    answer = asyncio.create_task(read_response(reader))
    try:
        writer.write(head)
        await writer.drain()
        start, k = loop.time(), 0
        while out["sent"] < len(body) and loop.time() < stop_at and not answer.done():
            piece = body[out["sent"]:out["sent"] + chunk]
            writer.write(piece)
            try:  # a gateway that does not read fills the socket buffers: drain then blocks
                await asyncio.wait_for(writer.drain(), max(0.01, stop_at - loop.time()))
            except TimeoutError:
                out["outcome"] = "still uploading when stopped (blocked: the gateway stopped reading)"
                break
            out["sent"] += len(piece)
            k += 1
            wait = start + k * chunk / rate - loop.time()
            if wait > 0:
                await asyncio.wait([answer], timeout=min(wait, max(0.0, stop_at - loop.time())))
        if out["sent"] >= len(body) and not answer.done():  # all sent: wait for the answer, until stop_at
            await asyncio.wait([answer], timeout=max(0.0, stop_at - loop.time()))
    except (ConnectionError, OSError) as exc:
        out.update(outcome=f"connection {type(exc).__name__} while sending", at_s=loop.time() - t0)
    if answer.done():
        try:
            status, _, payload = answer.result()
            out.update(outcome=f"answered {status}", status=status, at_s=loop.time() - t0,
                       message=payload[:200].decode(errors="replace"))
        except asyncio.IncompleteReadError:
            out.update(outcome="closed by the gateway without an answer", at_s=out["at_s"] or loop.time() - t0)
        except (ConnectionError, OSError) as exc:
            out.update(outcome=f"connection {type(exc).__name__}", at_s=out["at_s"] or loop.time() - t0)
    else:
        answer.cancel()
    writer.close()
    return out


async def phase_during(url: str, port: int, small: list[bytes], big: bytes, args) -> tuple[dict, list[dict]]:
    """The slow uploads, and the normal clients measured once the uploads are all under way."""
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    stop_at = t0 + args.slow_for
    uploads = [asyncio.create_task(slow_upload(i, port, big, args.rate, args.chunk, stop_at, t0))
               for i in range(args.slow_clients)]
    await asyncio.sleep(args.settle)
    window = min(args.measure, args.slow_for - args.settle - 1.0)
    during = await closed_loop(url, small, args.normal_clients, window, warmup=0.0, timeout=args.slow_for)
    slow = await asyncio.gather(*uploads)
    return during, slow


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slow-clients", type=int, default=64)
    ap.add_argument("--normal-clients", type=int, default=4)
    ap.add_argument("--rate", type=float, default=10 * 1024, help="slow clients' bytes/s each (default: 10 KB/s)")
    ap.add_argument("--chunk", type=int, default=1024, help="bytes per send (default: 1 KB)")
    ap.add_argument("--slow-for", type=float, default=40.0, help="the slow clients stop after this many seconds")
    ap.add_argument("--settle", type=float, default=4.0, help="seconds between the slow clients' start and the "
                                                              "normal clients' window")
    ap.add_argument("--measure", type=float, default=30.0, help="seconds of each normal-client window")
    ap.add_argument("--gateway-args", default="", help="more `gateway serve` arguments, for comparisons "
                                                       "(default: none, as `make serve`)")
    args = ap.parse_args()

    started = time.time()
    results: dict = {"benchmark": "slow-clients", "route": ROUTE, "gateway_args": args.gateway_args,
                     "loadavg_start": loadavg(),
                     "slow_clients": args.slow_clients, "normal_clients": args.normal_clients,
                     "slow_rate_bytes_per_s": args.rate}
    small, big = photos(), big_photo()
    results["upload_bytes"] = len(big)
    with tempfile.TemporaryDirectory(prefix="bench-slow-clients-") as tmp:
        gw = None
        try:
            gw = Gateway(write_config(Path(tmp)), ROOT / "bench_results" / "slow-clients", args.gateway_args)
            results["front"] = gw.startup_line()
            print(results["front"])
            url = f"{gw.url}{CLASSIFY}?route={ROUTE}"
            alone = asyncio.run(closed_loop(url, small, args.normal_clients, min(args.measure, 15.0), warmup=3.0))
            print(f"normal clients alone: {alone['images_per_s']:.1f} img/s, p50 {alone['p50_ms']:.0f} ms, "
                  f"statuses {alone['statuses']}", flush=True)
            rss_before = gw.rss_mb()
            print(f"{args.slow_clients} slow clients uploading {len(big) / 1e6:.2f} MB at "
                  f"{args.rate / 1024:g} KB/s each (stopped after {args.slow_for:g} s) ...", flush=True)
            during, slow = asyncio.run(phase_during(url, gw.port, small, big, args))
            rss_during = gw.rss_mb()
            print(f"normal clients during: {during['images_per_s']:.1f} img/s, p50 {during['p50_ms']:.0f} ms, "
                  f"statuses {during['statuses']}", flush=True)
            time.sleep(1.0)
            after = asyncio.run(closed_loop(url, small, args.normal_clients, 10.0, warmup=1.0))
            results.update(alone=alone, during=during, after=after, slow=slow, rss_before_mb=rss_before,
                           rss_end_of_uploads_mb=rss_during, rss_after_mb=gw.rss_mb())
        finally:
            if gw is not None:
                gw.stop()
    outcomes: dict[str, int] = {}
    for s in results["slow"]:
        outcomes[s["outcome"]] = outcomes.get(s["outcome"], 0) + 1
    results["slow_outcomes"] = outcomes
    results["loadavg_end"] = loadavg()
    results["wall_s"] = time.time() - started
    path = write_results("slow-clients", results)
    report(results)
    print(f"JSON: {path.relative_to(ROOT)}  ({results['wall_s']:.0f} s)")


def report(results: dict) -> None:
    a, d, f = results["alone"], results["during"], results["after"]
    ratio = d["images_per_s"] / a["images_per_s"] if a["images_per_s"] else float("nan")
    print(f"\nfront: {results['front']}")
    print(f"load average: {results['loadavg_start']} at start, {results['loadavg_end']} at end")
    print("\n| what | measured | target |")
    print("|---|---|---|")
    n = results["normal_clients"]
    print(f"| {n} normal clients alone | {a['images_per_s']:.1f} img/s, p50 {a['p50_ms']:.0f} ms, "
          f"errors {a['errors']} | |")
    print(f"| {n} normal clients during {results['slow_clients']} slow uploads | {d['images_per_s']:.1f} img/s, "
          f"p50 {d['p50_ms']:.0f} ms, p99 {d['p99_ms']:.0f} ms, {d['statuses']} | |")
    print(f"| during / alone | {ratio:.2f} | >= 0.8 ({'met' if ratio >= 0.8 else 'not met'}) |")
    print(f"| normal clients after the uploads | {f['images_per_s']:.1f} img/s, errors {f['errors']} | |")
    base = (a["images_per_s"] + f["images_per_s"]) / 2
    drift = d["images_per_s"] / base if base else float("nan")
    print(f"| during / mean(alone, after) (a check on drift) | {drift:.2f} | |")
    slow = results["slow"]
    sent = sorted(s["sent"] for s in slow)
    ats = sorted(s["at_s"] for s in slow if s["at_s"] is not None)
    when = f", at {ats[0]:.1f}-{ats[-1]:.1f} s" if ats else ""
    print(f"| slow uploads ({results['upload_bytes'] / 1e6:.2f} MB at {results['slow_rate_bytes_per_s'] / 1024:g} "
          f"KB/s) | {results['slow_outcomes']}{when}; bytes sent each {sent[0]}-{sent[-1]} | |")
    print(f"| gateway RSS | {results['rss_before_mb']:.0f} MB before, {results['rss_end_of_uploads_mb']:.0f} MB at the "
          f"end of the uploads, {results['rss_after_mb']:.0f} MB after | |")
    messages = {s.get("message") for s in slow if s.get("message")}
    for m in list(messages)[:3]:
        print(f"  slow upload answer: {m}")
    for line in d["error_samples"][:3]:
        print(f"  normal client, during: {line}")


if __name__ == "__main__":
    main()
