"""`gateway backends up|down --docker NAME`: one official image through the Docker SDK.

The same images, commands and mounts as compose/docker-compose.yml (read from it, so the
two cannot drift), with the host ports gateway.yaml expects, bound to loopback. ``start``
returns once the gateway's own adapter finds every routed model ready.
"""
from __future__ import annotations

import time
from pathlib import Path
from urllib.parse import urlparse

import yaml

from gateway.ops.servers import process

COMPOSE = Path(__file__).resolve().parents[3] / "compose" / "docker-compose.yml"
PREFIX = "gateway-"


def _client():
    try:
        import docker

        client = docker.from_env(timeout=10)
        client.ping()
        return client
    except Exception as exc:
        raise RuntimeError(f"no Docker engine reachable ({type(exc).__name__}: {str(exc)[:160]}); start "
                           "Docker, or use `gateway backends up triton|torchserve` for the local servers") from None


def container_spec(name: str, config) -> dict:
    """Image, command, volumes and ports for the backend ``name``, from its kind's compose service."""
    kind = config.backends[name].kind
    service = yaml.safe_load(COMPOSE.read_text())["services"][kind]
    volumes = {}
    for mount in service.get("volumes", []):
        host, container, *mode = mount.split(":")
        volumes[str((COMPOSE.parent / host).resolve())] = {"bind": container, "mode": mode[0] if mode else "rw"}
    ports = {}
    for mapping in service.get("ports", []):
        _, host_port, container_port = mapping.split(":")
        ports[f"{container_port}/tcp"] = ("127.0.0.1", int(host_port))
    url = urlparse(config.backends[name].url)
    if url.port:  # the config's port wins for the main API
        main = {"triton": "8010", "torchserve": "8080", "tfserving": "8501"}[kind]
        ports[f"{main}/tcp"] = ("127.0.0.1", url.port)
    return {"image": service["image"], "command": service.get("command"), "volumes": volumes, "ports": ports,
            "shm_size": service.get("shm_size")}


def wait_ready(name: str, config, timeout: float) -> None:
    """Poll the backend's routed models through the gateway's adapter until all are ready."""
    ready = process.routes_ready(config, name)
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            waiting = sorted({r.backend_model for r in process.backend_routes(config, name)})
            raise RuntimeError(f"{name} at {config.backends[name].url}: models {waiting} not ready "
                               f"after {timeout:g} s")
        time.sleep(1)


def start(name: str, config, timeout: float = 300.0) -> None:
    client = _client()
    spec = container_spec(name, config)
    stop(name, client)
    container = client.containers.run(spec["image"], command=spec["command"], name=PREFIX + name, detach=True,
                                      volumes=spec["volumes"], ports=spec["ports"], shm_size=spec["shm_size"],
                                      remove=True)
    print(f"{name}: started {spec['image']} as container {PREFIX + name}; waiting for its models")
    try:
        wait_ready(name, config, timeout)
    except RuntimeError as exc:
        logs = container.logs(tail=30).decode(errors="replace")
        raise RuntimeError(f"{exc}; the container is left running (`gateway backends down --docker {name}`); "
                           f"its last log lines:\n{logs}") from None


def stop(name: str, client=None) -> None:
    client = client or _client()
    import docker

    try:
        client.containers.get(PREFIX + name).stop(timeout=10)
    except docker.errors.NotFound:
        pass
