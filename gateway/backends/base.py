"""The one small interface every backend implements (after MLServer's ``MLModel``).

A backend is one serving engine (an ONNX Runtime in this process, a Triton server, ...).
Each kind declares its options as a ``Settings`` model, validated with the rest of
gateway.yaml, and is constructed with its name and those settings. ``infer(route, batch)``
takes a preprocessed (N, ...) batch and returns the model's raw (N, ...) output: batches
larger than what the engine takes are split here, once for every engine, and each slice's
answer is checked for one row per image. Backends raise ``gateway.errors.Backend*`` only,
so every engine's faults reach the client alike.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from gateway.errors import BackendBadResponse
from gateway.settings import HttpUrl, NonNegInt, PosFloat, PosInt, Settings

if TYPE_CHECKING:
    from gateway.routing import Route


class BackendSettings(Settings):
    kind: str


class RemoteSettings(BackendSettings):
    """What every backend behind a URL has."""

    url: HttpUrl
    connect_timeout_s: PosFloat = 2.0
    timeout_s: PosFloat = 30.0
    pool_size: PosInt = 256  # kept-alive connections per engine: sized for the in-flight bounds (admission)
    max_batch_size: NonNegInt = 0  # images per call at most (0: the engine's own limit, or none)


def split_batches(batch: np.ndarray, limit: int) -> list[np.ndarray]:
    """``batch`` in slices of at most ``limit`` rows (0: one slice)."""
    if not limit or len(batch) <= limit:
        return [batch]
    return [batch[i:i + limit] for i in range(0, len(batch), limit)]


class Backend:
    Settings: ClassVar[type[BackendSettings]] = BackendSettings

    def __init__(self, name: str, settings: BackendSettings):
        self.name = name
        self.settings = settings

    def load(self, routes: list[Route]) -> None:
        """Prepare to serve these routes (open sessions, connection pools). Must not raise
        for a backend that is merely down: ``ready`` reports that, ``infer`` raises."""

    def ready(self, route: Route) -> bool:
        """Whether ``route.backend_model`` can be served right now (cheap, bounded by timeouts)."""
        raise NotImplementedError

    def max_batch_size(self, route: Route) -> int:
        """Images per call the engine takes for this route (0: any number)."""
        return int(getattr(self.settings, "max_batch_size", 0))

    def infer(self, route: Route, batch: np.ndarray) -> np.ndarray:
        outputs = []
        for chunk in split_batches(batch, self.max_batch_size(route)):
            out = self.infer_batch(route, chunk)
            if not isinstance(out, np.ndarray) or out.ndim < 1 or out.shape[0] != len(chunk):
                shape = getattr(out, "shape", type(out).__name__)
                raise BackendBadResponse(self.name, f"model {route.backend_model!r} answered {shape} "
                                                    f"for {len(chunk)} images")
            outputs.append(out)
        return outputs[0] if len(outputs) == 1 else np.concatenate(outputs)

    def infer_batch(self, route: Route, batch: np.ndarray) -> np.ndarray:
        """One call to the engine with at most ``max_batch_size`` images."""
        raise NotImplementedError

    def metadata(self, route: Route) -> dict[str, Any]:
        """What the engine says about the model (inputs, outputs, platform, versions)."""
        return {}

    def close(self) -> None:
        """Release connections and sessions."""
