"""ONNX Runtime in this process: the default backend, needs no server at all."""
from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Literal

import numpy as np

from gateway import cores
from gateway.backends.base import Backend, BackendSettings
from gateway.errors import BackendRejected, BackendUnavailable
from gateway.settings import ConfigPath, NonNegInt


class EmbeddedSettings(BackendSettings):
    kind: Literal["embedded"]
    model_dir: ConfigPath = Path("onnx")  # <model_dir>/<backend_model>.onnx
    intra_op_threads: NonNegInt = 0  # 0: every core for a request alone, else the cores / the workers (gateway.cores)
    max_batch_size: NonNegInt = 0  # 0: as the model's input allows (a fixed batch dimension is a limit)


def default_threads() -> int:
    """Intra-op threads per process: the cores divided among the WSGI workers.

    ``gateway serve`` exports GATEWAY_WORKERS so N workers on C cores each take C/N
    threads instead of all of them fighting for every core.
    """
    workers = max(1, int(os.environ.get("GATEWAY_WORKERS", "1") or 1))
    return max(1, (os.cpu_count() or 1) // workers)


class EmbeddedBackend(Backend):
    """One ONNX Runtime session per model; with ``intra_op_threads`` 0 and more cores than a
    worker's share, a second, wide one: a request alone in the server runs on every core (its
    latency halves on 2 cores), one among others on the worker's share (measured on 2 cores:
    throughput of 2 busy workers 5% lower with 2 threads each, 4x slower with ONNX Runtime's
    spinning threads, so the wide session does not spin)."""

    Settings = EmbeddedSettings
    settings: EmbeddedSettings

    def __init__(self, name: str, settings: EmbeddedSettings):
        super().__init__(name, settings)
        self._sessions: dict[str, object] = {}
        self._wide: dict[str, object] = {}  # every core, for a request alone (gateway.cores)
        self._errors: dict[str, str] = {}
        self._lock = threading.Lock()

    def model_path(self, route) -> Path:
        return self.settings.model_dir / f"{route.backend_model}.onnx"

    def load(self, routes) -> None:
        for route in routes:
            self._session(route)

    def _session(self, route):
        session = self._sessions.get(route.backend_model)
        if session is not None:
            return session
        with self._lock:
            if route.backend_model in self._sessions:
                return self._sessions[route.backend_model]
            path = self.model_path(route)
            if not path.is_file():
                self._errors[route.backend_model] = f"model file {path} is missing; run `gateway models build`"
                return None
            narrow, wide = self.settings.intra_op_threads or default_threads(), os.cpu_count() or 1
            try:
                session = _open(path, narrow, spin=True)  # ONNX Runtime's default
                if not self.settings.intra_op_threads and wide > narrow:
                    self._wide[route.backend_model] = _open(path, wide, spin=False)
            except Exception as exc:  # a corrupt file must not stop the gateway
                self._errors[route.backend_model] = f"cannot load {path}: {exc}"
                return None
            self._errors.pop(route.backend_model, None)
            self._sessions[route.backend_model] = session
            return session

    def _loaded(self, route):
        session = self._session(route)
        if session is None:
            raise BackendUnavailable(self.name, f"model {route.backend_model!r} not loaded: "
                                                f"{self._errors.get(route.backend_model)}")
        return session

    def ready(self, route) -> bool:
        return self._session(route) is not None

    def max_batch_size(self, route) -> int:
        session = self._session(route)
        fixed = session.get_inputs()[0].shape[0] if session is not None else None
        if isinstance(fixed, int) and fixed > 0:  # an exported graph with a frozen batch dimension
            return min(fixed, self.settings.max_batch_size or fixed)
        return self.settings.max_batch_size

    def infer_batch(self, route, batch: np.ndarray) -> np.ndarray:
        session = self._loaded(route)
        if cores.alone():
            session = self._wide.get(route.backend_model, session)
        name = route.input_name or session.get_inputs()[0].name
        out_name = route.output_name or session.get_outputs()[0].name
        try:
            (out,) = session.run([out_name], {name: batch})
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidArgument types
            raise BackendRejected(self.name, f"model {route.backend_model!r} rejected the input: {exc}") from None
        return out

    def metadata(self, route) -> dict:
        session = self._session(route)
        if session is None:
            return {"error": self._errors.get(route.backend_model)}
        describe = lambda t: {"name": t.name, "shape": list(t.shape), "datatype": t.type}
        return {
            "platform": "onnxruntime",
            "file": str(self.model_path(route)),
            "inputs": [describe(t) for t in session.get_inputs()],
            "outputs": [describe(t) for t in session.get_outputs()],
            "intra_op_threads": session.get_session_options().intra_op_num_threads,
            "intra_op_threads_alone": self._wide.get(route.backend_model, session)
            .get_session_options().intra_op_num_threads,  # type: ignore[attr-defined]
        }

    def close(self) -> None:
        self._sessions.clear()
        self._wide.clear()


def _open(path: Path, threads: int, spin: bool):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if not spin:  # idle threads sleep: spinning ones would take the cores other requests need
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
