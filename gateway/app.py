"""The Flask app factory: one gateway, blueprints per API surface, errors as JSON."""
from __future__ import annotations

import logging
import os

from flask import Flask, jsonify, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from gateway import metrics
from gateway.api import auth, classify, health, models, openapi
from gateway.config import GatewayConfig, load_config
from gateway.errors import GatewayError
from gateway.service import Gateway

log = logging.getLogger("gateway")
# A refused body is read and discarded up to this many times the limit before the 413 goes out:
# clients that write the whole body before reading (urllib, many small ones) otherwise get
# "Broken pipe" instead of the answer. Beyond it the connection is closed unread.
DRAIN_FACTOR = 4


def create_app(config: GatewayConfig | None = None) -> Flask:
    if config is None:
        config = load_config(os.environ.get("GATEWAY_CONFIG", "gateway.yaml"))
    app = Flask("gateway")
    app.config["MAX_CONTENT_LENGTH"] = config.server.max_body_bytes
    app.json.sort_keys = False
    gateway = Gateway(config)
    gateway.load()
    app.extensions["gateway"] = gateway
    for bp in (classify.bp, models.bp, health.bp, openapi.bp):
        app.register_blueprint(bp)
    auth.install(app)
    register_error_handlers(app)
    return app


def drain_body(environ: dict, bound: int, chunk: int = 1 << 16) -> bool:
    """Read and drop the rest of the request body; False when it is longer than ``bound``."""
    length = environ.get("CONTENT_LENGTH")
    if length and length.isdigit() and int(length) > bound:
        return False
    stream, left = environ["wsgi.input"], bound
    while left > 0:
        data = stream.read(min(chunk, left))
        if not data:
            return True
        left -= len(data)
    return not stream.read(1)


def _error(status: int, code: str, message: str, extra: dict | None = None):
    metrics.ERRORS.labels(str(status), code).inc()
    body = {"error": {"code": code, "message": message, **(extra or {})}}
    return jsonify(body), status


def register_error_handlers(app: Flask) -> None:
    @app.errorhandler(GatewayError)
    def gateway_error(exc: GatewayError):
        if exc.status >= 500:
            log.warning("%s %s", exc.status, exc.message)
        body = exc.to_dict()["error"]
        extra = {k: v for k, v in body.items() if k not in ("code", "message")}
        return _error(exc.status, exc.code, exc.message, extra)

    @app.errorhandler(RequestEntityTooLarge)
    def too_large(exc):
        limit = app.config["MAX_CONTENT_LENGTH"]
        drained = drain_body(request.environ, DRAIN_FACTOR * limit)
        body, status = _error(413, "payload_too_large", f"request body exceeds the limit of {limit} bytes")
        return body, status, {} if drained else {"Connection": "close"}

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException):
        code = (exc.name or "error").lower().replace(" ", "_")
        body, status = _error(exc.code or 500, code, exc.description or exc.name)
        # e.g. 405's Allow, which RFC 9110 requires; the exception's own Content-Type is HTML's
        extra = [(k, v) for k, v in exc.get_headers() if k.lower() != "content-type"]
        return body, status, extra

    @app.errorhandler(Exception)
    def unexpected(exc: Exception):
        log.exception("unhandled error")
        return _error(500, "internal_error", f"internal error: {type(exc).__name__}")
