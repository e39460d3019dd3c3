"""Shared fixtures: real gateway processes (gunicorn) and the test photos.

``start_gateway(config)`` runs ``gateway serve`` exactly as a user would, on a free
loopback port, and stops it at the end of the session.
"""
from __future__ import annotations

import copy
import io
import uuid
from pathlib import Path

import pytest
import yaml

from gateway.servers.local_gateway import LocalGateway, free_port  # noqa: F401 (re-exported)

ROOT = Path(__file__).resolve().parent.parent
RUN_DIR = ROOT / "run" / "tests"


def load_yaml_config() -> dict:
    """A fresh, modifiable dict of the repository's gateway.yaml."""
    return copy.deepcopy(_DEFAULT_CONFIG)


_DEFAULT_CONFIG = yaml.safe_load((ROOT / "gateway.yaml").read_text())


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


class GatewayProcess(LocalGateway):
    """A real `gateway serve` on a config dict (written under run/tests/) or file."""

    def __init__(self, config: dict | Path, workers: int = 1, threads: int = 4):
        path = write_config(config)
        super().__init__(path, workers=workers, threads=threads, log_path=RUN_DIR / f"gateway-{path.stem}.log")

    def stop(self) -> None:
        super().stop()
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
def triton_server():
    """The real tritonserver on gateway.yaml's ports, started once; one already started by
    `gateway backends up` is reused and kept. A test that stops it starts it again."""
    from gateway.config import load_config
    from gateway.servers import triton as launcher

    config = load_config(ROOT / "gateway.yaml")
    was_running = launcher.status(config)["running"]
    launcher.start(config, timeout=300)
    yield config
    if not was_running:
        launcher.stop(config)
        assert not launcher.status(config)["running"]


@pytest.fixture(scope="session")
def torchserve_server():
    """The real TorchServe on gateway.yaml's ports, started once and stopped at the end."""
    from gateway.config import load_config
    from gateway.servers import torchserve as launcher

    config = load_config(ROOT / "gateway.yaml")
    launcher.start(config, timeout=300)
    yield config
    launcher.stop(config)
    assert not launcher.status(config)["running"]


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


@pytest.fixture(scope="session")
def photos(chelsea_jpeg, coffee_jpeg) -> list[bytes]:
    """[chelsea, coffee] as JPEG: a cat and an espresso."""
    return [chelsea_jpeg, coffee_jpeg]


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
