"""Errors the gateway answers with: each carries its HTTP status and a stable code.

``to_dict()`` is the one error body every answer uses: ``{"error": {"code", "message"}}``,
plus ``"backend"`` for backend faults and ``"request_id"`` (the answer's X-Request-Id) when given.
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

    def to_dict(self, request_id: str | None = None) -> dict:
        error = {"code": self.code, "message": self.message, **self.details()}
        if request_id is not None:
            error["request_id"] = request_id
        return {"error": error}

    def details(self) -> dict:
        """What a kind of error adds to its body."""
        return {}


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
    """Over a bound (in flight, queued): come back later. ``retry_after_s`` is the Retry-After header."""

    status, code = 429, "too_many_requests"
    retry_after_s = 1


class DeadlineExceeded(GatewayError):
    """The request's own deadline (the client's timeout, or request_timeout_s) passed before an
    engine was called; the message names the stage."""

    status, code = 504, "deadline_exceeded"


class BackendError(GatewayError):
    """A backend failed; the message always names the backend."""

    status, code = 502, "backend_error"

    def __init__(self, backend: str, message: str, **kw):
        super().__init__(f"backend {backend!r}: {message}", **kw)
        self.backend = backend
        self.routes_tried: tuple[str, ...] = ()  # set when every route of a model failed

    def details(self) -> dict:
        if self.routes_tried:
            return {"backend": self.backend, "routes_tried": list(self.routes_tried)}
        return {"backend": self.backend}


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
