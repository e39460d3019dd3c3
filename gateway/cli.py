"""The `gateway` command: each subcommand lives in its own module's ``register``."""
from __future__ import annotations

import argparse
import importlib
import sys

COMMAND_MODULES = (
    "gateway.serve",  # serve
    "gateway.ops.export.build",  # models build
    "gateway.ops.servers.cli",  # backends up|down|status
    "gateway.tools.client",  # classify
    "gateway.tools.detect",  # detect
    "gateway.tools.bench",  # bench
    "gateway.tools.batch.cli",  # batch
    "gateway.tools.evaluation",  # eval
    "gateway.tools.traffic",  # traffic
    "gateway.ops.lambda_package",  # package lambda
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gateway", description="Multi-backend image classification gateway")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def patch_for_serve(argv: list[str]) -> None:
    """`gateway serve` on the gevent front: gevent patches the standard library here, before any
    command module imports socket or ssl (patching later leaves modules such as urllib3's ssl
    helpers holding unpatched functions). Other commands are never patched."""
    if argv[:1] != ["serve"]:
        return
    front = argparse.ArgumentParser(add_help=False)
    front.add_argument("--front", default="gevent")
    if front.parse_known_args(argv[1:])[0].front == "gevent":
        from gevent import monkey

        monkey.patch_all()


def main(argv: list[str] | None = None) -> int:
    """The `gateway` program (``argv`` None: the command line). Called in process with an
    explicit ``argv`` (tests), nothing is patched: the caller's process stays as it was."""
    if argv is None:
        argv = sys.argv[1:]
        patch_for_serve(argv)
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
