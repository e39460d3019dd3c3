"""`gateway backends up|down torchserve` and the .mar archives it serves.

TorchServe runs from the venv (Java 17), loopback only, with a private TMPDIR (its PID
file lives there) and logs under ``run/torchserve/logs``. ``torchserve --start`` returns 0
even when it fails, so readiness is judged by the models' worker status (READY), not by
``/ping``.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from urllib.parse import urlparse

import requests

from gateway.servers import process

NAME = "torchserve"
# archive name -> (gateway model whose torchserve route it serves, TorchScript file)
ARCHIVES = {
    "mobilenet": ("mobilenet_v2", "model_repository/torchmobilenet/1/model.pt"),
    "efficientnet_lite0": ("efficientnet_lite0", "model_repository/efficientnet_lite0/1/model.pt"),
}


def _bin(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def build_archives(root: Path, force: bool = False, log=print) -> list[Path]:
    """torch-model-archiver: TorchScript + handler + the gateway's preprocess.py + its spec."""
    from gateway.config import load_config

    config = load_config(root / "gateway.yaml")
    store = root / "torchserve" / "model_store"
    store.mkdir(parents=True, exist_ok=True)
    built = []
    for name, (model, weights_file) in ARCHIVES.items():
        target = store / f"{name}.mar"
        built.append(target)
        if target.is_file() and not force:
            log(f"keep  {target.relative_to(root)}")
            continue
        log(f"build {target.relative_to(root)}")
        route = next(r for r in config.models[model].routes if config.backends[r.backend].kind == NAME)
        with tempfile.TemporaryDirectory() as tmp:
            spec_file = Path(tmp) / "preprocess.json"
            spec_file.write_text(json.dumps(route.preprocess.to_dict()))
            extra = [root / "gateway" / "preprocess.py", spec_file, root / "torchserve" / "index_to_name.json"]
            subprocess.run([
                _bin("torch-model-archiver"), "--model-name", name, "--version", "1.0",
                "--serialized-file", str(root / weights_file), "--handler", str(root / "torchserve" / "handler.py"),
                "--extra-files", ",".join(map(str, extra)), "--export-path", str(store), "--force",
            ], check=True, capture_output=True)
    return built


def _addresses(config) -> tuple[str, str, str]:
    settings = config.backends[NAME]
    inference = urlparse(settings.url)
    management = settings.options.get("management_url") or f"http://{inference.hostname}:{(inference.port or 8080) + 1}"
    metrics = f"http://{inference.hostname}:{(urlparse(management).port or 8081) + 1}"
    return settings.url, management.rstrip("/"), metrics


def _runtime_config(config, run: Path) -> Path:
    """The committed config.properties with addresses from gateway.yaml."""
    inference, management, metrics = _addresses(config)
    text = (config.root / "torchserve" / "config.properties").read_text()
    for key, value in (("inference_address", inference), ("management_address", management),
                       ("metrics_address", metrics)):
        text = re.sub(rf"^{key}=.*$", f"{key}={value}", text, flags=re.M)
    path = run / "config.properties"
    path.write_text(text)
    return path


def _ready(config) -> bool:
    _, management, _ = _addresses(config)
    for name in ARCHIVES:
        resp = requests.get(f"{management}/models/{name}", timeout=2)
        if resp.status_code != 200:
            return False
        workers = [w for entry in resp.json() for w in entry.get("workers", [])]
        if not workers or any(w.get("status") != "READY" for w in workers):
            return False
    return True


def start(config, timeout: float = 180.0) -> None:
    run = process.run_dir(config, NAME)
    pid_file, log = run / "torchserve.pid", run / "torchserve.log"
    if process.read_pid(pid_file):
        process.wait_until(lambda: _ready(config), timeout, process.read_pid(pid_file), NAME, log)
        return
    store = config.root / "torchserve" / "model_store"
    missing = [n for n in ARCHIVES if not (store / f"{n}.mar").is_file()]
    if missing:
        raise RuntimeError(f"missing archives {missing} in {store}; run `gateway models build`")
    inference, _, _ = _addresses(config)
    try:
        requests.get(f"{inference}/ping", timeout=1)
        raise RuntimeError(f"another server already answers on {inference}; stop it or change backends.torchserve.url")
    except requests.RequestException:
        pass
    tmp, logs = run / "tmp", run / "logs"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    logs.mkdir(exist_ok=True)
    env = {**os.environ, "TMPDIR": str(tmp), "TEMP": str(tmp), "LOG_LOCATION": str(logs),
           "METRICS_LOCATION": str(logs), "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
    log.write_bytes(b"")
    cmd = [_bin("torchserve"), "--start", "--foreground", "--ncs", "--ts-config", str(_runtime_config(config, run)),
           "--model-store", str(store)]
    pid = process.spawn(cmd, log, pid_file, env=env, cwd=run)
    try:
        process.wait_until(lambda: _ready(config), timeout, pid, NAME, log)
    except RuntimeError:
        stop(config)
        raise


def stop(config) -> None:
    run = process.run_dir(config, NAME)
    pid = process.read_pid(run / "torchserve.pid")
    if pid:
        process.terminate(pid, timeout=20)
    java = process.read_pid(run / "tmp" / ".model_server.pid")  # the frontend, should it outlive the CLI
    if java:
        process.terminate(java, timeout=10)
    (run / "torchserve.pid").unlink(missing_ok=True)


def status(config) -> dict:
    run = process.run_dir(config, NAME)
    pid = process.read_pid(run / "torchserve.pid")
    try:
        ready = _ready(config)
    except requests.RequestException:
        ready = False
    inference, management, _ = _addresses(config)
    return {"running": pid is not None, "pid": pid, "ready": ready, "url": inference,
            "management_url": management, "log": str(run / "logs" / "ts_log.log")}
