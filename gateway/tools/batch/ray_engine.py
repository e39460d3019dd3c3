"""`gateway batch INPUT --out OUT --ray [ADDRESS]`: the batch job on Ray Data.

INPUT is a local folder, a list file, or ``s3://bucket/prefix`` (a prefix's objects, not
"sub-folders"); OUT a local path or ``s3://bucket/key.jsonl``.  The pipeline:

    file keys (driver) -> read + decode + preprocess (CPU tasks) -> ONNX Runtime (actor pool)
    -> JSON lines streamed back to the driver -> results file, sorted by key at the end

Each step calls the gateway's own code: decoding is ``tasks.decode`` (same draft size, same
400 ``invalid_image`` errors), tensors come from ``tasks.prepare`` with the route's spec, each
actor holds one ``EmbeddedBackend`` (one ONNX Runtime session, loaded once), and the model's
task turns raw output into results (``Task.answer``: a classifier's top-k, a detector's boxes
in each photo's own pixels).  So every line is the line `gateway batch` writes through a
gateway, up to the ~1e-6 float noise of a different batch size.

ADDRESS: none starts a local Ray (or joins ``RAY_ADDRESS`` when that is set, as in a Ray
job); ``ray://host:10001`` or ``host:6379`` joins a cluster.
"""
from __future__ import annotations

import functools
import json
import logging
import math
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from gateway.tools.batch import storage
from gateway.tools.batch.inputs import find_inputs, parse_shard, shard
from gateway.tools.batch.lines import error_line, result_line
from gateway.tools.batch.progress import bar, summary_line
from gateway.tools.batch.results import open_results

if TYPE_CHECKING:
    from gateway.config import GatewayConfig

# Inference is ~5x the cost of decoding here (measured: ~2 ms decode + preprocess, ~10 ms
# efficientnet_lite0 per image on one core).  So each core runs an inference actor (one ONNX
# Runtime thread) booking 7/8 of a CPU, and the eighths left run decoding tasks booking 1/4
# each.  The differing requests also keep Ray Data from fusing the decode step into the
# actors: decoding stays in its own CPU tasks.
ACTOR_CPUS = 0.875
LOADER_CPUS = 0.25
# Each Ray batch costs ~20 ms of scheduling and hand-offs whatever its size, while ONNX Runtime
# on CPU is fastest per image in small calls (efficientnet_lite0, one thread: 6.4 ms at 1-4
# images, 7.2 at 16, 9.1 at 64).  So batches of 64 travel through Ray, and each actor runs its
# session on 4 at a time (measured on 1000 photos: 1.45x the images/s of batches of 16 in one call).
DEFAULT_BATCH = 64
SESSION_BATCH = 4


@dataclass(frozen=True)
class Job:
    """What every task and actor needs, shipped to them once: small (the config travels as its
    path, read once per worker process), so Ray keeps it out of the object store."""

    config_path: str  # absolute: every node reads the same gateway.yaml (and its model files)
    model: str
    route: str  # route name (an embedded backend's route)
    options: Any  # the task's request options (top_k; a detector's thresholds)

    @property
    def config(self) -> GatewayConfig:
        return _config(self.config_path)


@functools.lru_cache(maxsize=4)
def _config(path: str) -> GatewayConfig:
    from gateway.config import load_config

    return load_config(path)


# -- the two pipeline steps ---------------------------------------------------------------------
def load_images(batch: dict, filesystem, job: Job) -> dict:
    """CPU task: file keys -> model tensors and each photo's sizes, or the error line `gateway
    batch` would write."""
    from gateway import tasks
    from gateway.errors import GatewayError

    model = job.config.models[job.model]
    spec = next(r for r in model.routes if r.name == job.route).preprocess
    specs = [r.preprocess for r in model.routes]  # decoded as the gateway does, for every route
    tensors = np.zeros((len(batch["file"]), *spec.tensor_dims()), np.dtype(spec.dtype))
    sizes = np.zeros((len(batch["file"]), 4), np.int64)  # decoded w, h; photo w, h
    lines = []
    for i, (key, path) in enumerate(zip(batch["file"], batch["path"])):
        try:
            data = storage.read_bytes(filesystem, str(path))
        except OSError as exc:
            lines.append(json.dumps(error_line(str(key), None, "unreadable_file", str(exc))))
            continue
        try:
            images = tasks.decode([data], specs, job.config.server.max_pixels)
        except GatewayError as exc:  # 400 invalid_image, as the gateway answers
            lines.append(json.dumps(error_line(str(key), exc.status, exc.code, exc.message)))
            continue
        tensors[i] = tasks.prepare(images, spec)[0]
        (decoded, photo), = tasks.sizes(images)
        sizes[i] = [*decoded, *photo]
        lines.append("")
    return {"file": batch["file"], "tensor": tensors, "sizes": sizes, "line": np.array(lines, dtype=object)}


class InferenceActor:
    """Ray actor: one ONNX Runtime session (the gateway's embedded backend), loaded once."""

    def __init__(self, job: Job, threads: int = 1, session_batch: int = 0):
        from gateway.backends.embedded import EmbeddedBackend

        self.job = job
        self.model = job.config.models[job.model]
        self.route = next(r for r in self.model.routes if r.name == job.route)
        name = self.route.backend
        config = job.config.with_backend(name, intra_op_threads=threads, max_batch_size=session_batch)
        settings = config.backends[name]
        assert isinstance(settings, EmbeddedBackend.Settings)
        self.backend = EmbeddedBackend(name, settings)
        self.backend.load([self.route])
        if not self.backend.ready(self.route):
            raise RuntimeError(self.backend.metadata(self.route).get("error") or "model not loaded")

    def __call__(self, batch: dict) -> dict:
        from gateway.errors import BackendBadResponse, BackendRejected

        lines = [str(line) for line in batch["line"]]  # JSON: Ray's blocks carry strings, not dicts
        keys = [str(k) for k in batch["file"]]
        todo = [i for i, line in enumerate(lines) if not line]
        task = self.model.task
        if todo:
            try:
                raw = self.backend.infer(self.route, np.ascontiguousarray(batch["tensor"][todo]))
                sizes = [((int(s[0]), int(s[1])), (int(s[2]), int(s[3]))) for s in batch["sizes"][todo]]
                results = task.answer(raw, self.route, self.model.labels, sizes, self.job.options)
                for i, r in zip(todo, results):
                    lines[i] = json.dumps(result_line(keys[i], self.model.name, self.route.backend,
                                                      task.result_key, r))
            except (BackendRejected, BackendBadResponse) as exc:  # a 502 about these images' answers
                for i in todo:
                    lines[i] = json.dumps(error_line(keys[i], exc.status, exc.code, exc.message))
        return {"file": np.array(keys, dtype=object), "line": np.array(lines, dtype=object)}


# -- the job ---------------------------------------------------------------------------------
def embedded_route(config, model_name: str | None, backend: str | None):
    """(model, route): the model's first embedded route, or the one ``--backend`` names."""
    from gateway.backends.embedded import EmbeddedBackend
    from gateway.errors import NotFound
    from gateway.routing import choose

    name = model_name or config.server.default_model
    if name not in config.models:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(sorted(config.models))}")
    model = config.models[name]
    try:
        routes = choose(model.name, model.routes, backend=backend)
    except NotFound as exc:
        raise ValueError(exc.message) from None
    embedded = [r for r in routes if config.backends[r.backend].kind == "embedded"]
    if not embedded:
        raise ValueError(f"model {model.name!r} has no embedded (ONNX Runtime) route"
                         + (f" named {backend!r}" if backend else "") + "; the Ray path runs the model in its actors")
    route = embedded[0]
    settings = config.backends[route.backend]
    path = EmbeddedBackend(route.backend, settings).model_path(route)
    if not path.is_file():
        raise ValueError(f"model file {path} is missing; run `gateway models build`")
    return model, route


def start_ray(address: str | None, num_cpus: int | None = None) -> tuple[bool, float]:
    """(started_here, seconds). Joins a running Ray (this process's, ``address`` or
    ``RAY_ADDRESS``), else starts one on this machine."""
    started = time.perf_counter()
    if address is None and not os.environ.get("RAY_ADDRESS"):
        # A one-machine Ray needs no network: advertise loopback, not the machine's address
        # (Ray's own single-machine mode, read when ray is first imported).
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # and sends no usage reports
    import ray

    if ray.is_initialized():
        return False, 0.0
    local: dict[str, Any] = {"num_cpus": num_cpus, "include_dashboard": False} if address is None else {}
    ray.init(address=address, logging_level=logging.WARNING, **local)
    return True, time.perf_counter() - started


def plan_actors(cpus: float, actors: int | None = None) -> tuple[int, float]:
    """(actors, CPUs each books): one per core by default, always leaving room for a decoding task."""
    usable = cpus - LOADER_CPUS
    if usable <= 0:
        raise ValueError(f"the Ray cluster has {cpus:g} CPUs; the pipeline needs at least 1")
    actors = actors or max(1, min(int(cpus), math.floor(usable / ACTOR_CPUS + 1e-9)))
    return actors, min(ACTOR_CPUS, usable / actors)


def build_dataset(filesystem, items: list[tuple[str, str]], job: Job, actors: int, actor_cpus: float,
                  batch_size: int):
    import ray
    import ray.data

    logging.getLogger("ray.data").setLevel(logging.WARNING)  # not a line per execution step
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # the driver shows one tqdm bar, as `gateway batch` does
    blocks = max(1, math.ceil(len(items) / batch_size))
    keys = ray.data.from_items([{"file": k, "path": p} for k, p in items], override_num_blocks=blocks)
    tensors = keys.map_batches(load_images, fn_kwargs={"filesystem": filesystem, "job": job},  # type: ignore[arg-type]
                               batch_size=batch_size, batch_format="numpy", num_cpus=LOADER_CPUS)
    with warnings.catch_warnings():
        # Ray 2.60 deprecates passing actor options through map_batches, and has no other way yet
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated", category=DeprecationWarning)
        return tensors.map_batches(InferenceActor, fn_constructor_kwargs={"job": job, "session_batch": SESSION_BATCH},
                                   batch_size=batch_size, batch_format="numpy", num_cpus=actor_cpus,
                                   compute=ray.data.ActorPoolStrategy(size=actors),
                                   # Ray Data ships the actor's class through the object store, where a
                                   # restart cannot rely on finding it (ray-project/ray#53727), and says so
                                   # at error level: an actor that dies ends the run instead (its lines
                                   # so far are kept and a re-run resumes)
                                   max_restarts=0)


def run_ray_batch(source: str, out: str, address: str | None = None, config_path: str = "gateway.yaml",
                  model=None, backend=None, top_k=None, actors: int | None = None,
                  batch_size: int = DEFAULT_BATCH, s3_endpoint: str | None = None, shard_spec: str | None = None,
                  progress: bool = True, limit: int | None = None, num_cpus: int | None = None,
                  keep_errors: bool = False, log=print) -> dict:
    from gateway.config import load_config

    config = load_config(config_path)
    model_settings, route = embedded_route(config, model, backend)
    given = {"top_k": top_k} if top_k is not None else {}
    try:
        options = model_settings.task.options(given, config.server.default_top_k, len(model_settings.labels))
    except (ValueError, TypeError) as exc:
        raise ValueError(f"--{str(exc).replace('_', '-')}") from None
    filesystem, items = find_inputs(source, out, s3_endpoint)
    if shard_spec:
        items = shard(items, *parse_shard(shard_spec))
    results = open_results(out, s3_endpoint, keep_errors=keep_errors)
    done = results.done()
    pending = [item for item in items if item[0] not in done]
    todo = pending if limit is None else pending[:limit]
    stats: dict[str, Any] = {"total": len(items), "skipped": len(items) - len(pending), "written": 0, "errors": 0}
    job = Job(str(Path(config_path).resolve()), model_settings.name, route.name, options)

    started_here, stats["ray_start_s"] = start_ray(address, num_cpus) if todo else (False, 0.0)
    progress_bar = bar(len(todo), progress)
    started = time.perf_counter()
    try:
        if todo:
            import ray

            actors, actor_cpus = plan_actors(ray.cluster_resources().get("CPU", 0), actors)
            actors = min(actors, math.ceil(len(todo) / batch_size))  # no idle actors on a small job
            stats["actors"] = actors
            ds = build_dataset(filesystem, todo, job, actors, actor_cpus, batch_size)
            for batch in ds.iter_batches(batch_format="numpy", batch_size=None):
                rows = [json.loads(line) for line in batch["line"]]
                if "first_s" not in stats:  # start-up: planning, actors loading their sessions, first batch
                    stats["first_s"], first_rows = round(time.perf_counter() - started, 3), len(rows)
                results.add(rows)
                stats["written"] += len(rows)
                stats["errors"] += sum("error" in r for r in rows)
                progress_bar.update(len(rows))
    except Exception as exc:  # a failed task or actor: keep what is written, say why
        stats["aborted"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
    finally:
        elapsed = time.perf_counter() - started
        progress_bar.close()
        stats["lines"] = results.finish()
        if started_here:
            import ray

            ray.shutdown()
    stats["seconds"] = round(elapsed, 3)
    stats["images_per_s"] = round(stats["written"] / elapsed, 2) if elapsed and stats["written"] else 0.0
    if "first_s" in stats and elapsed > stats["first_s"]:  # the rate once the pipeline is running
        stats["steady_images_per_s"] = round((stats["written"] - first_rows) / (elapsed - stats["first_s"]), 2)
    log(summary_line(stats))
    if started_here:
        log(f"ray: {'joined ' + address if address else 'started'} in {stats['ray_start_s']:.1f} s; "
            f"{stats.get('actors')} inference actor(s), batch size {batch_size}; first results after "
            f"{stats.get('first_s', 0):.1f} s")
    return stats
