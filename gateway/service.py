"""The request pipeline: decode -> preprocess -> route to a backend -> postprocess.

Framework-free (no Flask here) so it can be tested and benchmarked on its own. One place
(``Gateway.run``) tries a model's routes in order with failover, times the three phases,
and records the model's metrics for every outcome, as KServe's ``Model.__call__`` does;
the protocols on top (the JSON API, later others) only read requests and write answers.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from gateway import detection, metrics, postprocess
from gateway.backends.base import Backend
from gateway.config import GatewayConfig, ModelConfig, Route, backend_class
from gateway.errors import (
    BackendBadResponse,
    BackendError,
    BackendTimeout,
    BackendUnavailable,
    BadRequest,
    GatewayError,
    NotFound,
    all_routes_failed,
)
from gateway.preprocess import ImageError, PreprocessSpec, decode_image, original_size, preprocess_image
from gateway.routing import RouteHealth

log = logging.getLogger("gateway")
READY_TTL_S = 1.0


@dataclass
class Answer:
    """What one route answered, already postprocessed, and how long each phase took."""

    model: ModelConfig
    route: Route
    results: Any
    timings_ms: dict[str, float]
    result_key: ClassVar[str] = "results"  # what each image's results are called in the JSON answer

    def to_dict(self) -> dict:
        return {
            "model": self.model.name,
            "backend": self.route.backend,
            "route": self.route.name,
            "weights": self.model.weights,
            "results": [{self.result_key: r} for r in self.results],
            "timings_ms": self.timings_ms,
        }


class Classification(Answer):
    result_key = "predictions"


class Detection(Answer):
    result_key = "detections"


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


class Gateway:
    def __init__(self, config: GatewayConfig, backends: dict[str, Backend] | None = None,
                 health: RouteHealth | None = None):
        """``backends`` replaces the engines the config names (tests inject doubles here)."""
        self.config = config
        self.backends: dict[str, Backend] = backends if backends is not None else {
            name: backend_class(settings.kind)(name, settings) for name, settings in config.backends.items()}
        self.health = health or RouteHealth()
        self._ready_cache: dict[tuple, tuple[float, bool]] = {}

    def load(self) -> None:
        """Open every backend; a backend that is down only makes its routes unready."""
        for name, backend in self.backends.items():
            routes = [r for m in self.config.models.values() for r in m.routes if r.backend == name]
            try:
                backend.load(routes)
            except BackendError as exc:
                log.warning("%s", exc.message)

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
        """The routes to try in order: all of them, or the one forced by its name (``route``),
        by its backend (``backend``, which may also name a route), or by both."""
        if route is None and backend is None:
            return list(model.routes)
        chosen = list(model.routes)
        if route is not None:
            chosen = [r for r in chosen if r.name == route]
        if backend is not None:
            chosen = [r for r in chosen if r.backend == backend] or \
                     ([r for r in chosen if r.name == backend] if route is None else [])
        if chosen:
            return chosen[:1]
        asked = " on ".join(f"{k} {v!r}" for k, v in (("route", route), ("backend", backend)) if v is not None)
        raise NotFound(f"model {model.name!r} has no {asked}; its routes: "
                       + ", ".join(f"{r.name} ({r.backend})" for r in model.routes), code="unknown_backend")

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
    def decode(self, images: list[bytes], model: ModelConfig) -> list:
        """Decode every image once (JPEG draft mode sized for the most demanding route)."""
        if not images:
            raise BadRequest("the request holds no image", code="no_image")
        if len(images) > self.config.server.max_images:
            raise BadRequest(f"{len(images)} images in one request; the limit is "
                             f"{self.config.server.max_images}", code="too_many_images")
        sizes = [r.preprocess.decode_size() for r in model.routes]
        draft = (max(w for w, _ in sizes), max(h for _, h in sizes))
        decoded = []
        for i, data in enumerate(images):
            try:
                decoded.append(decode_image(data, self.config.server.max_pixels, draft_size=draft))
            except ImageError as exc:
                where = f"image {i}: " if len(images) > 1 else ""
                raise BadRequest(f"{where}{exc}", code="invalid_image") from None
        return decoded

    def task_model(self, name: str | None, task: str) -> ModelConfig:
        """The model, which must do ``task`` (a classifier cannot detect, nor a detector classify)."""
        model = self.model(name)
        if model.task != task:
            verb = {"classification": "classify", "detection": "detect"}[model.task]
            raise BadRequest(f"model {model.name!r} does {model.task}, not {task}: use "
                             f"/v1/models/{model.name}/{verb}", code="wrong_task")
        return model

    def classify(self, model_name: str | None, images: list[bytes], top_k: int | None = None,
                 route: str | None = None, backend: str | None = None, protocol: str = "rest") -> Classification:
        model = self.task_model(model_name, "classification")
        with self.observed(model, count=len(images), protocol=protocol) as outcome:
            k = top_k or self.config.server.default_top_k
            if not 1 <= k <= len(model.labels):
                raise BadRequest(f"top_k must be between 1 and {len(model.labels)}, got {k}",
                                 code="invalid_parameter")
            started = time.perf_counter()
            decoded = self.decode(images, model)
            answer = self.run(model, route, backend, started=started,
                              prepare=lambda r: np.stack([preprocess_image(im, r.preprocess) for im in decoded]),
                              finish=lambda r, raw: postprocess.predictions(raw, r.output, model.labels, k))
            outcome["backend"] = answer.route.backend
            return Classification(**vars(answer))

    def detect(self, model_name: str | None, images: list[bytes], params: dict | None = None,
               route: str | None = None, backend: str | None = None, protocol: str = "rest") -> Detection:
        """Boxes in each photo's own pixels (after EXIF orientation). ``params`` may override the
        model's score_threshold, iou_threshold and max_detections (query strings accepted)."""
        model = self.task_model(model_name, "detection")
        assert model.detection is not None
        try:
            spec = model.detection.with_overrides(params or {})
        except (ValueError, TypeError) as exc:
            raise BadRequest(str(exc), code="invalid_parameter") from None
        with self.observed(model, count=len(images), protocol=protocol) as outcome:
            started = time.perf_counter()
            decoded = self.decode(images, model)

            def finish(r: Route, raw: np.ndarray) -> list:
                found = detection.detections(raw, [im.size for im in decoded], model.labels, r.preprocess, spec)
                return [detection.rescale(f, im.size, original_size(im)) for f, im in zip(found, decoded)]

            answer = self.run(model, route, backend, started=started, finish=finish,
                              prepare=lambda r: np.stack([preprocess_image(im, r.preprocess) for im in decoded]))
            outcome["backend"] = answer.route.backend
            return Detection(**vars(answer))

    def infer_images(self, model_name: str | None, images: list[bytes], route: str | None = None,
                     backend: str | None = None, protocol: str = "rest") -> Answer:
        """Encoded images -> the model's raw scores (N, classes) in the meaning the model
        declares (``model.output``), preprocessed as each route needs."""
        model = self.model(model_name)
        with self.observed(model, count=len(images), protocol=protocol) as outcome:
            started = time.perf_counter()
            decoded = self.decode(images, model)
            answer = self.run(model, route, backend, started=started,
                              prepare=lambda r: np.stack([preprocess_image(im, r.preprocess) for im in decoded]),
                              finish=lambda r, raw: postprocess.to_meaning(raw, r.output, model.output))
            outcome["backend"] = answer.route.backend
            return answer

    def infer_tensor(self, model_name: str | None, batch: np.ndarray, layout: str | None = None,
                     route: str | None = None, backend: str | None = None, protocol: str = "rest") -> Answer:
        """A batch already preprocessed as the model declares it (``model.preprocess``; ``layout``
        may say NCHW/NHWC instead) -> the model's raw scores in the model's meaning. Each route
        gets the layout and dtype its engine takes; the backends split batches above their limit."""
        model = self.model(model_name)
        layout = layout or model.preprocess.layout
        with self.observed(model, count=len(batch), protocol=protocol) as outcome:
            answer = self.run(model, route, backend, prepare=lambda r: conform(batch, layout, r.preprocess),
                              finish=lambda r, raw: postprocess.to_meaning(raw, r.output, model.output))
            outcome["backend"] = answer.route.backend
            return answer

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
            finish: Callable[[Route, np.ndarray], Any], started: float | None = None) -> Answer:
        """Try the model's routes in order, breaker-aware (or only the one ``route``/``backend``
        force): ``prepare`` builds the route's input batch (shared by routes with the same
        preprocessing), the backend infers, ``finish`` turns its raw output into results.
        Unavailable and timed-out routes fail over to the next; a rejected input or a bad
        answer does not. ``started`` is when the request's own work (decoding) began: it counts
        as preprocessing."""
        routes = self.routes(model, route, backend)
        forced = route is not None or backend is not None
        begun = time.perf_counter()
        started = begun if started is None else started
        deadline = started + self.config.server.request_timeout_s
        batches: dict = {}
        failures: list[BackendError] = []
        for chosen in routes if forced else self.health.order(routes):
            t0 = time.perf_counter()
            if t0 > deadline:  # failover must not outlive the request's time budget
                failures.append(BackendTimeout(chosen.backend, "not tried: the request timeout "
                                               f"({self.config.server.request_timeout_s:g} s) ran out"))
                break
            batch = batches.get(chosen.preprocess)
            if batch is None:
                batch = batches[chosen.preprocess] = prepare(chosen)
            t1 = time.perf_counter()
            try:
                raw = self.backends[chosen.backend].infer(chosen, batch)
            except (BackendUnavailable, BackendTimeout) as exc:
                self.health.failed(chosen)
                failures.append(exc)
                log.warning("route %s/%s failed: %s", model.name, chosen.name, exc.message)
                continue
            self.health.succeeded(chosen)
            t2 = time.perf_counter()
            try:
                results = finish(chosen, raw)
            except ValueError as exc:
                raise BackendBadResponse(chosen.backend, str(exc)) from None
            t3 = time.perf_counter()
            metrics.INFERENCE.labels(model.name, chosen.backend).observe(t2 - t1)
            timings = {"preprocess": (begun - started) + (t1 - t0), "inference": t2 - t1,
                       "postprocess": t3 - t2, "total": t3 - started}
            return Answer(model, chosen, results, {k: round(v * 1e3, 3) for k, v in timings.items()})
        raise all_routes_failed(model.name, failures)
