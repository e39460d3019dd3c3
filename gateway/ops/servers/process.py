"""Running a server process in the background: log file, pid file, readiness, clean stop."""
from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path


def backend_routes(config, name: str) -> list:
    """Every route of every model that goes to the backend called ``name``."""
    return [r for m in config.models.values() for r in m.routes if r.backend == name]


def routes_ready(config, name: str) -> Callable[[], bool]:
    """A readiness probe asking the gateway's own adapter about every model routed to
    ``name``: a launcher waits for exactly what the gateway will call."""
    from gateway.backends.registry import backend_class

    settings = config.backends[name]
    routes = backend_routes(config, name)

    def ready() -> bool:
        backend = backend_class(settings.kind)(name, settings)
        try:
            return all(backend.ready(r) for r in routes)
        finally:
            backend.close()
    return ready


def run_dir(config, name: str) -> Path:
    path = config.root / "run" / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def read_pid(pid_file: Path) -> int | None:
    try:
        pid = int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if alive(pid) else None


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie child is dead for our purposes
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def spawn(cmd: list[str], log_path: Path, pid_file: Path, env: dict | None = None, cwd: Path | None = None) -> int:
    """Start detached (own session), stdout/stderr to a file: never a pipe a server could block on."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, cwd=cwd, start_new_session=True)
    pid_file.write_text(str(proc.pid))
    return proc.pid


def tail(path: Path, chars: int = 2500) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return "(no log)"


def wait_until(ready: Callable[[], bool], timeout: float, pid: int | None, what: str, log_path: Path) -> None:
    """Poll ``ready`` until true; fail early if the process died, with the log's tail."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pid is not None and not alive(pid):
            raise RuntimeError(f"{what} exited during start-up; log {log_path}:\n{tail(log_path)}")
        try:
            if ready():
                return
        except Exception:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"{what} not ready after {timeout:.0f} s; log {log_path}:\n{tail(log_path)}")


def _signal(pid: int, sig) -> bool:
    """Signal the process group led by pid, or the process alone if it leads none."""
    try:
        os.killpg(pid, sig)
        return True
    except (ProcessLookupError, PermissionError):
        pass
    try:
        os.kill(pid, sig)
        return True
    except ProcessLookupError:
        return False


def terminate(pid: int, timeout: float = 20.0) -> None:
    """SIGTERM (the group), wait, then SIGKILL what is left."""
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        if not _signal(pid, sig):
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:  # reap it if it is our child
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass
            if not alive(pid):
                return
            time.sleep(0.1)
