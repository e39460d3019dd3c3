"""Shared benchmark helpers: test photos, a gateway process, a concurrent load loop, stats."""
from __future__ import annotations

import io
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))


def photos() -> dict[str, bytes]:
    """scikit-image's bundled photos as JPEG, plus one 1920x1080 'camera' photo."""
    from PIL import Image
    from skimage import data

    out = {}
    for name in ("chelsea", "coffee", "astronaut", "rocket"):
        buf = io.BytesIO()
        Image.fromarray(getattr(data, name)()).save(buf, format="JPEG", quality=90)
        out[name] = buf.getvalue()
    buf = io.BytesIO()
    Image.fromarray(data.astronaut()).resize((1920, 1080), Image.BICUBIC).save(buf, format="JPEG", quality=90)
    out["astronaut_1080p"] = buf.getvalue()
    return out


def summarize(latencies_s: list[float], wall_s: float, errors: int = 0) -> dict:
    ms = sorted(x * 1e3 for x in latencies_s)
    return {
        "requests": len(ms), "errors": errors, "throughput": len(ms) / wall_s if wall_s else 0.0,
        "p50_ms": statistics.median(ms) if ms else float("nan"),
        "p95_ms": float(np.percentile(ms, 95)) if ms else float("nan"),
        "p99_ms": float(np.percentile(ms, 99)) if ms else float("nan"),
    }


def run_load(call, items: list, concurrency: int, total: int, warmup: int = 4) -> dict:
    """Run ``call(item)`` ``total`` times over ``items`` from ``concurrency`` threads."""
    for i in range(warmup):
        call(items[i % len(items)])
    latencies, errors, lock = [], [0], threading.Lock()
    counter = iter(range(total))

    def worker():
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            t0 = time.perf_counter()
            try:
                call(items[i % len(items)])
            except Exception:
                with lock:
                    errors[0] += 1
                continue
            with lock:
                latencies.append(time.perf_counter() - t0)

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        for _ in range(concurrency):
            pool.submit(worker)
    return summarize(latencies, time.perf_counter() - started, errors[0])


def fmt(name: str, s: dict) -> str:
    return (f"{name:<44} {s['throughput']:8.1f} img/s   p50 {s['p50_ms']:7.2f} ms   "
            f"p95 {s['p95_ms']:7.2f} ms   errors {s['errors']}")
