"""`gateway batch INPUT --out results.jsonl`: the batch job through a running gateway (HTTP).

Each image is one request to the gateway's v1 endpoint for the model's task, a bounded window of
them in flight. Gateway outages (no answer, 503, 504) are retried, then stop the run *without*
writing a line, so the next run picks the image up again; a 502 that persists through the
retries is about this image's answer and becomes its error line.
"""
from __future__ import annotations

import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from gateway.tasks import TASKS
from gateway.tools.batch.inputs import local_inputs, parse_shard, shard
from gateway.tools.batch.lines import error_line, result_line
from gateway.tools.batch.progress import bar, summary_line
from gateway.tools.batch.results import open_results
from gateway.tools.client import DEFAULT_URL, ClientError, GatewayClient

RETRIES = 3
RETRY_DELAY_S = 0.5  # doubled per retry


class GatewayDown(Exception):
    pass


def infer_one(client: GatewayClient, path: str, key: str, model, backend, options: dict, verb: str) -> dict:
    """One image's line: its results for the model's task (``verb``: classify, detect), or its error."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        return error_line(key, None, "unreadable_file", str(exc))
    for attempt in range(RETRIES):
        try:
            body = client.infer(verb, data, model=model, backend=backend, **options)
            (result_key, results), = body["results"][0].items()
            return result_line(key, body["model"], body["backend"], result_key, results)
        except ClientError as exc:
            if exc.status is not None and exc.status < 500:
                return error_line(key, exc.status, exc.code, exc.message)
            last = exc
            time.sleep(RETRY_DELAY_S * 2 ** attempt)
    if last.status == 502:  # the backend keeps answering this image badly: record it, move on
        return error_line(key, 502, last.code, last.message)
    raise GatewayDown(f"{key}: {last}")


def model_verb(client: GatewayClient, model: str | None) -> tuple[str, str]:
    """(model, the v1 verb of its task), asked of the gateway once (no gateway: GatewayDown)."""
    try:
        detail = client.model(model or client.models()["default_model"])
    except ClientError as exc:
        if exc.status is None or exc.status >= 500:
            raise GatewayDown(str(exc)) from None
        raise ValueError(exc.message) from None
    return detail["name"], TASKS[detail.get("task", "classification")].verb


def run_batch(source: Path, out: Path, url: str = DEFAULT_URL, model=None, backend=None, top_k=None,
              concurrency: int = 4, shard_spec: str | None = None, progress: bool = True, limit: int | None = None,
              keep_errors: bool = False, log=print) -> dict:
    items = local_inputs(source, str(out))
    if shard_spec:
        items = shard(items, *parse_shard(shard_spec))
    results = open_results(str(out), keep_errors=keep_errors)
    done = results.done()
    pending = [item for item in items if item[0] not in done]
    todo = pending if limit is None else pending[:limit]
    stats: dict[str, Any] = {"total": len(items), "skipped": len(items) - len(pending), "written": 0, "errors": 0}
    client = GatewayClient(url)
    started = time.perf_counter()
    progress_bar = bar(len(todo), progress)
    try:
        if todo:
            model, verb = model_verb(client, model)
            options = {"top_k": top_k} if top_k is not None else {}
            _run(client, todo, results, stats, progress_bar, concurrency,
                 lambda key, path: infer_one(client, path, key, model, backend, options, verb))
    except GatewayDown as exc:
        stats["aborted"] = str(exc)
    finally:
        progress_bar.close()
        stats["lines"] = results.finish()
    elapsed = time.perf_counter() - started
    stats["seconds"] = round(elapsed, 3)
    stats["images_per_s"] = round(stats["written"] / elapsed, 2) if elapsed else 0.0
    log(summary_line(stats))
    return stats


def _run(client, todo, results, stats, progress_bar, concurrency: int, one) -> None:
    """``one(key, path)`` for each item, at most ``2 * concurrency`` submitted ahead."""
    with ThreadPoolExecutor(concurrency) as pool:
        window: deque = deque()
        items = iter(todo)

        def submit_next() -> None:
            item = next(items, None)
            if item is not None:
                window.append(pool.submit(one, *item))

        for _ in range(concurrency * 2):  # bounded read-ahead
            submit_next()
        try:
            while window:
                line = window.popleft().result()
                results.add([line])
                stats["written"] += 1
                stats["errors"] += "error" in line
                progress_bar.update(1)
                submit_next()
        except GatewayDown:
            for future in window:
                future.cancel()
            raise
