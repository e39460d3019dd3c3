"""Errors the gateway answers with: each carries its HTTP status and a stable code.

``to_dict()`` is the one error body every answer uses: ``{"error": {"code", "message"}}``,
plus ``"backend"`` for backend faults.
"""
from __future__ import annotations


class GatewayError(Exception):
    status = 500
    code = "internal_error"

    def __init__(self, message: str, *, code: str | None = None, status: int | None = None):
        super().__init__(message)
        self.message = message
        if code:
            self.code = code
        if status:
            self.status = status

    def to_dict(self) -> dict:
        return {"error": {"code": self.code, "message": self.message}}


class BadRequest(GatewayError):
    status, code = 400, "bad_request"


class Unauthorized(GatewayError):
    status, code = 401, "unauthorized"


class NotFound(GatewayError):
    status, code = 404, "not_found"


class PayloadTooLarge(GatewayError):
    status, code = 413, "payload_too_large"


class UnsupportedMediaType(GatewayError):
    status, code = 415, "unsupported_media_type"


class TooManyRequests(GatewayError):
    status, code = 429, "too_many_requests"


class BackendError(GatewayError):
    """A backend failed; the message always names the backend."""

    status, code = 502, "backend_error"

    def __init__(self, backend: str, message: str, **kw):
        super().__init__(f"backend {backend!r}: {message}", **kw)
        self.backend = backend
        self.routes_tried: tuple[str, ...] = ()  # set when every route of a model failed

    def to_dict(self) -> dict:
        body = super().to_dict()
        body["error"]["backend"] = self.backend
        if self.routes_tried:
            body["error"]["routes_tried"] = list(self.routes_tried)
        return body


class BackendUnavailable(BackendError):
    """Cannot connect, not ready, or model not loaded (503). Failover may try the next route."""

    status, code = 503, "backend_unavailable"


class BackendTimeout(BackendError):
    """The backend did not answer within its timeout (504). Failover may try the next route."""

    status, code = 504, "backend_timeout"


class BackendBadResponse(BackendError):
    """The backend answered something unusable (502)."""

    status, code = 502, "bad_backend_response"


class BackendRejected(BackendError):
    """The backend refused the tensor we sent (a gateway/config mismatch: 502)."""

    status, code = 502, "backend_rejected_input"


def all_routes_failed(model: str, failures: list[BackendError], routes: list[str]) -> BackendError:
    """One error for a request whose every route failed over: the last failure's kind (503
    or 504) and backend stand for the request; the message lists every route's fault and
    ``routes_tried`` names the routes in the order they were tried."""
    if len(failures) == 1:
        error = failures[0]
    else:
        last = failures[-1]
        error = type(last)(last.backend, f"every route of model {model!r} failed ({', '.join(routes)}): "
                                         + "; ".join(f.message for f in failures))
    error.routes_tried = tuple(routes)
    return error
