"""Errors the gateway answers with: each carries its HTTP status and a stable code."""
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


class NotFound(GatewayError):
    status, code = 404, "not_found"


class PayloadTooLarge(GatewayError):
    status, code = 413, "payload_too_large"


class UnsupportedMediaType(GatewayError):
    status, code = 415, "unsupported_media_type"


class Unauthorized(GatewayError):
    status, code = 401, "unauthorized"


class BackendError(GatewayError):
    """A backend failed; the message always names the backend."""

    status, code = 502, "backend_error"

    def __init__(self, backend: str, message: str, **kw):
        super().__init__(f"backend {backend!r}: {message}", **kw)
        self.backend = backend

    def to_dict(self) -> dict:
        body = super().to_dict()
        body["error"]["backend"] = self.backend
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
