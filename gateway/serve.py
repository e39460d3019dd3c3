"""`gateway serve`: the Flask app under gunicorn (threaded workers), never Flask's dev server."""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

from gateway.config import ConfigError, load_config


def register(subparsers) -> None:
    p = subparsers.add_parser("serve", help="run the HTTP gateway (gunicorn)")
    p.add_argument("--config", default="gateway.yaml", help="YAML config file (default: gateway.yaml)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: 127.0.0.1, loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--workers", type=int, default=2, help="worker processes (default: 2)")
    p.add_argument("--threads", type=int, default=4, help="threads per worker (default: 4)")
    p.add_argument("--grpc-port", type=int, default=None,
                   help="port of the Open Inference Protocol gRPC front, on --host (default: the config's "
                        "server.grpc_port; 0: off)")
    p.set_defaults(func=serve)


def serve(args) -> int:
    config_path = Path(args.config).resolve()
    try:
        config = load_config(config_path)  # fail fast, naming the bad key, before forking
    except ConfigError as exc:
        print(f"gateway: invalid configuration: {exc}", file=sys.stderr)
        return 2
    if args.workers < 1 or args.threads < 1:
        print("gateway: --workers and --threads must be at least 1", file=sys.stderr)
        return 2
    grpc_port = config.server.grpc_port if args.grpc_port is None else args.grpc_port
    grpc_address = f"[{args.host}]:{grpc_port}" if ":" in args.host else f"{args.host}:{grpc_port}"  # [::]:8001
    if grpc_port and not _port_free(args.host, grpc_port):
        print(f"gateway: the gRPC port {grpc_address} is in use", file=sys.stderr)
        return 2
    # Before prometheus_client is imported anywhere: workers share metrics through files.
    metrics_dir = tempfile.mkdtemp(prefix="gateway-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    os.environ["GATEWAY_WORKERS"] = str(args.workers)

    from gunicorn import util
    from gunicorn.app.base import BaseApplication

    util.write_error = write_json_error  # gunicorn's own answers (431, a garbled request) in JSON too

    class GatewayServer(BaseApplication):
        def load_config(self):
            options = {
                "bind": f"{args.host}:{args.port}",
                "workers": args.workers,
                "threads": args.threads,
                "worker_class": "gthread",
                "timeout": int(config.server.request_timeout_s) + 30,
                "graceful_timeout": 10,
                "keepalive": 5,
                "accesslog": None,
                "errorlog": "-",
                "loglevel": "info",
                "child_exit": _child_exit,
                "worker_exit": _stop_grpc,
                "on_exit": lambda server: _cleanup(metrics_dir),
                # this server's own control socket (gunicornc -s PATH): gunicorn's default is one path
                # per user, which a second gateway would take over and remove when it stops
                "control_socket": os.path.join(metrics_dir, "gunicorn.ctl"),
                # no cap on the request line: a long query reaches the app, which refuses unknown and
                # repeated parameters by name (a gunicorn 414 would name nothing useful)
                "limit_request_line": 0,
            }
            for key, value in options.items():
                self.cfg.set(key, value)

        def load(self):  # runs in each worker after fork: ONNX sessions and gRPC servers are per process
            from gateway.app import create_app

            app = create_app(load_config(config_path))
            if grpc_port:
                from gateway.v2 import grpc_server

                app.extensions["grpc_server"] = grpc_server.start(app.extensions["v2"], grpc_address, args.threads)
            return app

    grpc_note = f", V2 gRPC on {grpc_address}" if grpc_port else ""
    print(f"gateway: serving {config_path.name} on http://{args.host}:{args.port}{grpc_note} "
          f"({args.workers} workers x {args.threads} threads)", file=sys.stderr)
    GatewayServer().run()
    return 0


def _port_free(host: str, port: int) -> bool:
    """Whether nothing else listens on the port (the workers' gRPC servers then share it).
    SO_REUSEADDR as gRPC sets it: connections of a previous run in TIME_WAIT are no owner."""
    import socket

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def write_json_error(sock, status_int: int, reason: str, mesg: str) -> None:
    """gunicorn.util.write_error's replacement: what gunicorn answers itself to a request it
    cannot parse (malformed request line, headers too large) in the gateway's JSON error shape."""
    import json

    from gunicorn import util

    code = reason.lower().replace(" ", "_")
    body = json.dumps({"error": {"code": code, "message": mesg or reason}}).encode()
    head = (f"HTTP/1.1 {status_int} {reason}\r\nConnection: close\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode("latin1")
    util.write_nonblock(sock, head + body)


def _stop_grpc(server, worker) -> None:
    """In a worker that is exiting: end its gRPC server's calls and open streams (1 s grace),
    or their threads would keep the process alive until gunicorn kills it."""
    grpc_server = getattr(getattr(worker, "wsgi", None), "extensions", {}).get("grpc_server")
    if grpc_server is not None:
        grpc_server.stop(1.0).wait(2.0)


def _child_exit(server, worker) -> None:
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def _cleanup(path: str) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)
