"""Load generation and statistics shared by `gateway bench` and benchmarks/ (sample photos too)."""
from __future__ import annotations

import io
import itertools
import statistics
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np


def sample_photos() -> dict[str, bytes]:
    """scikit-image's bundled photos as JPEG, plus one 1920x1080 'camera' photo (no downloads)."""
    from PIL import Image
    from skimage import data

    out = {}
    for name in ("chelsea", "coffee", "astronaut", "rocket"):
        buf = io.BytesIO()
        Image.fromarray(getattr(data, name)()).save(buf, format="JPEG", quality=90)
        out[name] = buf.getvalue()
    buf = io.BytesIO()
    big = Image.fromarray(data.astronaut()).resize((1920, 1080), Image.Resampling.BICUBIC)
    big.save(buf, format="JPEG", quality=90)
    out["astronaut_1080p"] = buf.getvalue()
    return out


def summarize(latencies_s: list[float], wall_s: float, errors: int = 0, images_per_call: int = 1) -> dict:
    ms = sorted(x * 1e3 for x in latencies_s)
    pct = (lambda q: float(np.percentile(ms, q))) if ms else (lambda q: float("nan"))
    return {
        "requests": len(ms), "errors": errors,
        "throughput": len(ms) * images_per_call / wall_s if wall_s else 0.0,
        "p50_ms": statistics.median(ms) if ms else float("nan"), "p95_ms": pct(95), "p99_ms": pct(99),
    }


def run_load(call: Callable, items: list, concurrency: int, total: int | None = None, warmup: int = 4,
             on_done: Callable[[], None] | None = None, duration: float | None = None) -> dict:
    """Call ``call(item)`` ``total`` times (or for ``duration`` seconds) over ``items`` from
    ``concurrency`` threads, after ``warmup`` untimed calls.

    ``call`` is made per thread (``call()`` -> function) when it has ``per_thread=True``, so
    clients that are not thread-safe get one instance each.
    """
    if (total is None) == (duration is None):
        raise ValueError("run_load needs exactly one of total or duration")
    for i in range(warmup):
        _resolve(call)(items[i % len(items)])
    latencies, errors, lock = [], [0], threading.Lock()
    counter = iter(range(total)) if total is not None else itertools.count()
    deadline = time.perf_counter() + duration if duration is not None else None

    def worker():
        fn = _resolve(call)
        while True:
            with lock:
                i = next(counter, None)
            if i is None or (deadline is not None and time.perf_counter() >= deadline):
                return
            t0 = time.perf_counter()
            try:
                fn(items[i % len(items)])
                ok = True
            except Exception:
                ok = False
            with lock:
                if ok:
                    latencies.append(time.perf_counter() - t0)
                else:
                    errors[0] += 1
            if on_done:
                on_done()

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        for f in [pool.submit(worker) for _ in range(concurrency)]:
            f.result()
    return summarize(latencies, time.perf_counter() - started, errors[0])


def _resolve(call: Callable) -> Callable:
    return call() if getattr(call, "per_thread", False) else call


def per_thread(factory: Callable[[], Callable]) -> Callable:
    """Mark a factory so run_load builds one callable per thread."""
    factory.per_thread = True  # type: ignore[attr-defined]
    return factory


def fmt(name: str, s: dict) -> str:
    return (f"{name:<46} {s['throughput']:8.1f} img/s   p50 {s['p50_ms']:7.2f} ms   "
            f"p95 {s['p95_ms']:7.2f} ms   errors {s['errors']}")
