"""The Flask app factory: one gateway, blueprints per API surface, errors as JSON."""
from __future__ import annotations

import logging

from flask import Flask, Response, jsonify, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from gateway import metrics, tracing
from gateway.api import access, auth, classify, health, models, openapi, traffic, ui
from gateway.api.uploads import UploadGuard
from gateway.config import GatewayConfig
from gateway.errors import GatewayError, PayloadTooLarge, TooManyRequests
from gateway.service import Gateway
from gateway.v2 import rest as v2_rest
from gateway.v2.protocol import Catalog

log = logging.getLogger("gateway")
# A refused body is read and discarded up to this many times the limit before the 413 goes out:
# clients that write the whole body before reading (urllib, many small ones) otherwise get
# "Broken pipe" instead of the answer. Beyond it the connection is closed unread.
DRAIN_FACTOR = 4


def create_app(config: GatewayConfig, gateway: Gateway | None = None) -> Flask:
    """``gateway`` replaces the one built from ``config`` (tests inject backends through it)."""
    app = Flask("gateway")
    app.config["MAX_CONTENT_LENGTH"] = config.server.max_body_bytes
    app.json.sort_keys = False  # type: ignore[attr-defined]
    if gateway is None:
        gateway = Gateway(config)
        gateway.load()
    app.extensions["gateway"] = gateway
    app.extensions["v2"] = Catalog(gateway)
    for bp in (classify.bp, models.bp, health.bp, openapi.bp, v2_rest.bp, ui.bp, traffic.bp):
        app.register_blueprint(bp)
    auth.install(app)
    register_error_handlers(app)
    server = config.server
    app.wsgi_app = UploadGuard(app.wsgi_app, server.max_body_bytes,  # type: ignore[method-assign]
                               server.min_upload_bytes_per_s, server.upload_grace_s)
    tracing.install(app)  # off unless OTEL_TRACES_EXPORTER is set; on: a server span around the upload guard

    @app.after_request
    def count(response: Response) -> Response:
        endpoint = request.url_rule.rule if request.url_rule else "unmatched"
        metrics.HTTP_RESPONSES.labels(request.method, endpoint, str(response.status_code)).inc()
        return response

    # last: the outermost WSGI layer, so every answer (a middleware's too) has its id and log line
    access.install(app, config.server.access_log)
    return app


def error_response(exc: GatewayError, headers=None):
    """The one way an error becomes an answer: its status, the JSON body, counted by code.
    Under /v2 the body is the Open Inference Protocol's ``{"error": "message"}``."""
    metrics.ERRORS.labels(str(exc.status), exc.code).inc()
    if exc.status >= 500:
        log.warning("%s %s", exc.status, exc.message)
    access.note_error(exc)
    v2 = request.path == "/v2" or request.path.startswith("/v2/")
    body = {"error": exc.message} if v2 else exc.to_dict(request_id=access.request_id())
    headers = dict(headers or {})
    if isinstance(exc, TooManyRequests):
        headers["Retry-After"] = str(exc.retry_after_s)
    return jsonify(body), exc.status, headers


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


def register_error_handlers(app: Flask) -> None:
    @app.errorhandler(GatewayError)
    def gateway_error(exc: GatewayError):
        return error_response(exc)

    @app.errorhandler(RequestEntityTooLarge)
    def too_large(exc):
        limit = app.config["MAX_CONTENT_LENGTH"]
        drained = drain_body(request.environ, DRAIN_FACTOR * limit)
        return error_response(PayloadTooLarge(f"request body exceeds the limit of {limit} bytes"),
                              None if drained else {"Connection": "close"})

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException):
        code = (exc.name or "error").lower().replace(" ", "_")
        # e.g. 405's Allow, which RFC 9110 requires; the exception's own Content-Type is HTML's
        headers = [(k, v) for k, v in exc.get_headers() if k.lower() != "content-type"]
        return error_response(GatewayError(exc.description or exc.name, code=code, status=exc.code or 500), headers)

    @app.errorhandler(Exception)
    def unexpected(exc: Exception):
        log.exception("unhandled error")
        return error_response(GatewayError(f"internal error: {type(exc).__name__}"))
