"""The `gateway` command: each subcommand lives in its own module's ``register``."""
from __future__ import annotations

import argparse
import importlib
import sys

COMMAND_MODULES = (
    "gateway.serve",          # serve
    "gateway.export.build",   # models build
    "gateway.servers.cli",    # backends up|down|status
    "gateway.client",         # classify
    "gateway.bench",          # bench
    "gateway.batch",          # batch
    "gateway.evaluation",     # eval
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gateway", description="Multi-backend image classification gateway")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name and (name + ".").startswith(exc.name + "."):  # a command not built yet
                continue
            raise
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
