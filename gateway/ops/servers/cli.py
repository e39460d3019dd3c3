"""`gateway backends up|down|status`: start and stop real backend servers on loopback.

NAME is a backend of the config; its ``kind`` picks the launcher, its settings (URL,
ports, token file) say where the server listens.
"""
from __future__ import annotations

import importlib
import json
import sys

from gateway.config import ConfigError, load_config

LOCAL = ("triton", "torchserve")  # kinds whose servers run on this machine without Docker
DOCKER = ("triton", "torchserve", "tfserving")


def register(subparsers) -> None:
    p = subparsers.add_parser("backends", help="start/stop/inspect backend servers")
    sub = p.add_subparsers(dest="action", required=True)
    up = sub.add_parser("up", help="start a backend server and wait until its models are ready")
    up.add_argument("name", help="a backend of the config (e.g. triton, torchserve, tfserving)")
    up.add_argument("--docker", action="store_true", help="run the official image through a Docker engine")
    up.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for readiness")
    down = sub.add_parser("down", help="stop a backend server")
    down.add_argument("name")
    down.add_argument("--docker", action="store_true")
    status = sub.add_parser("status", help="show which local backend servers run")
    for q in (up, down, status):
        q.add_argument("--config", default="gateway.yaml")
    p.set_defaults(func=run)


def _launcher(kind: str):
    return importlib.import_module(f"gateway.ops.servers.{kind}")


def run(args) -> int:
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"gateway: invalid configuration: {exc}", file=sys.stderr)
        return 2
    if args.action == "status":
        report = {name: _launcher(s.kind).status(config, name)
                  for name, s in config.backends.items() if s.kind in LOCAL}
        print(json.dumps(report, indent=2, default=str))
        return 0
    if args.name not in config.backends:
        print(f"gateway: no backend {args.name!r} in {args.config} (backends: {', '.join(config.backends)})",
              file=sys.stderr)
        return 2
    kind = config.backends[args.name].kind
    try:
        if args.docker:
            if kind not in DOCKER:
                print(f"gateway: no Docker image for backend kind {kind!r}", file=sys.stderr)
                return 2
            docker = _launcher("docker")
            if args.action == "up":
                docker.start(args.name, config, timeout=args.timeout)
            else:
                docker.stop(args.name)
            return 0
        if kind not in LOCAL:
            print(f"gateway: {args.name} ({kind}) has no local server on this machine; use --docker "
                  f"(needs a Docker engine) or compose/docker-compose.yml", file=sys.stderr)
            return 2
        launcher = _launcher(kind)
        if args.action == "up":
            launcher.start(config, args.name, timeout=args.timeout)
            print(f"{args.name}: ready ({launcher.status(config, args.name)})")
        else:
            launcher.stop(config, args.name)
            print(f"{args.name}: stopped")
        return 0
    except RuntimeError as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return 1
