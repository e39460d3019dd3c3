"""Shared fixtures: the app in process (most API tests), a few real gateway processes
(gunicorn, for what only a socket shows), the real Triton and TorchServe servers, photos.

``make_api(config)`` builds the Flask app on a config dict (or the repository's
gateway.yaml) and returns a ``helpers.Api``; ``start_gateway(config)`` runs ``gateway
serve`` exactly as a user would, on a free loopback port, stopped at the end of the session.
"""
from __future__ import annotations

import copy
import importlib
import os
import subprocess
import sys
import textwrap
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
import yaml

from gateway.config import PACKAGE_LABELS, GatewayConfig, load_config, parse_config
from gateway.tools.local_gateway import LocalGateway, free_port

from helpers import Api, jpeg_bytes

ROOT = Path(__file__).resolve().parent.parent
RUN_DIR = ROOT / "run" / "tests"
_DEFAULT_CONFIG = yaml.safe_load((ROOT / "gateway.yaml").read_text())


def load_yaml_config() -> dict:
    """A fresh, modifiable dict of the repository's gateway.yaml."""
    return copy.deepcopy(_DEFAULT_CONFIG)


def config_of(data: dict | None = None) -> GatewayConfig:
    """A validated config from a dict (relative paths against the repository), or gateway.yaml."""
    return load_config(ROOT / "gateway.yaml") if data is None else parse_config(copy.deepcopy(data), ROOT)


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
        if model.get("labels", "imagenet") not in PACKAGE_LABELS:
            model["labels"] = str(ROOT / model["labels"])
    RUN_DIR.mkdir(parents=True, exist_ok=True)
    path = RUN_DIR / f"gateway-{uuid.uuid4().hex[:8]}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def free_port_block(count: int) -> int:
    """The first of ``count`` consecutive free loopback ports below the kernel's ephemeral range
    (ports a server binds again after a restart must not be lent to clients' connections meanwhile)."""
    import random
    import socket

    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for _ in range(200):
        base = random.randrange(20000, min(low, 32768) - count)
        try:
            sockets = [socket.socket() for _ in range(count)]
            for offset, s in enumerate(sockets):
                s.bind(("127.0.0.1", base + offset))
            return base
        except OSError:
            continue
        finally:
            for s in sockets:
                s.close()
    raise RuntimeError(f"no {count} consecutive free ports below {low}")


@pytest.fixture(scope="session")
def make_api():
    """Factory: make_api(config dict | GatewayConfig | None, backends=None, health=None) -> helpers.Api."""
    from gateway.app import create_app
    from gateway.service import Gateway

    made = []

    def make(config=None, backends: dict | None = None, health=None) -> Api:
        if not isinstance(config, GatewayConfig):
            config = config_of(config)
        gateway = Gateway(config, backends=backends, health=health)
        gateway.load()
        made.append(gateway)
        return Api(create_app(config, gateway))

    yield make
    for gateway in made:
        gateway.close()


@pytest.fixture(scope="session")
def api(make_api) -> Api:
    """The app on the repository's gateway.yaml (embedded backend first)."""
    return make_api()


@pytest.fixture(scope="session")
def serve_api():
    """Factory: serve_api(api) -> base URL of a threaded werkzeug server on that app, for
    clients that need a URL (batch, the CLI) without the cost of a gateway process."""
    import threading

    from werkzeug.serving import make_server

    servers = []

    def serve(api: Api) -> str:
        server = make_server("127.0.0.1", 0, api.app, threaded=True)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_port}"

    yield serve
    for server in servers:
        server.shutdown()


class GatewayProcess(LocalGateway):
    """A real `gateway serve` on a config dict (written under run/tests/) or file."""

    def __init__(self, config: dict | Path, workers: int = 1, threads: int = 4, grpc_port: int = 0):
        path = write_config(config)
        super().__init__(path, workers=workers, threads=threads, log_path=RUN_DIR / f"gateway-{path.stem}.log",
                         grpc_port=grpc_port)

    def stop(self) -> None:
        super().stop()
        if self.config_path.parent == RUN_DIR:
            self.config_path.unlink(missing_ok=True)


@pytest.fixture(scope="session")
def start_gateway():
    """Factory: start_gateway(config: dict | Path, workers=1, grpc_port=0) -> base URL of a real
    process (its V2 gRPC front on ``grpc_port``; 0: off)."""
    started: list[GatewayProcess] = []

    def start(config: dict | Path = ROOT / "gateway.yaml", workers: int = 1, threads: int = 4,
              grpc_port: int = 0) -> str:
        proc = GatewayProcess(config, workers=workers, threads=threads, grpc_port=grpc_port)
        started.append(proc)
        return proc.url

    yield start
    for proc in started:
        proc.stop()


@pytest.fixture(scope="session")
def gateway_url(start_gateway) -> str:
    """A real gateway process on the default gateway.yaml, 2 workers like `make serve`."""
    return start_gateway(ROOT / "gateway.yaml", workers=2)


# The real servers start in the background as soon as the collected tests show they are needed,
# while the tests that need none run (the test process keeps one core busy, their start-up the
# other); their fixtures wait for that start.
_STARTING: dict[str, Future] = {}
SERVERS = {"triton_server": "triton", "torchserve_server": "torchserve"}


@pytest.hookimpl(trylast=True)  # after -k / -m deselection: only what will run
def pytest_collection_modifyitems(session, config, items):
    needed = {name for item in items for name in getattr(item, "fixturenames", ()) if name in SERVERS}
    if needed:
        pool = ThreadPoolExecutor(len(needed), thread_name_prefix="server-start")
        for name in sorted(needed):
            _STARTING[name] = pool.submit(_start, SERVERS[name])
        pool.shutdown(wait=False)


def pytest_sessionfinish(session, exitstatus):
    """A server started for tests that never ran (stopped early, -x) is stopped too."""
    for name, started in list(_STARTING.items()):
        try:
            was_running = started.result()
        except Exception:
            was_running = False
        if not was_running:
            launcher = importlib.import_module(f"gateway.ops.servers.{SERVERS[name]}")
            launcher.stop(load_config(ROOT / "gateway.yaml"))
    _STARTING.clear()


def _start(kind: str) -> bool:
    """Start the gateway.yaml backend of this kind; whether one was already running."""
    launcher = importlib.import_module(f"gateway.ops.servers.{kind}")
    config = load_config(ROOT / "gateway.yaml")
    was_running = launcher.status(config)["running"]
    launcher.start(config, timeout=300)
    return was_running


def _server(name: str):
    """(config, was it running before the tests): the server, started (or being started) once."""
    started = _STARTING.pop(name, None)
    was_running = started.result() if started is not None else _start(SERVERS[name])
    return load_config(ROOT / "gateway.yaml"), was_running


@pytest.fixture(scope="session")
def triton_server():
    """The real tritonserver on gateway.yaml's ports, started once; one already started by
    `gateway backends up` is reused and kept."""
    from gateway.ops.servers import triton as launcher

    config, was_running = _server("triton_server")
    yield config
    if not was_running:
        launcher.stop(config)
        assert not launcher.status(config)["running"]


@pytest.fixture(scope="session")
def torchserve_server():
    """The real TorchServe on gateway.yaml's ports, started once and stopped at the end. A test
    that stops it starts it again."""
    from gateway.ops.servers import torchserve as launcher

    config, _ = _server("torchserve_server")
    yield config
    launcher.stop(config)
    assert not launcher.status(config)["running"]


V2_MODEL = textwrap.dedent("""
    import sys, tensorflow as tf
    class M(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, 224, 224, 3], tf.float32, name="input_1")])
        def serve(self, input_1):
            n = tf.shape(input_1)[0]
            logits = tf.one_hot(tf.fill([n], 7), 1000) * 10.0 + tf.reduce_mean(input_1) * 0.0
            return {"predictions": tf.nn.softmax(logits)}
    m = M()
    tf.saved_model.save(m, sys.argv[1], signatures={"serving_default": m.serve})
""")


@pytest.fixture(scope="session")
def tfserving_models(tmp_path_factory):
    """tfmobilenet/1 = the real SavedModel; tfmobilenet/2 = a tiny model that always says class 7;
    efficientnet_lite0/1 = the real SavedModel (gateway.yaml routes it to TF Serving too)."""
    models = tmp_path_factory.mktemp("tfserving_models")
    (models / "tfmobilenet").mkdir()
    os.symlink(ROOT / "tfserving/models/tfmobilenet/1", models / "tfmobilenet" / "1")
    (models / "efficientnet_lite0").mkdir()
    os.symlink(ROOT / "tfserving/models/efficientnet_lite0/1", models / "efficientnet_lite0" / "1")
    subprocess.run([sys.executable, "-c", V2_MODEL, str(models / "tfmobilenet" / "2")], check=True,
                   capture_output=True, timeout=180)
    return models


@pytest.fixture(scope="session")
def tfserving_double(tfserving_models):
    """The TF Serving TEST DOUBLE (tests/tfserving_double.py: real SavedModels in real TensorFlow,
    TF Serving's REST and gRPC shapes) on tfserving_models: (REST URL, gRPC port)."""
    port, grpc_port = free_port(), free_port()
    (ROOT / "run" / "tests").mkdir(parents=True, exist_ok=True)
    log = open(ROOT / "run" / "tests" / "tfserving_double.log", "wb")  # noqa: SIM115 (the double writes until the end)
    proc = subprocess.Popen([sys.executable, str(ROOT / "tests/tfserving_double.py"), "--models-dir",
                             str(tfserving_models), "--port", str(port), "--grpc-port", str(grpc_port)],
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if requests.get(f"{url}/v1/models/tfmobilenet", timeout=1).ok:
                break
        except requests.ConnectionError:
            pass
        time.sleep(0.3)
    else:
        proc.kill()
        pytest.fail(f"TF Serving double did not start: {(ROOT / 'run/tests/tfserving_double.log').read_text()[-2000:]}")
    yield url, grpc_port
    proc.terminate()
    proc.wait(10)
    log.close()


@pytest.fixture(scope="session")
def chelsea_jpeg() -> bytes:
    from skimage import data

    return jpeg_bytes(data.chelsea())


@pytest.fixture(scope="session")
def coffee_jpeg() -> bytes:
    from skimage import data

    return jpeg_bytes(data.coffee())


@pytest.fixture(scope="session")
def scene_photos() -> dict[str, bytes]:
    """scikit-image's astronaut (a person), coffee (a cup) and chelsea (a cat) as JPEG (quality 98)."""
    from PIL import Image
    from skimage import data

    from helpers import encode

    return {name: encode(Image.fromarray(getattr(data, name)()), "JPEG", quality=98)
            for name in ("astronaut", "coffee", "chelsea")}


@pytest.fixture(scope="session")
def photos(chelsea_jpeg, coffee_jpeg) -> list[bytes]:
    """[chelsea, coffee] as JPEG: a cat and an espresso."""
    return [chelsea_jpeg, coffee_jpeg]
