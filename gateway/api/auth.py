"""Optional API-key auth (off unless ``server.api_keys`` lists keys).

Keys come in ``X-API-Key: KEY`` or ``Authorization: Bearer KEY`` and are compared in
constant time. Liveness/readiness stay open so orchestrators can probe without a key.
"""
from __future__ import annotations

import hmac

from flask import Flask, current_app, request

from gateway.errors import Unauthorized

OPEN_PATHS = frozenset({"/healthz", "/readyz", "/v2/health/live", "/v2/health/ready"})


def _presented_key() -> str | None:
    key = request.headers.get("X-API-Key")
    if key:
        return key
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def key_is_valid(presented: str, keys: tuple[str, ...]) -> bool:
    presented_b = presented.encode()
    # compare against every key (no early exit) so timing reveals nothing
    return sum(hmac.compare_digest(presented_b, k.encode()) for k in keys) > 0


def install(app: Flask) -> None:
    @app.before_request
    def require_api_key():
        keys = current_app.extensions["gateway"].config.server.api_keys
        if not keys or request.path in OPEN_PATHS:
            return None
        presented = _presented_key()
        if presented is None:
            raise Unauthorized("missing API key: send it in the X-API-Key header or as "
                               "'Authorization: Bearer KEY'", code="missing_api_key")
        if not key_is_valid(presented, keys):
            raise Unauthorized("invalid API key", code="invalid_api_key")
        return None
