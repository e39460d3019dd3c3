"""Shared fixtures: real gateway processes (gunicorn) and the test photos.

``start_gateway(config)`` runs ``gateway serve`` exactly as a user would, on a free
loopback port, and stops it at the end of the session.
"""
from __future__ import annotations

import copy
import io
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import requests
import yaml

ROOT = Path(__file__).resolve().parent.parent
RUN_DIR = ROOT / "run" / "tests"


def load_yaml_config() -> dict:
    """A fresh, modifiable dict of the repository's gateway.yaml."""
    return copy.deepcopy(_DEFAULT_CONFIG)


_DEFAULT_CONFIG = yaml.safe_load((ROOT / "gateway.yaml").read_text())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_config(config: dict | Path) -> Path:
    """Write a config dict under run/tests/, its relative paths made absolute against the repo."""
    if isinstance(config, Path):
        return config
    config = copy.deepcopy(config)
    server = config.setdefault("server", {})
    server["artifacts"] = str(ROOT / server.get("artifacts", "artifacts.json"))
    for backend in config.get("backends", {}).values():
        if "model_dir" in backend:
            backend["model_dir"] = str(ROOT / backend["model_dir"])
    for model in config.get("models", {}).values():
        if model.get("labels", "imagenet") != "imagenet":
            model["labels"] = str(ROOT / model["labels"])
    RUN_DIR.mkdir(parents=True, exist_ok=True)
    path = RUN_DIR / f"gateway-{uuid.uuid4().hex[:8]}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


class GatewayProcess:
    def __init__(self, config: dict | Path, workers: int = 1, threads: int = 4):
        self.config_path = write_config(config)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = RUN_DIR / f"gateway-{self.port}.log"
        RUN_DIR.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gateway", "serve", "--config", str(self.config_path),
                 "--port", str(self.port), "--workers", str(workers), "--threads", str(threads)],
                cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self._wait_ready()

    def _wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited ({self.proc.returncode}): {self.log()}")
            try:
                if requests.get(self.url + "/healthz", timeout=1).ok:
                    return
            except requests.ConnectionError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"gateway not up after {timeout}s: {self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        if self.config_path.parent == RUN_DIR:
            self.config_path.unlink(missing_ok=True)


@pytest.fixture(scope="session")
def start_gateway():
    """Factory: start_gateway(config: dict | Path, workers=1) -> base URL."""
    started: list[GatewayProcess] = []

    def start(config: dict | Path = ROOT / "gateway.yaml", workers: int = 1, threads: int = 4) -> str:
        proc = GatewayProcess(config, workers=workers, threads=threads)
        started.append(proc)
        return proc.url

    start.processes = started
    yield start
    for proc in started:
        proc.stop()


@pytest.fixture(scope="session")
def gateway_url(start_gateway) -> str:
    """The gateway on the default gateway.yaml (embedded backend first), 2 workers like `make serve`."""
    return start_gateway(ROOT / "gateway.yaml", workers=2)


def jpeg_bytes(array, quality: int = 95) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


@pytest.fixture(scope="session")
def chelsea_jpeg() -> bytes:
    from skimage import data

    return jpeg_bytes(data.chelsea())


@pytest.fixture(scope="session")
def coffee_jpeg() -> bytes:
    from skimage import data

    return jpeg_bytes(data.coffee())


def route_of(gw, model: str, name: str):
    """The route called ``name`` of a gateway model."""
    return next(r for r in gw.config.models[model].routes if r.name == name)


def preprocessed(gw, model: str, name: str, photos: list[bytes]):
    """(route, batch): photos decoded and preprocessed exactly as the gateway does for that route."""
    import numpy as np

    from gateway.preprocess import preprocess_image

    r = route_of(gw, model, name)
    images = gw.decode(photos, gw.config.models[model])
    return r, np.stack([preprocess_image(im, r.preprocess) for im in images])
