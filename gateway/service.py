"""The request pipeline: decode -> preprocess -> route to a backend -> postprocess.

Framework-free (no Flask here) so it can be tested and benchmarked on its own. One place
(``Gateway.run``) tries a model's routes in order with failover, times the three phases,
and records the model's metrics for every outcome, as KServe's ``Model.__call__`` does;
the protocols on top (the JSON API, later others) only read requests and write answers.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from gateway import admission, cores, deadlines, metrics, postprocess, routing, tasks, tracing
from gateway.backends.base import Backend
from gateway.backends.embedded import default_threads
from gateway.backends.registry import backend_class
from gateway.breaker import RouteHealth
from gateway.config import GatewayConfig, ModelConfig
from gateway.errors import (
    BackendError,
    BackendTimeout,
    BackendUnavailable,
    BadRequest,
    DeadlineExceeded,
    GatewayError,
    NotFound,
    all_routes_failed,
)
from gateway.preprocess import PreprocessSpec
from gateway.routing import Route
from gateway.traffic import Traffic

log = logging.getLogger("gateway")
READY_TTL_S = 1.0


@dataclass
class Answer:
    """What one route answered for a request: each image's results for the model's task, and
    how long each phase took."""

    model: ModelConfig
    route: Route
    results: Any
    timings_ms: dict[str, float]

    def to_dict(self) -> dict:
        """The v1 JSON answer."""
        key = self.model.task.result_key
        return {
            "model": self.model.name,
            "backend": self.route.backend,
            "route": self.route.name,
            "weights": self.model.weights,
            "results": [{key: r} for r in self.results],
            "timings_ms": self.timings_ms,
        }


@dataclass
class Scores:
    """What one route answered as the model's raw (N, ...) scores (the V2 front's answer)."""

    model: ModelConfig
    route: Route
    scores: np.ndarray
    timings_ms: dict[str, float]


def conform(batch: np.ndarray, layout: str, spec: PreprocessSpec) -> np.ndarray:
    """A preprocessed (N, ...) batch in ``layout`` -> the layout and dtype ``spec`` says; a 400
    naming the expected shape when the images do not have the spec's size and channels."""
    expected = spec.tensor_dims(layout)
    if batch.ndim != 4 or tuple(batch.shape[1:]) != expected:
        raise BadRequest(f"expected a batch of shape [N, {', '.join(map(str, expected))}] ({layout}), "
                         f"got {list(batch.shape)}", code="invalid_shape")
    if layout != spec.layout:
        batch = batch.transpose((0, 2, 3, 1) if layout == "NCHW" else (0, 3, 1, 2))
    return np.ascontiguousarray(batch, dtype=np.dtype(spec.dtype))


def _infer_and_finish(engine: Backend, route: Route, batch: np.ndarray,
                      finish: Callable[[Route, np.ndarray], Any]) -> tuple[float, Any]:
    """An in-process engine's inference and the results, as one CPU step: (when inference ended, results)."""
    raw = engine.infer(route, batch)
    return time.perf_counter(), finish(route, raw)


class Gateway:
    def __init__(self, config: GatewayConfig, backends: dict[str, Backend] | None = None,
                 health: RouteHealth | None = None):
        """``backends`` replaces the engines the config names (tests inject doubles here)."""
        self.config = config
        self.backends: dict[str, Backend] = backends if backends is not None else {
            name: backend_class(settings.kind)(name, settings) for name, settings in config.backends.items()}
        self.health = health or RouteHealth()
        self.traffic = Traffic(config)  # weighted splits, shadow routes, the guard (gateway/traffic.py)
        self._ready_cache: dict[tuple, tuple[float, bool]] = {}
        server = config.server
        in_flight, queued = server.max_in_flight or 512, server.max_queued or 64
        self.limiter = admission.Limiter("the server", in_flight, queued)
        self.limiters = {name: admission.Limiter(f"model {name!r}", m.max_in_flight or in_flight,
                                                 queued if m.max_queued is None else m.max_queued)
                         for name, m in config.models.items()}
        # Every core per worker, not cores / workers: keep-alive connections are not spread evenly
        # over the workers (one may hold all four of 4 clients), and a worker held to its share
        # then left a core idle (measured: 74 img/s against 106). Inference still keeps to the
        # worker's share of intra-op threads whenever steps run side by side (gateway.cores).
        threads = server.cpu_threads or os.cpu_count() or 1
        queue = server.cpu_queue or 16 * default_threads()  # 16 per core of the worker's share: a wait of ~0.2 s
        self.cpu = admission.Cpu(threads, queue,  # `gateway serve` sets its offload
                                 server.cpu_max_wait_ms / 1e3)

    def load(self) -> None:
        """Open every backend; a backend that is down only makes its routes unready. Routes of
        in-process engines that cannot serve (a missing or corrupt model file) are named in a
        warning now, not first in a request's 503."""
        for name, backend in self.backends.items():
            routes = [r for m in self.config.models.values() for r in m.routes if r.backend == name]
            try:
                backend.load(routes)
            except BackendError as exc:
                log.warning("%s", exc.message)
                continue
            if self.config.backends[name].kind != "embedded":
                continue  # remote engines may start later; /v1/models shows their readiness
            for route in routes:
                if not backend.ready(route):
                    reason = backend.metadata(route).get("error", "not ready")
                    log.warning("model %s, route %s cannot serve: %s", route.model, route.name, reason)

    def warm(self) -> None:
        """Each model's CPU steps once, before the first request: every image format's decoder
        imported (Pillow imports its plugins on first use), each route's preprocessing, each
        in-process engine's first (slowest) inference, on each of its sessions. Why before: under the gevent front these
        steps run on native threads, and a first import there takes importlib's per-module lock,
        a gevent lock once the worker is patched; two threads importing at once could then wait
        for each other for ever (seen: the first requests of a fresh worker hung to their deadline)."""
        Image.init()
        photos = []
        for fmt in ("JPEG", "PNG"):
            buffer = io.BytesIO()
            Image.new("RGB", (64, 48), (200, 120, 40)).save(buffer, fmt)
            photos.append(buffer.getvalue())
        for model in self.config.models.values():
            decoded = self.decode(photos, model)
            chosen = model.task.options({}, self.config.server.default_top_k, len(model.labels))
            for route in model.routes:
                batch = tasks.prepare(decoded, route.preprocess)
                if self.config.backends[route.backend].kind != "embedded":
                    continue
                try:
                    with cores.running():  # a step, as a request's is
                        raw = self.backends[route.backend].infer(route, batch)  # alone: every core
                        with cores.running():  # beside another step: the worker's share of the cores
                            self.backends[route.backend].infer(route, batch)
                    model.task.answer(raw, route, model.labels, tasks.sizes(decoded), chosen)
                    postprocess.to_meaning(model.task.shaped(raw, route, len(model.labels)), route.output,
                                           model.output)
                except GatewayError:
                    continue  # a route that cannot serve: load() named it

    def close(self) -> None:
        for backend in self.backends.values():
            backend.close()

    # -- lookups -----------------------------------------------------------------------
    def model(self, name: str | None) -> ModelConfig:
        name = name or self.config.server.default_model
        try:
            return self.config.models[name]
        except KeyError:
            raise NotFound(f"unknown model {name!r}; known models: {', '.join(sorted(self.config.models))}",
                           code="unknown_model") from None

    def routes(self, model: ModelConfig, route: str | None = None, backend: str | None = None) -> list[Route]:
        return routing.choose(model.name, model.routes, route, backend)

    def route_ready(self, route: Route) -> bool:
        """The backend's answer, reused for READY_TTL_S: probes (/readyz, listings) polled by
        orchestrators must not turn into a stream of calls to every backend."""
        key = (route.model, route.name)
        now = time.monotonic()
        cached = self._ready_cache.get(key)
        if cached and now - cached[0] < READY_TTL_S:
            return cached[1]
        try:
            ready = bool(self.backends[route.backend].ready(route))
        except Exception as exc:  # readiness is a question; it must never fail the caller
            log.warning("readiness check of %s/%s failed: %s", route.model, route.name, exc)
            ready = False
        self._ready_cache[key] = (now, ready)
        return ready

    # -- the pipeline ----------------------------------------------------------------------
    def check_count(self, count: int) -> None:
        """A request's number of images, within the server's bound (every protocol, every input kind)."""
        if count == 0:
            raise BadRequest("the request holds no image", code="no_image")
        if count > self.config.server.max_images:
            raise BadRequest(f"{count} images in one request; the limit is {self.config.server.max_images}",
                             code="too_many_images")

    def decode(self, images: list[bytes], model: ModelConfig) -> list:
        self.check_count(len(images))
        return tasks.decode(images, [r.preprocess for r in model.routes], self.config.server.max_pixels)

    def infer(self, model_name: str | None, images: list[bytes], task: str | None = None,
              options: Mapping[str, Any] | None = None, route: str | None = None, backend: str | None = None,
              protocol: str = "rest", timeout_s: float | None = None) -> Answer:
        """Encoded photos -> each photo's results for the model's task. ``task`` (the task the
        client asked for by its endpoint) must be the model's; ``options`` are the task's
        request options (top_k; a detector's thresholds), query strings accepted; ``timeout_s``
        the client's deadline (capped by the server's request_timeout_s)."""
        model = self.model(model_name)
        if task is not None and model.task.name != task:
            raise BadRequest(f"model {model.name!r} does {model.task.name}, not {task}: use "
                             f"/v1/models/{model.name}/{model.task.verb}", code="wrong_task")
        with self.admitted(model, len(images), protocol, timeout_s) as (outcome, deadline):
            try:
                chosen = model.task.options(options or {}, self.config.server.default_top_k, len(model.labels))
            except (ValueError, TypeError) as exc:
                raise BadRequest(str(exc), code="invalid_parameter") from None
            started = time.perf_counter()
            with tracing.span("decode", images=len(images), bytes=sum(map(len, images))):
                decoded = self.cpu(model.name, deadline, self.decode, images, model)
            sizes = tasks.sizes(decoded)
            answer = self.run(model, route, backend, started=started, deadline=deadline,
                              prepare=lambda r: tasks.prepare(decoded, r.preprocess),
                              finish=lambda r, raw: model.task.answer(raw, r, model.labels, sizes, chosen))
            outcome["backend"] = answer.route.backend
            return answer

    def scores(self, model_name: str | None, inputs: list[bytes] | np.ndarray, layout: str | None = None,
               route: str | None = None, backend: str | None = None, protocol: str = "rest",
               timeout_s: float | None = None) -> Scores:
        """The model's raw (N, ...) scores in the meaning the model declares (``model.output``),
        for encoded photos (a list of bytes, preprocessed as each route needs) or for a batch
        already preprocessed as the model declares it (an array; ``layout`` may say NCHW/NHWC
        instead). Each route gets the layout and dtype its engine takes."""
        model = self.model(model_name)
        with self.admitted(model, len(inputs), protocol, timeout_s) as (outcome, deadline):
            started = time.perf_counter()
            if isinstance(inputs, np.ndarray):
                self.check_count(len(inputs))
                batch, given = inputs, layout or model.preprocess.layout
                prepare: Callable[[Route], np.ndarray] = lambda r: conform(batch, given, r.preprocess)
            else:
                with tracing.span("decode", images=len(inputs), bytes=sum(map(len, inputs))):
                    decoded = self.cpu(model.name, deadline, self.decode, inputs, model)
                prepare = lambda r: tasks.prepare(decoded, r.preprocess)
            answer = self.run(model, route, backend, started=started, deadline=deadline, prepare=prepare,
                              finish=lambda r, raw: postprocess.to_meaning(model.task.shaped(raw, r, len(model.labels)),
                                                                           r.output, model.output))
            outcome["backend"] = answer.route.backend
            return Scores(model, answer.route, answer.results, answer.timings_ms)

    @contextmanager
    def admitted(self, model: ModelConfig, count: int, protocol: str,
                 timeout_s: float | None) -> Iterator[tuple[dict, float]]:
        """Count the request (``observed``), set its deadline, and hold a slot of the model's and
        the server's admission limiters for its whole life (429 or 504 when there is none)."""
        deadline = deadlines.deadline(timeout_s, self.config.server.request_timeout_s)
        with self.observed(model, count=count, protocol=protocol) as outcome, deadlines.within(deadline), \
                contextlib.ExitStack() as held:
            with tracing.span("queue wait", model=model.name):
                held.enter_context(admission.admitted([self.limiters[model.name], self.limiter], model.name,
                                                      deadline))
            yield outcome, deadline

    @contextmanager
    def observed(self, model: ModelConfig, count: int, protocol: str = "rest") -> Iterator[dict]:
        """Count one request (and its images) under the status it ends with, whatever it is.
        The caller sets ``outcome["backend"]`` once a route answered."""
        started = time.perf_counter()
        outcome = {"backend": "none"}
        try:
            yield outcome
        except GatewayError as exc:
            metrics.REQUESTS.labels(model.name, getattr(exc, "backend", "none"), str(exc.status), protocol).inc()
            raise
        except Exception:
            metrics.REQUESTS.labels(model.name, "none", "500", protocol).inc()
            raise
        backend = outcome["backend"]
        metrics.REQUESTS.labels(model.name, backend, "200", protocol).inc()
        metrics.IMAGES.labels(model.name, backend).inc(count)
        metrics.LATENCY.labels(model.name, backend).observe(time.perf_counter() - started)

    def run(self, model: ModelConfig, route: str | None, backend: str | None, prepare: Callable[[Route], np.ndarray],
            finish: Callable[[Route, np.ndarray], Any], started: float | None = None,
            deadline: float | None = None) -> Answer:
        """Try the model's routes in order, breaker-aware (or only the one ``route``/``backend``
        force): ``prepare`` builds the route's input batch (shared by routes with the same
        preprocessing), the backend infers, ``finish`` turns its raw output into results.
        Unavailable and timed-out routes fail over to the next; a rejected input or a bad
        answer does not. ``started`` is when the request's own work (decoding) began: it counts
        as preprocessing. CPU steps run through ``self.cpu``; an in-process engine's inference
        and the results are one CPU step. Past ``deadline`` (time.monotonic) no route is tried:
        before the first, a 504 naming the stage; after a failed one, failover stops."""
        routes = self.routes(model, route, backend)
        forced = route is not None or backend is not None
        begun = time.perf_counter()
        started = begun if started is None else started
        if deadline is None:
            deadline = time.monotonic() + self.config.server.request_timeout_s
        batches: dict = {}
        failures: list[BackendError] = []
        tried: list[str] = []  # route names, in the order tried
        for chosen in routes if forced else self.traffic.order(model, routes, self.health):
            t0 = time.perf_counter()
            if time.monotonic() >= deadline:  # failover must not outlive the request's time budget
                if not failures:
                    metrics.REJECTED.labels(model.name, "deadline before the engine").inc()
                    raise DeadlineExceeded(f"the request's deadline passed before route {chosen.name!r} "
                                           f"({chosen.backend}) was called", code="deadline_exceeded")
                break  # the failures so far answer: the routes behind them had no time left
            batch = batches.get(chosen.preprocess)
            if batch is None:
                with tracing.span("preprocess", route=chosen.name):
                    batch = batches[chosen.preprocess] = self.cpu(model.name, deadline, prepare, chosen)
            engine = self.backends[chosen.backend]
            t1 = time.perf_counter()
            try:
                with tracing.span(f"engine {chosen.backend}", model=model.name, route=chosen.name,
                                  backend=chosen.backend, batch_size=len(batch)):
                    if self.config.backends[chosen.backend].kind == "embedded":
                        t2, results = self.cpu(model.name, deadline, _infer_and_finish, engine, chosen, batch, finish)
                    else:
                        raw = engine.infer(chosen, batch)
                        t2 = time.perf_counter()
                        with tracing.span("postprocess", route=chosen.name):
                            results = self.cpu(model.name, deadline, finish, chosen, raw)
            except (BackendUnavailable, BackendTimeout) as exc:
                self.health.failed(chosen)
                self.traffic.failed(model, chosen, exc)
                failures.append(exc)
                tried.append(chosen.name)
                log.warning("route %s/%s failed: %s", model.name, chosen.name, exc.message)
                continue
            except BackendError as exc:  # a bad answer: no failover, but a canary's guard counts it
                self.traffic.failed(model, chosen, exc)
                raise
            self.health.succeeded(chosen)
            t3 = time.perf_counter()
            metrics.INFERENCE.labels(model.name, chosen.backend).observe(t2 - t1)
            timings = {"preprocess": (begun - started) + (t1 - t0), "inference": t2 - t1,
                       "postprocess": t3 - t2, "total": t3 - started}
            answer = Answer(model, chosen, results, {k: round(v * 1e3, 3) for k, v in timings.items()})
            self.traffic.answered(self, answer, prepare, finish, batches)  # shadow copies, off the request path
            return answer
        raise all_routes_failed(model.name, failures, tried)
