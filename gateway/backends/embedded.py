"""ONNX Runtime in this process: the default backend, needs no server at all."""
from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np

from gateway.backends.base import Backend
from gateway.errors import BackendBadResponse, BackendRejected, BackendUnavailable


def default_threads() -> int:
    """Intra-op threads per process: the cores divided among the WSGI workers.

    ``gateway serve`` exports GATEWAY_WORKERS so N workers on C cores each take C/N
    threads instead of all of them fighting for every core.
    """
    workers = max(1, int(os.environ.get("GATEWAY_WORKERS", "1") or 1))
    return max(1, (os.cpu_count() or 1) // workers)


class EmbeddedBackend(Backend):
    kind = "embedded"
    options = {"model_dir": "onnx", "intra_op_threads": 0}

    def __init__(self, settings):
        super().__init__(settings)
        self._sessions: dict[str, object] = {}
        self._errors: dict[str, str] = {}
        self._lock = threading.Lock()

    def model_path(self, route) -> Path:
        model_dir = Path(self.settings.options["model_dir"])
        if not model_dir.is_absolute():
            model_dir = self.root / model_dir
        return model_dir / f"{route.model}.onnx"

    def load(self, routes) -> None:
        for route in routes:
            self._session(route)

    def _session(self, route):
        session = self._sessions.get(route.model)
        if session is not None:
            return session
        with self._lock:
            if route.model in self._sessions:
                return self._sessions[route.model]
            path = self.model_path(route)
            if not path.is_file():
                self._errors[route.model] = f"model file {path} is missing; run `gateway models build`"
                return None
            import onnxruntime as ort

            opts = ort.SessionOptions()
            opts.intra_op_num_threads = self.settings.options["intra_op_threads"] or default_threads()
            opts.inter_op_num_threads = 1
            opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
            try:
                session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
            except Exception as exc:  # a corrupt file must not stop the gateway
                self._errors[route.model] = f"cannot load {path}: {exc}"
                return None
            self._errors.pop(route.model, None)
            self._sessions[route.model] = session
            return session

    def ready(self, route) -> bool:
        return self._session(route) is not None

    def infer(self, route, batch: np.ndarray) -> np.ndarray:
        session = self._session(route)
        if session is None:
            raise BackendUnavailable(self.name, f"model {route.model!r} not loaded: {self._errors.get(route.model)}")
        inp = session.get_inputs()[0]
        name = route.input_name or inp.name
        out_name = route.output_name or session.get_outputs()[0].name
        try:
            (out,) = session.run([out_name], {name: batch})
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidArgument types
            raise BackendRejected(self.name, f"model {route.model!r} rejected the input: {exc}") from None
        if not isinstance(out, np.ndarray) or out.shape[0] != batch.shape[0]:
            raise BackendBadResponse(self.name, f"model {route.model!r} returned an unexpected output")
        return out

    def metadata(self, route) -> dict:
        session = self._session(route)
        if session is None:
            return {"error": self._errors.get(route.model)}
        describe = lambda t: {"name": t.name, "shape": list(t.shape), "datatype": t.type}  # noqa: E731
        return {
            "platform": "onnxruntime",
            "file": str(self.model_path(route)),
            "inputs": [describe(t) for t in session.get_inputs()],
            "outputs": [describe(t) for t in session.get_outputs()],
            "intra_op_threads": session.get_session_options().intra_op_num_threads,
        }

    def close(self) -> None:
        self._sessions.clear()
