"""`gateway backends up|down|status`: start and stop real backend servers on loopback."""
from __future__ import annotations

import importlib
import json
import sys

from gateway.config import ConfigError, load_config

LOCAL = ("triton", "torchserve")  # servers that run on this machine without Docker
DOCKER = ("triton", "torchserve", "tfserving")


def register(subparsers) -> None:
    p = subparsers.add_parser("backends", help="start/stop/inspect backend servers")
    sub = p.add_subparsers(dest="action", required=True)
    up = sub.add_parser("up", help="start a backend server and wait until it is ready")
    up.add_argument("name", choices=sorted(set(LOCAL) | set(DOCKER)))
    up.add_argument("--docker", action="store_true", help="run the official image through a Docker engine")
    up.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for readiness")
    down = sub.add_parser("down", help="stop a backend server")
    down.add_argument("name", choices=sorted(set(LOCAL) | set(DOCKER)))
    down.add_argument("--docker", action="store_true")
    sub.add_parser("status", help="show which backend servers run")
    for q in (up, down, p):
        q.add_argument("--config", default="gateway.yaml")
    p.set_defaults(func=run)


def _launcher(name: str):
    return importlib.import_module(f"gateway.servers.{name}")


def run(args) -> int:
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"gateway: invalid configuration: {exc}", file=sys.stderr)
        return 2
    try:
        if args.action == "status":
            report = {name: _launcher(name).status(config) for name in LOCAL}
            print(json.dumps(report, indent=2, default=str))
            return 0
        if getattr(args, "docker", False):
            docker = _launcher("docker")
            if args.action == "up":
                docker.start(args.name, config, timeout=args.timeout)
            else:
                docker.stop(args.name)
            return 0
        if args.name not in LOCAL:
            print(f"gateway: {args.name} has no local server on this machine; use --docker "
                  f"(needs a Docker engine) or compose/docker-compose.yml", file=sys.stderr)
            return 2
        launcher = _launcher(args.name)
        if args.action == "up":
            launcher.start(config, timeout=args.timeout)
            print(f"{args.name}: ready ({launcher.status(config)})")
        else:
            launcher.stop(config)
            print(f"{args.name}: stopped")
        return 0
    except RuntimeError as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return 1
