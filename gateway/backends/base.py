"""The one small interface every backend implements (after MLServer's ``MLModel``).

A backend is one serving engine (an ONNX Runtime in this process, a Triton server, ...).
It serves the models named by routes: ``infer(route, batch)`` takes a preprocessed
batch (N, ...) ndarray and returns the model's raw (N, classes) output.  Backends raise
``gateway.errors.Backend*`` errors only, so the HTTP layer maps faults uniformly.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from gateway.config import BackendSettings, Route


class Backend:
    kind: str = ""
    root: Path = Path(".")  # the config file's folder; the gateway sets it before load()

    def __init__(self, settings: "BackendSettings"):
        self.settings = settings
        self.name = settings.name

    def load(self, routes: list["Route"]) -> None:
        """Prepare to serve these routes (open sessions, connection pools). Must not raise
        for a backend that is merely down: ``ready`` reports that, ``infer`` raises."""

    def ready(self, route: "Route") -> bool:
        """Whether ``route.model`` can be served right now (cheap, bounded by timeouts)."""
        raise NotImplementedError

    def infer(self, route: "Route", batch: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def metadata(self, route: "Route") -> dict[str, Any]:
        """What the engine says about the model (inputs, outputs, platform, versions)."""
        return {}

    def close(self) -> None:
        """Release connections and sessions."""
