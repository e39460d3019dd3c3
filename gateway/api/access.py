"""Request ids and the access log: one line per HTTP answer, on the ``gateway.access`` logger.

Every answer carries ``X-Request-Id``: the client's own when it sent a sane one (1 to 128
visible ASCII characters), else a new uuid4 hex. v1 error bodies repeat it as
``error.request_id`` (gateway.app.error_response); the V2 gRPC front returns it in trailing
metadata (gateway.v2.grpc_server).

``server.access_log`` picks the line's form: ``json`` (the default), ``text`` or ``off``. A line
holds time, id, method, path (no query string), model, route, backend, status, latency_ms
(from the first byte the app saw to the last it sent) and bytes_in/bytes_out (bodies), on
stderr. Never bodies, query strings or headers: no image bytes, no API keys, no Authorization.

The id and the line are the outermost WSGI layer's (``AccessLog``), so every answer has them,
those of middleware inside it included (an upload cut for being too slow); the model, route
and backend come from the app's after_request hook: from the answer (a v1 answer's JSON names
them; a V2 answer names its route as model_version and its backend in parameters), or from
the error (a backend fault names its backend), else from the URL.
"""
from __future__ import annotations

import json
import logging
import re
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime
from typing import Any

import orjson
from flask import Flask, Response, current_app, g, request

HEADER = "X-Request-Id"
ENVIRON_ID, ENVIRON_FIELDS = "gateway.request_id", "gateway.access"
SANE_ID = re.compile(r"[\x21-\x7e]{1,128}")  # visible ASCII: no spaces, controls or line breaks
MAX_PATH = 512  # characters of the path a line keeps (the request line has no bound here)
FORMATS = ("json", "text", "off")
ANSWERS = {"classify.infer": "v1", "v2.infer": "v2"}  # endpoints whose answer names route and backend
log = logging.getLogger("gateway.access")


def new_id() -> str:
    return uuid.uuid4().hex


def sane_id(sent: str | None) -> str:
    """The client's id when it is sane, else a new one."""
    return sent if sent and SANE_ID.fullmatch(sent) else new_id()


def request_id() -> str:
    """The id of the request being answered (in a request context)."""
    rid = request.environ.get(ENVIRON_ID)
    if rid is None:  # an app not wrapped by AccessLog (install() not called)
        rid = request.environ[ENVIRON_ID] = sane_id(request.headers.get(HEADER))
    return rid


def note_error(exc: Any) -> None:
    """What an error answer tells the log: the backend a backend fault names."""
    g.error_backend = getattr(exc, "backend", None)


def install(app: Flask, fmt: str = "json") -> None:
    """Wrap the app's WSGI callable (call it after any other middleware is added, so this layer
    is outermost) and add the hook that tells the log what the answer was about."""
    if fmt not in FORMATS:
        raise ValueError(f"access log format: expected one of {FORMATS}, got {fmt!r}")
    app.wsgi_app = AccessLog(app.wsgi_app, fmt)  # type: ignore[method-assign]

    @app.after_request
    def describe(response: Response) -> Response:
        if fmt != "off":
            request.environ[ENVIRON_FIELDS] = about(response)
        return response


def about(response: Response) -> dict[str, Any]:
    """model, route and backend of an answer, as far as it or its request tells."""
    model, route, backend = (request.view_args or {}).get("model"), None, g.get("error_backend")
    if model is None and request.endpoint == "classify.infer":
        model = current_app.extensions["gateway"].config.server.default_model
    kind = ANSWERS.get(request.endpoint or "")
    if kind and response.status_code == 200 and not response.is_streamed:
        body = response.get_data()
        try:
            if kind == "v1":
                answer = orjson.loads(body)
                model, route, backend = answer.get("model", model), answer.get("route"), answer.get("backend")
            else:
                length = response.headers.get("Inference-Header-Content-Length")  # binary: JSON, then tensors
                answer = orjson.loads(body[:int(length)] if length else body)
                model, route = answer.get("model_name", model), answer.get("model_version")
                backend = (answer.get("parameters") or {}).get("backend")
        except (orjson.JSONDecodeError, ValueError, AttributeError):
            pass
    return {"model": model, "route": route, "backend": backend}


class AccessLog:
    """WSGI middleware: the request id (X-Request-Id on every answer) and one log line per answer,
    written when its body has been handed to the server."""

    def __init__(self, app: Callable, fmt: str = "json"):
        self.app, self.fmt = app, fmt
        if fmt != "off":
            _logger()

    def __call__(self, environ: dict, start_response: Callable) -> Iterable[bytes]:
        started = time.perf_counter()
        rid = environ[ENVIRON_ID] = sane_id(environ.get("HTTP_X_REQUEST_ID"))
        status: list[str] = []

        def respond(status_line: str, headers: list, exc_info=None):
            headers = [(k, v) for k, v in headers if k.lower() != HEADER.lower()]
            headers.append((HEADER, rid))
            status[:] = [status_line]
            return start_response(status_line, headers, exc_info) if exc_info else start_response(status_line, headers)

        if self.fmt == "off":
            return self.app(environ, respond)
        try:
            body = self.app(environ, respond)
        except BaseException:
            status[:] = ["500"]
            self._write(environ, "500", started, 0)
            raise
        return CountedBody(body, lambda sent: self._write(environ, status[0] if status else "500", started, sent))

    def _write(self, environ: dict, status: str, started: float, sent: int) -> None:
        try:
            log.info(line(entry(environ, status, started, sent), self.fmt))
        except Exception:  # the log must never break an answer
            logging.getLogger("gateway").exception("access log line failed")


class CountedBody:
    """A response body passed through, its bytes counted; ``done(bytes)`` once, when it ends."""

    def __init__(self, body: Iterable[bytes], done: Callable[[int], None]):
        self.body, self.done, self.sent, self.finished = body, done, 0, False

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self.body:
            self.sent += len(chunk)
            yield chunk
        self._finish()

    def close(self) -> None:
        try:
            close = getattr(self.body, "close", None)
            if close is not None:
                close()
        finally:
            self._finish()

    def _finish(self) -> None:
        if not self.finished:
            self.finished = True
            self.done(self.sent)


def entry(environ: dict, status: str, started: float, sent: int) -> dict[str, Any]:
    """The fields of one line (and nothing else from the request: no query, headers or body)."""
    about_answer = environ.get(ENVIRON_FIELDS) or {}
    path = environ.get("PATH_INFO", "")
    try:
        path = path.encode("latin-1").decode("utf-8")  # WSGI hands the path over as latin-1
    except UnicodeError:
        pass
    length = environ.get("CONTENT_LENGTH") or ""
    return {
        "time": datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "id": environ.get(ENVIRON_ID),
        "method": environ.get("REQUEST_METHOD"),
        "path": path if len(path) <= MAX_PATH else path[:MAX_PATH] + "...",
        "model": about_answer.get("model"),
        "route": about_answer.get("route"),
        "backend": about_answer.get("backend"),
        "status": int(status.split(" ", 1)[0]) if status[:3].isdigit() else status,
        "latency_ms": round((time.perf_counter() - started) * 1e3, 3),
        "bytes_in": int(length) if length.isdigit() else 0,
        "bytes_out": sent,
    }


def line(fields: dict[str, Any], fmt: str = "json") -> str:
    """One access log line. Text: ``time id "METHOD path" status latency_ms key=value ...``, a
    value that is not a plain token JSON-quoted (no path or id can forge a line)."""
    if fmt == "json":
        return json.dumps(fields, separators=(",", ":"))

    def token(value: Any) -> str:
        text = "-" if value is None else str(value)
        return text if re.fullmatch(r"[\w.:/@+-]+", text) else json.dumps(text)

    request_line = json.dumps(f"{fields['method']} {fields['path']}")
    rest = " ".join(f"{k}={token(fields[k])}" for k in ("model", "route", "backend", "bytes_in", "bytes_out"))
    return f"{fields['time']} {token(fields['id'])} {request_line} {fields['status']} {fields['latency_ms']}ms {rest}"


class _Stderr(logging.StreamHandler):
    """stderr as it is when a line is written (test runners swap it), not as it was at start."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def _logger() -> logging.Logger:
    if not any(isinstance(h, _Stderr) for h in log.handlers):
        handler = _Stderr()
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False  # the line as it is, not again through the root logger's format
    return log
