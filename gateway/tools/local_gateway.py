"""A `gateway serve` subprocess on a free loopback port (tests, benchmarks, `gateway bench`)."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalGateway:
    def __init__(self, config_path: Path, workers: int = 1, threads: int = 4, log_path: Path | None = None,
                 timeout: float = 60.0, grpc_port: int = 0, env: dict[str, str] | None = None):
        self.config_path = Path(config_path)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.grpc_port = grpc_port  # the V2 gRPC front (0: off, whatever the config says)
        self.log_path = log_path or self.config_path.parent / f"gateway-{self.port}.log"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gateway", "serve", "--config", str(self.config_path),
                 "--port", str(self.port), "--workers", str(workers), "--threads", str(threads),
                 "--grpc-port", str(grpc_port)],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                env={**os.environ, **env} if env else None)  # env: more variables (e.g. OTEL_*)
        self._wait_ready(timeout)

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited ({self.proc.returncode}): {self.log()}")
            try:
                if requests.get(self.url + "/healthz", timeout=2).ok:
                    return
            except requests.RequestException:  # not listening yet, or busy loading models
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"gateway not up after {timeout}s: {self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()
