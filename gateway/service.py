"""The classify pipeline: decode -> preprocess -> route to a backend -> postprocess.

Framework-free (no Flask here) so it can be tested and benchmarked on its own.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np

from gateway import postprocess
from gateway.backends.base import Backend
from gateway.config import GatewayConfig, ModelSettings, Route, backend_class
from gateway.errors import (BackendBadResponse, BackendError, BackendTimeout, BackendUnavailable,
                            BadRequest, NotFound)
from gateway.preprocess import ImageError, decode_image, preprocess_image
from gateway.routing import RouteHealth

log = logging.getLogger("gateway")
READY_TTL_S = 1.0


@dataclass
class Classification:
    model: ModelSettings
    route: Route
    predictions: list[list[dict]]
    timings_ms: dict[str, float]

    def to_dict(self) -> dict:
        return {
            "model": self.model.name,
            "backend": self.route.backend,
            "route": self.route.name,
            "weights": self.model.weights,
            "results": [{"predictions": p} for p in self.predictions],
            "timings_ms": self.timings_ms,
        }


class Gateway:
    def __init__(self, config: GatewayConfig):
        self.config = config
        self.backends: dict[str, Backend] = {}
        for name, settings in config.backends.items():
            backend = backend_class(settings.kind)(settings)
            backend.root = config.root
            self.backends[name] = backend
        self.health = RouteHealth()
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
    def model(self, name: str | None) -> ModelSettings:
        name = name or self.config.server.default_model
        try:
            return self.config.models[name]
        except KeyError:
            raise NotFound(f"unknown model {name!r}; known models: {', '.join(sorted(self.config.models))}",
                           code="unknown_model") from None

    def routes(self, model: ModelSettings, forced: str | None) -> list[Route]:
        if forced is None:
            return list(model.routes)
        by_name = [r for r in model.routes if r.name == forced]
        by_backend = [r for r in model.routes if r.backend == forced]
        if by_name or by_backend:
            return (by_name or by_backend)[:1]
        if forced in self.backends:
            raise NotFound(f"model {model.name!r} has no route to backend {forced!r}; routes: "
                           f"{', '.join(r.name for r in model.routes)}", code="unknown_backend")
        raise NotFound(f"unknown backend {forced!r}; model {model.name!r} routes: "
                       f"{', '.join(r.name for r in model.routes)}", code="unknown_backend")

    def route_ready(self, route: Route) -> bool:
        """The backend's answer, reused for READY_TTL_S: probes (/readyz, listings) polled by
        orchestrators must not turn into a stream of calls to every backend."""
        key = (route.model_name, route.name)
        now = time.monotonic()
        cached = self._ready_cache.get(key)
        if cached and now - cached[0] < READY_TTL_S:
            return cached[1]
        try:
            ready = bool(self.backends[route.backend].ready(route))
        except Exception as exc:  # readiness is a question; it must never fail the caller
            log.warning("readiness check of %s/%s failed: %s", route.model_name, route.name, exc)
            ready = False
        self._ready_cache[key] = (now, ready)
        return ready

    # -- the pipeline ----------------------------------------------------------------------
    def decode(self, images: list[bytes], model: ModelSettings):
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

    def classify(self, model_name: str | None, images: list[bytes], top_k: int | None = None,
                 backend: str | None = None) -> Classification:
        started = time.perf_counter()
        model = self.model(model_name)
        routes = self.routes(model, backend)
        k = top_k or self.config.server.default_top_k
        if not 1 <= k <= len(model.labels):
            raise BadRequest(f"top_k must be between 1 and {len(model.labels)}, got {k}", code="invalid_parameter")
        decoded = self.decode(images, model)
        decode_ms = (time.perf_counter() - started) * 1e3

        batches: dict = {}  # routes sharing a preprocessing spec share the tensor
        failures: list[BackendError] = []
        candidates = routes if backend else self.health.order(routes)
        deadline = started + self.config.server.request_timeout_s
        for route in candidates:
            t0 = time.perf_counter()
            if t0 > deadline:  # failover must not outlive the request's time budget
                failures.append(BackendTimeout(route.backend, "not tried: the request timeout "
                                               f"({self.config.server.request_timeout_s:g} s) ran out"))
                break
            batch = batches.get(route.preprocess)
            if batch is None:
                batch = batches[route.preprocess] = np.stack([preprocess_image(im, route.preprocess)
                                                              for im in decoded])
            t1 = time.perf_counter()
            try:
                raw = self.backends[route.backend].infer(route, batch)
            except (BackendUnavailable, BackendTimeout) as exc:
                self.health.failed(route)
                failures.append(exc)
                log.warning("route %s/%s failed: %s", model.name, route.name, exc.message)
                continue
            self.health.succeeded(route)
            t2 = time.perf_counter()
            try:
                preds = postprocess.predictions(raw, route.output, model.labels, k)
            except ValueError as exc:
                raise BackendBadResponse(route.backend, str(exc)) from None
            if len(preds) != len(images):
                raise BackendBadResponse(route.backend, f"answered {len(preds)} results for {len(images)} images")
            t3 = time.perf_counter()
            timings = {"preprocess": decode_ms + (t1 - t0) * 1e3, "inference": (t2 - t1) * 1e3,
                       "postprocess": (t3 - t2) * 1e3, "total": (t3 - started) * 1e3}
            return Classification(model, route, preds, {name: round(ms, 3) for name, ms in timings.items()})
        raise self._all_failed(model, failures)

    @staticmethod
    def _all_failed(model: ModelSettings, failures: list[BackendError]) -> BackendError:
        if len(failures) == 1:
            return failures[0]
        last = failures[-1]  # its status (503 or 504) and backend stand for the whole request
        err = type(last)(last.backend, "")
        err.message = f"every route of model {model.name!r} failed: " + "; ".join(f.message for f in failures)
        return err
