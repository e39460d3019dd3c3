"""A model's routes and which of them a request may take.

A route is one way to serve a model: an engine (``backend``), the engine's name for the model,
and the preprocessing and output meaning of that engine's copy. ``choose`` applies a request's
``?route=`` (by name) and the older ``?backend=`` (by engine) to a model's routes.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from gateway.errors import NotFound
from gateway.preprocess import PreprocessSpec


@dataclass(frozen=True)
class Route:
    model: str  # the gateway's model
    name: str  # what ?route= names
    backend: str  # a key of GatewayConfig.backends
    backend_model: str  # the engine's name for the model
    preprocess: PreprocessSpec
    output: str  # logits | probabilities: what this route's engine returns
    version: str | None = None
    input_name: str | None = None  # None: learn from the engine's metadata
    output_name: str | None = None


def choose(model: str, routes: Sequence[Route], route: str | None = None, backend: str | None = None) -> list[Route]:
    """The routes to try in order: all of them, or the one forced by its name (``route``), by its
    engine (``backend``), or by both. ``backend`` naming a route (not an engine) is the deprecated
    spelling of ``route`` and still works. A 404 lists the model's routes."""
    if route is None and backend is None:
        return list(routes)
    chosen = list(routes)
    if route is not None:
        chosen = [r for r in chosen if r.name == route]
    if backend is not None:
        chosen = [r for r in chosen if r.backend == backend] or \
                 ([r for r in chosen if r.name == backend] if route is None else [])
    if chosen:
        return chosen[:1]
    asked = " on ".join(f"{k} {v!r}" for k, v in (("route", route), ("backend", backend)) if v is not None)
    raise NotFound(f"model {model!r} has no {asked}; its routes: "
                   + ", ".join(f"{r.name} ({r.backend})" for r in routes), code="unknown_backend")
