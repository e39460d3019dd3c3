"""`gateway backends up|down triton`: the real tritonserver from the nvidia-pytriton wheel, on CPU.

Only the wheel's binary is used. Its sole bundled backend is the python backend, so the
runtime backend directory gets python-based stand-ins for libtorch and TensorFlow
(``gateway/ops/servers/triton_backends/``): the repository's canonical ``config.pbtxt`` files
serve unchanged here and in the official GPU image.
"""
from __future__ import annotations

import glob
import os
import shutil
import sys
import sysconfig
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlparse

import requests

from gateway.ops.servers import process

NAME = "triton"
STAND_INS = Path(__file__).parent / "triton_backends"


def _wheel() -> Path:
    """The wheel's server folder, found without importing pytriton (its Python API is unused)."""
    import importlib.util

    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the nvidia-pytriton wheel is not installed; run `make setup`")
    return Path(list(spec.submodule_search_locations)[0]) / "tritonserver"


def _ports(config, name: str) -> tuple[str, int]:
    url = urlparse(config.backends[name].url)
    return url.hostname or "127.0.0.1", url.port or 8000


def _backend_dir(run: Path) -> Path:
    """python/ (backend lib + this Python's stub) plus a stand-in dir per platform."""
    wheel = _wheel()
    backends = run / "backends"
    shutil.rmtree(backends, ignore_errors=True)
    python = backends / "python"
    shutil.copytree(wheel / "backends" / "python", python, ignore=shutil.ignore_patterns("__pycache__"))
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    shutil.copy2(wheel / "python_backend_stubs" / version / "triton_python_backend_stub", python)
    for platform_dir in STAND_INS.iterdir():
        if (platform_dir / "model.py").is_file():
            (backends / platform_dir.name).mkdir()
            shutil.copy2(platform_dir / "model.py", backends / platform_dir.name / "model.py")
    return backends


def _env() -> dict:
    """The stub finds the venv's packages through PATH (PYTHONPATH is ignored)."""
    env = dict(os.environ)
    libs = [str(_wheel().parent.parent / "nvidia_pytriton.libs"), sysconfig.get_config_var("LIBDIR") or ""]
    env["LD_LIBRARY_PATH"] = ":".join([*libs, env.get("LD_LIBRARY_PATH", "")]).strip(":")
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    env.setdefault("GATEWAY_TRITON_THREADS", str(max(1, (os.cpu_count() or 2) // 2)))
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return env


def _server_ready(base: str) -> bool:
    return requests.get(f"{base}/v2/health/ready", timeout=2).status_code == 200


def start(config, name: str = NAME, timeout: float = 180.0, extra_args: Sequence[str] = ()) -> None:
    """Start the backend called ``name`` (kind triton) and wait until its routed models are ready.
    ``extra_args``: more tritonserver flags (e.g. ``--trace-config ...``, tests/test_tracing.py)."""
    run = process.run_dir(config, name)
    pid_file, log = run / "tritonserver.pid", run / "tritonserver.log"
    host, port = _ports(config, name)
    base = config.backends[name].url
    ready = process.routes_ready(config, name)
    if process.read_pid(pid_file):
        process.wait_until(ready, timeout, process.read_pid(pid_file), "tritonserver", log)
        return
    try:
        if _server_ready(base):
            raise RuntimeError(f"another server already answers on {base}; stop it or change backends.{name}.url")
    except requests.RequestException:
        pass
    log.write_bytes(b"")
    cmd = [
        str(_wheel() / "bin" / "tritonserver"),
        f"--model-repository={config.root / 'model_repository'}",
        f"--backend-directory={_backend_dir(run)}",
        f"--http-address={host}", f"--http-port={port}",
        f"--grpc-address={host}", f"--grpc-port={port + 1}",
        f"--metrics-address={host}", f"--metrics-port={port + 2}",
        "--allow-gpu-metrics=false", "--exit-timeout-secs=2", "--log-verbose=0",
        *extra_args,
    ]
    envs_before = _python_envs()
    pid = process.spawn(cmd, log, pid_file, env=_env(), cwd=run)
    try:
        process.wait_until(ready, timeout, pid, "tritonserver", log)
    except RuntimeError:
        _note_envs(run, envs_before)
        stop(config, name)
        raise
    _note_envs(run, envs_before)


def stop(config, name: str = NAME) -> None:
    run = process.run_dir(config, name)
    pid = process.read_pid(run / "tritonserver.pid")
    if pid:
        process.terminate(pid, timeout=20)
    # python backend stubs can outlive their server (own process group): end ours too
    stub = str(run / "backends")
    for proc_dir in glob.glob("/proc/[0-9]*"):
        if _cmdline(proc_dir).startswith(stub):
            process.terminate(int(proc_dir.rsplit("/", 1)[1]), timeout=5)
    (run / "tritonserver.pid").unlink(missing_ok=True)
    _clean_leftovers(run)


def _python_envs() -> set[str]:
    return set(glob.glob("/tmp/python_env_*"))


def _note_envs(run: Path, before: set[str]) -> None:
    """Env dirs made while our server started are ours: stop() removes them."""
    (run / "python_envs.txt").write_text("\n".join(sorted(_python_envs() - before)))


def _clean_leftovers(run: Path) -> None:
    """Unclean stops leave python-backend shared memory and env dirs behind.

    A shm region goes when no live process maps it (another tritonserver may be running);
    env dirs go when they were made by our server (noted at start) or when no tritonserver runs.
    """
    mapped: set[str] = set()
    for maps in glob.glob("/proc/[0-9]*/maps"):
        try:
            with open(maps) as lines:
                mapped.update(line.rsplit(None, 1)[-1] for line in lines if "/dev/shm/triton_" in line)
        except OSError:
            pass
    for region in glob.glob("/dev/shm/triton_*_backend_shm_region_*"):
        if region not in mapped:
            _unlink(region)
    noted = run / "python_envs.txt"
    envs = set(noted.read_text().split()) if noted.is_file() else set()
    if not any(_cmdline(p).endswith("tritonserver") for p in glob.glob("/proc/[0-9]*")):
        envs |= _python_envs()
    for path in envs:
        if path.startswith("/tmp/python_env_"):
            shutil.rmtree(path, ignore_errors=True)
    noted.unlink(missing_ok=True)


def _cmdline(proc_dir: str) -> str:
    try:
        return Path(proc_dir, "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
    except OSError:
        return ""


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def status(config, name: str = NAME) -> dict:
    run = process.run_dir(config, name)
    pid = process.read_pid(run / "tritonserver.pid")
    base = config.backends[name].url
    ready = pid is not None and process.routes_ready(config, name)()
    return {"running": pid is not None, "pid": pid, "ready": ready, "url": base,
            "log": str(run / "tritonserver.log")}
