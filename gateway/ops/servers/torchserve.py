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

from gateway.ops.export.table import torchserve_archives
from gateway.ops.servers import process

NAME = "torchserve"
# From the build table (gateway/ops/export/table.py): archive name (the route's backend_model) ->
# the TorchScript file it packs; and archive name -> ONNX file run by onnxruntime in the worker
# (torchserve/onnx_handler.py): the detectors and the int8 models, which the gateway preprocesses
# (and decodes) itself, so no preprocessing ships with them
ARCHIVES, ONNX_ARCHIVES = torchserve_archives()


def _bin(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def _archive_routes(config, archives) -> dict:
    """archive name -> the first route that serves it from a TorchServe backend (a classifier's
    preprocessing is the spec its handler ships)."""
    routes: dict = {}
    for m in config.models.values():
        for r in m.routes:
            if config.backends[r.backend].kind == "torchserve" and r.backend_model in archives:
                routes.setdefault(r.backend_model, r)
    return routes


def build_archives(config, force: bool = False, log=print) -> list[Path]:
    """torch-model-archiver: TorchScript + handler + the gateway's preprocess.py + its spec for
    the classifiers; the ONNX file + torchserve/onnx_handler.py for ONNX_ARCHIVES; each only
    when a TorchServe route of the config serves it.

    Idempotent: an archive is rebuilt only when forced, missing, older than any file it
    packs, or when its route's preprocessing in the config changed.
    """
    root = config.root
    store = root / "torchserve" / "model_store"
    store.mkdir(parents=True, exist_ok=True)
    built = []
    for name, route in _archive_routes(config, ARCHIVES).items():
        target = store / f"{name}.mar"
        built.append(target)
        spec = json.dumps(route.preprocess.to_dict(), sort_keys=True)
        inputs = [root / ARCHIVES[name], root / "gateway" / "preprocess.py",
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
    for name in _archive_routes(config, ONNX_ARCHIVES):
        target = store / f"{name}.mar"
        built.append(target)
        inputs = [root / ONNX_ARCHIVES[name], root / "torchserve" / "onnx_handler.py"]
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


def _addresses(settings) -> tuple[str, str, str]:
    """Inference, management and metrics addresses: the adapter's settings decide them."""
    management = settings.management
    metrics = f"http://{urlparse(management).hostname}:{(urlparse(management).port or 8081) + 1}"
    return settings.url, management, metrics


def _served(config, name: str) -> list[str]:
    """The archives the config routes to this backend."""
    return sorted({r.backend_model for r in process.backend_routes(config, name)
                   if r.backend_model in ARCHIVES or r.backend_model in ONNX_ARCHIVES})


def _key_file(config, name: str, run: Path) -> Path | None:
    """Where TorchServe writes its keys (its working directory) when token auth stays on.

    Auth stays on exactly when the backend names a ``token_file``, which must be that file,
    so the gateway reads the keys this server generated."""
    token_file = config.backends[name].token_file
    if token_file is None:
        return None
    if token_file.resolve() != (run / "key_file.json").resolve():
        raise RuntimeError(f"backends.{name}.token_file is {str(token_file)!r}, but the local TorchServe writes its "
                           f"keys to {run / 'key_file.json'}; point token_file there (or drop it to run "
                           f"without token auth on loopback)")
    return token_file


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


def _runtime_config(config, name: str, run: Path) -> Path:
    """The committed config.properties with the backend's addresses, token auth on when a
    token_file is configured, and only the archives the config routes here."""
    props = _properties((config.root / "torchserve" / "config.properties").read_text())
    props["inference_address"], props["management_address"], props["metrics_address"] = \
        _addresses(config.backends[name])
    props["disable_token_authorization"] = "false" if _key_file(config, name, run) else "true"
    served = _served(config, name)
    props["load_models"] = ",".join(f"{n}.mar" for n in served)
    models = json.loads(props.get("models") or "{}")
    props["models"] = json.dumps({n: models[n] for n in served if n in models})
    path = run / "config.properties"
    path.write_text("".join(f"{k}={v}\n" for k, v in props.items()))
    return path


def start(config, name: str = NAME, timeout: float = 180.0) -> None:
    """Start the backend called ``name`` (kind torchserve); return once the gateway's adapter
    finds every routed model ready."""
    run = process.run_dir(config, name)
    pid_file, log = run / "torchserve.pid", run / "torchserve.log"
    ready = process.routes_ready(config, name)
    if process.read_pid(pid_file):
        process.wait_until(ready, timeout, process.read_pid(pid_file), name, log)
        return
    store = config.root / "torchserve" / "model_store"
    missing = [n for n in _served(config, name) if not (store / f"{n}.mar").is_file()]
    if missing:
        raise RuntimeError(f"missing archives {missing} in {store}; run `gateway models build`")
    inference = config.backends[name].url
    try:
        requests.get(f"{inference}/ping", timeout=1)
        raise RuntimeError(f"another server already answers on {inference}; stop it or change backends.{name}.url")
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
    cmd = [_bin("torchserve"), "--start", "--foreground", "--ncs",
           "--ts-config", str(_runtime_config(config, name, run)), "--model-store", str(store)]
    pid = process.spawn(cmd, log, pid_file, env=env, cwd=run)
    try:
        process.wait_until(ready, timeout, pid, name, log)
    except RuntimeError as exc:
        stop(config, name)
        raise RuntimeError(f"{exc}\nTorchServe's own logs: {logs}/ts_log.log, {logs}/model_log.log") from None


def stop(config, name: str = NAME) -> None:
    run = process.run_dir(config, name)
    pid = process.read_pid(run / "torchserve.pid")
    if pid:
        process.terminate(pid, timeout=20)
    java = process.read_pid(run / "tmp" / ".model_server.pid")  # the frontend, should it outlive the CLI
    if java:
        process.terminate(java, timeout=10)
    (run / "torchserve.pid").unlink(missing_ok=True)
    (run / "key_file.json").unlink(missing_ok=True)


def status(config, name: str = NAME) -> dict:
    run = process.run_dir(config, name)
    pid = process.read_pid(run / "torchserve.pid")
    ready = pid is not None and process.routes_ready(config, name)()
    inference, management, _ = _addresses(config.backends[name])
    return {"running": pid is not None, "pid": pid, "ready": ready, "url": inference,
            "management_url": management, "models": _served(config, name), "log": str(run / "logs" / "ts_log.log")}
