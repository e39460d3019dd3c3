"""`gateway backends up|down torchserve` and the .mar archives it serves.

TorchServe runs from the venv (Java 17), loopback only, with a private TMPDIR (its PID
file lives there) and logs under ``run/torchserve/logs``. ``torchserve --start`` returns 0
even when it fails, so readiness is judged by the models' worker status (READY), not by
``/ping``.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
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
# archive name -> ONNX file run by onnxruntime in the worker (torchserve/onnx_handler.py): the
# detectors, which the gateway preprocesses and decodes itself (no preprocessing ships with them)
ONNX_ARCHIVES = {"yolox_nano": "onnx/yolox_nano.onnx"}


def _bin(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def build_archives(root: Path, force: bool = False, log=print) -> list[Path]:
    """torch-model-archiver: TorchScript + handler + the gateway's preprocess.py + its spec for
    the classifiers; the ONNX file + torchserve/onnx_handler.py for ONNX_ARCHIVES.

    Idempotent: an archive is rebuilt only when forced, missing, older than any file it
    packs, or when its route's preprocessing in gateway.yaml changed.
    """
    from gateway.config import load_config

    config = load_config(root / "gateway.yaml")
    store = root / "torchserve" / "model_store"
    store.mkdir(parents=True, exist_ok=True)
    built = []
    for name, (model, weights_file) in ARCHIVES.items():
        target = store / f"{name}.mar"
        built.append(target)
        route = next(r for r in config.models[model].routes if config.backends[r.backend].kind == NAME)
        spec = json.dumps(route.preprocess.to_dict(), sort_keys=True)
        inputs = [root / weights_file, root / "gateway" / "preprocess.py",
                  root / "torchserve" / "handler.py", root / "torchserve" / "index_to_name.json"]
        if not inputs[0].is_file():
            raise RuntimeError(f"{inputs[0]} is missing: export the TorchScript model first (`gateway models build`)")
        why = "forced" if force else _stale(target, inputs, spec)
        if not why:
            log(f"keep  {target.relative_to(root)} (exists)")
            continue
        log(f"build {target.relative_to(root)} ({why})")
        with tempfile.TemporaryDirectory(dir=store, prefix=".build-") as tmp:
            spec_file = Path(tmp) / "preprocess.json"
            spec_file.write_text(spec)
            _archive(name, inputs[0], inputs[2], [inputs[1], spec_file, inputs[3]], target, Path(tmp))
    for name, model_file in ONNX_ARCHIVES.items():
        target = store / f"{name}.mar"
        built.append(target)
        inputs = [root / model_file, root / "torchserve" / "onnx_handler.py"]
        if not inputs[0].is_file():
            raise RuntimeError(f"{inputs[0]} is missing: build it first (`gateway models build`)")
        why = "forced" if force else _stale(target, inputs)
        if not why:
            log(f"keep  {target.relative_to(root)} (exists)")
            continue
        log(f"build {target.relative_to(root)} ({why})")
        with tempfile.TemporaryDirectory(dir=store, prefix=".build-") as tmp:
            _archive(name, inputs[0], inputs[1], [], target, Path(tmp))
    return built


def _archive(name: str, serialized: Path, handler: Path, extra: list[Path], target: Path, tmp: Path) -> None:
    """torch-model-archiver in a private staging folder (it stages in $TMPDIR/<model name>,
    shared by concurrent builds, and writes the .mar in place); the .mar is renamed in whole
    so no reader sees half of one."""
    command = [_bin("torch-model-archiver"), "--model-name", name, "--version", "1.0",
               "--serialized-file", str(serialized), "--handler", str(handler),
               "--export-path", str(tmp), "--force"]
    if extra:
        command += ["--extra-files", ",".join(map(str, extra))]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "TMPDIR": str(tmp)})
    if done.returncode != 0:
        raise RuntimeError(f"torch-model-archiver failed for {name}: {done.stderr.strip()[-2000:]}")
    os.replace(tmp / f"{name}.mar", target)


def _stale(target: Path, inputs: list[Path], spec: str | None = None) -> str:
    """Why the archive must be rebuilt, or "" when it is up to date."""
    if not target.is_file():
        return "missing"
    newer = [p.name for p in inputs if p.stat().st_mtime > target.stat().st_mtime]
    if newer:
        return f"older than {', '.join(newer)}"
    if spec is None:
        return ""
    try:
        with zipfile.ZipFile(target) as mar:
            packed = json.dumps(json.loads(mar.read("preprocess.json")), sort_keys=True)
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return "unreadable"
    return "" if packed == spec else "preprocessing changed in gateway.yaml"


def _addresses(config) -> tuple[str, str, str]:
    settings = config.backends[NAME]
    inference = urlparse(settings.url)
    management = settings.options.get("management_url") or f"http://{inference.hostname}:{(inference.port or 8080) + 1}"
    metrics = f"http://{inference.hostname}:{(urlparse(management).port or 8081) + 1}"
    return settings.url, management.rstrip("/"), metrics


def _served(config) -> list[str]:
    """The archives gateway.yaml routes to this server (all of them when none is named)."""
    named = {r.model for m in config.models.values() for r in m.routes if r.backend == NAME}
    every = [*ARCHIVES, *ONNX_ARCHIVES]
    return [n for n in every if n in named] or every


def _key_file(config, run: Path) -> Path | None:
    """Where TorchServe writes its keys (its working directory) when token auth stays on.

    Auth stays on exactly when backends.torchserve names a ``token_file``, which must be that
    file, so the gateway reads the keys this server generated."""
    token_file = config.backends[NAME].options.get("token_file")
    if not token_file:
        return None
    path = Path(token_file) if Path(token_file).is_absolute() else config.root / token_file
    if path.resolve() != (run / "key_file.json").resolve():
        raise RuntimeError(f"backends.{NAME}.token_file is {token_file!r}, but the local TorchServe writes its "
                           f"keys to {run / 'key_file.json'}; point token_file there (or drop it to run "
                           f"without token auth on loopback)")
    return path


def _properties(text: str) -> dict[str, str]:
    """Java .properties -> dict (comments dropped, backslash continuations joined)."""
    props, pending = {}, ""
    for line in text.splitlines():
        line = pending + line.strip()
        pending = ""
        if line.endswith("\\"):
            pending = line[:-1]
            continue
        if line and not line.startswith(("#", "!")) and "=" in line:
            key, value = line.split("=", 1)
            props[key.strip()] = value.strip()
    return props


def _runtime_config(config, run: Path) -> Path:
    """The committed config.properties with addresses from gateway.yaml, token auth on when a
    token_file is configured, and only the archives gateway.yaml routes here."""
    props = _properties((config.root / "torchserve" / "config.properties").read_text())
    props["inference_address"], props["management_address"], props["metrics_address"] = _addresses(config)
    props["disable_token_authorization"] = "false" if _key_file(config, run) else "true"
    served = _served(config)
    props["load_models"] = ",".join(f"{n}.mar" for n in served)
    models = json.loads(props.get("models") or "{}")
    props["models"] = json.dumps({n: models[n] for n in served if n in models})
    path = run / "config.properties"
    path.write_text("".join(f"{k}={v}\n" for k, v in props.items()))
    return path


def _headers(config) -> dict:
    """The management key when token auth is on (the key file appears once TorchServe runs)."""
    run = process.run_dir(config, NAME)
    key_file = _key_file(config, run)
    if key_file is None:
        return {}
    return {"Authorization": f"Bearer {json.loads(key_file.read_text())['management']['key']}"}


def _ready(config) -> bool:
    _, management, _ = _addresses(config)
    headers = _headers(config)
    for name in _served(config):
        resp = requests.get(f"{management}/models/{name}", headers=headers, timeout=2)
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
    missing = [n for n in _served(config) if not (store / f"{n}.mar").is_file()]
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
    (run / "key_file.json").unlink(missing_ok=True)  # a stale one would pass for this server's keys
    env = {**os.environ, "TMPDIR": str(tmp), "TEMP": str(tmp), "LOG_LOCATION": str(logs),
           "METRICS_LOCATION": str(logs), "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
    # torch threads per worker: half the cores, leaving the rest to the gateway's preprocessing
    # (on 2 busy cores, 2 OpenMP threads spin against each other: 1 was 2-6x faster here)
    env.setdefault("GATEWAY_TORCHSERVE_THREADS", str(max(1, (os.cpu_count() or 2) // 2)))
    log.write_bytes(b"")
    cmd = [_bin("torchserve"), "--start", "--foreground", "--ncs", "--ts-config", str(_runtime_config(config, run)),
           "--model-store", str(store)]
    pid = process.spawn(cmd, log, pid_file, env=env, cwd=run)
    try:
        process.wait_until(lambda: _ready(config), timeout, pid, NAME, log)
    except RuntimeError as exc:
        stop(config)
        raise RuntimeError(f"{exc}\nTorchServe's own logs: {logs}/ts_log.log, {logs}/model_log.log") from None


def stop(config) -> None:
    run = process.run_dir(config, NAME)
    pid = process.read_pid(run / "torchserve.pid")
    if pid:
        process.terminate(pid, timeout=20)
    java = process.read_pid(run / "tmp" / ".model_server.pid")  # the frontend, should it outlive the CLI
    if java:
        process.terminate(java, timeout=10)
    (run / "torchserve.pid").unlink(missing_ok=True)
    (run / "key_file.json").unlink(missing_ok=True)


def status(config) -> dict:
    run = process.run_dir(config, NAME)
    pid = process.read_pid(run / "torchserve.pid")
    try:
        ready = pid is not None and _ready(config)
    except (requests.RequestException, OSError, ValueError, KeyError, RuntimeError):
        ready = False
    inference, management, _ = _addresses(config)
    return {"running": pid is not None, "pid": pid, "ready": ready, "url": inference,
            "management_url": management, "models": _served(config), "log": str(run / "logs" / "ts_log.log")}
