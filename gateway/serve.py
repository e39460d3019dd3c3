"""`gateway serve`: the Flask app under gunicorn, never Flask's dev server.

The default front is gunicorn's gevent worker: every connection is a greenlet, so a request
waiting on an engine or a client uploading slowly costs a socket and a little memory, not a
thread; CPU work (decoding, preprocessing, embedded inference) runs on a pool of native threads
per worker (gateway.admission.Cpu), so it neither blocks the event loop nor waits for the GIL
more than it must. ``--front threads`` keeps gunicorn's gthread worker (a thread per request in
flight), for comparison. README "Serving front" has the measurements that chose it.
"""
from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from pathlib import Path

from gateway.config import ConfigError, load_config

FRONTS = ("gevent", "threads")


def register(subparsers) -> None:
    p = subparsers.add_parser("serve", help="run the HTTP gateway (gunicorn)")
    p.add_argument("--config", default="gateway.yaml", help="YAML config file (default: gateway.yaml)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: 127.0.0.1, loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--workers", type=int, default=2, help="worker processes (default: 2)")
    p.add_argument("--front", choices=FRONTS, default="gevent",
                   help="gevent (default): a greenlet per connection, CPU work on native threads; "
                        "threads: gunicorn's gthread, a thread per request in flight")
    p.add_argument("--threads", type=int, default=None,
                   help="gevent: CPU threads per worker (default: server.cpu_threads); threads: threads per "
                        "worker (default: 4)")
    p.add_argument("--worker-connections", type=int, default=1000, dest="worker_connections",
                   help="connections each worker holds at once (default: 1000)")
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
    threads = args.threads or (4 if args.front == "threads" else None)
    if args.workers < 1 or (threads is not None and threads < 1) or args.worker_connections < 1:
        print("gateway: --workers, --threads and --worker-connections must be at least 1", file=sys.stderr)
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
    # traffic overrides, the change log and stats shared by the workers (gateway.traffic), gone with the server
    os.environ["GATEWAY_TRAFFIC_DIR"] = os.path.join(metrics_dir, "traffic")
    from gateway import cores

    cores.share()  # the workers' CPU steps counted together: an engine alone may take every core
    current = {"config": config}  # what new workers load: replaced on SIGHUP by a valid gateway.yaml

    from gunicorn import util
    from gunicorn.app.base import BaseApplication

    util.write_error = write_json_error  # gunicorn's own answers (431, a garbled request) in JSON too

    class GatewayServer(BaseApplication):
        def load_config(self):
            options = {
                "bind": f"{args.host}:{args.port}",
                "workers": args.workers,
                "threads": threads or 1,
                "worker_class": "gevent" if args.front == "gevent" else "gthread",
                "worker_connections": args.worker_connections,
                "timeout": int(config.server.request_timeout_s) + 30,
                "graceful_timeout": 10,
                "keepalive": 5,
                "accesslog": None,
                "errorlog": "-",
                "loglevel": "info",
                "child_exit": _child_exit,
                "worker_exit": _worker_exit,
                "on_exit": lambda server: _cleanup(metrics_dir),
                "on_reload": lambda arbiter: _reload(config_path, current),
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

            app = create_app(current["config"])  # read (and validated) by the master: at start, or on SIGHUP
            gateway = app.extensions["gateway"]
            gateway.warm()  # before serving: imports and first inferences on this thread, not a request's
            if args.front == "gevent":
                _offload_cpu(gateway, threads)
            if grpc_port:
                from gateway.v2 import grpc_server

                app.extensions["grpc_server"] = grpc_server.start(app.extensions["v2"], grpc_address,
                                                                  threads or gateway.cpu.limiter.limit)
            return app

    grpc_note = f", V2 gRPC on {grpc_address}" if grpc_port else ""
    front = (f"gevent front: {args.workers} workers x {args.worker_connections} connections" if args.front == "gevent"
             else f"threads front: {args.workers} workers x {threads} threads")
    print(f"gateway: serving {config_path.name} on http://{args.host}:{args.port}{grpc_note} ({front})",
          file=sys.stderr)
    GatewayServer().run()
    return 0


def _reload(config_path: Path, current: dict) -> None:
    """SIGHUP, in gunicorn's master before it starts new workers (the old ones finish their requests,
    up to graceful_timeout): gateway.yaml read and validated again. The new workers get it; an
    invalid file is refused, naming the key, and they get the running configuration. Traffic
    changes are logged where the traffic endpoint shows them."""
    from gateway import traffic

    folder = os.environ.get(traffic.STATE_DIR_ENV)
    try:
        config = load_config(config_path)
    except Exception as exc:  # never out of the master: an exception here would stop the server
        message = str(exc) if isinstance(exc, ConfigError) else f"{type(exc).__name__}: {exc}"
        print(f"gateway: reload refused, the running configuration stays: {message}", file=sys.stderr)
        with contextlib.suppress(OSError):
            traffic.note_reload(folder, current["config"], None, message)
        return
    try:
        changes = traffic.note_reload(folder, current["config"], config)
    except OSError as exc:
        changes = [f"(the change log could not be written: {exc})"]
    print(f"gateway: reloaded {config_path.name}" + "".join(f"; {line}" for line in changes), file=sys.stderr)
    current["config"] = config


def _offload_cpu(gateway, threads: int | None) -> None:
    """Under gevent (patched by the worker before the app loads): CPU work on a pool of native
    threads, and gRPC's client and server made cooperative."""
    import gevent
    import gevent.threadpool
    from grpc.experimental import gevent as grpc_gevent

    from gateway import deadlines
    from gateway.errors import DeadlineExceeded

    grpc_gevent.init_gevent()
    # The event loop shares the GIL with the CPU threads: while one runs Python code (decoding,
    # preprocessing, postprocessing) the loop would wait up to the default 5 ms for each turn.
    sys.setswitchinterval(0.001)
    if threads:
        gateway.cpu.limiter.limit = threads
    pool = gevent.threadpool.ThreadPool(gateway.cpu.limiter.limit)

    def offload(fn, args):
        """``fn(*args)`` on a native thread; the request waits for it at most until its deadline."""
        left = deadlines.remaining()
        try:
            return pool.spawn(fn, *args).get(timeout=None if left is None else max(left, 0.001))
        except gevent.Timeout:
            raise DeadlineExceeded("the request's deadline passed while its CPU work ran",
                                   code="deadline_exceeded") from None

    gateway.cpu.offload = offload


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

    from gateway.api.access import new_id

    code, request_id = reason.lower().replace(" ", "_"), new_id()  # the request could not be read: a new id
    body = json.dumps({"error": {"code": code, "message": mesg or reason, "request_id": request_id}}).encode()
    head = (f"HTTP/1.1 {status_int} {reason}\r\nConnection: close\r\nContent-Type: application/json\r\n"
            f"X-Request-Id: {request_id}\r\nContent-Length: {len(body)}\r\n\r\n").encode("latin1")
    util.write_nonblock(sock, head + body)


def _stop_grpc(server, worker) -> None:
    """In a worker that is exiting: end its gRPC server's calls and open streams (1 s grace),
    or their threads would keep the process alive until gunicorn kills it."""
    grpc_server = getattr(getattr(worker, "wsgi", None), "extensions", {}).get("grpc_server")
    if grpc_server is not None:
        grpc_server.stop(1.0).wait(2.0)


def _worker_exit(server, worker) -> None:
    """A worker exiting: its gRPC server stopped, then its queued spans exported (gateway.tracing)."""
    _stop_grpc(server, worker)
    from gateway import tracing

    tracing.shutdown()


def _child_exit(server, worker) -> None:
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def _cleanup(path: str) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)
