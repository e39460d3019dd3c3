"""Optional API-key auth (off unless ``server.api_keys`` lists keys).

Keys come in ``X-API-Key: KEY`` or ``Authorization: Bearer KEY`` and are compared in
constant time. Liveness/readiness stay open so orchestrators can probe without a key, and so do
the browser pages (``/ui``, ``/docs`` and their assets), whose API calls carry the key.
"""
from __future__ import annotations

import hmac
from collections.abc import Callable

from flask import Flask, current_app, request

from gateway.errors import Unauthorized

OPEN_PATHS = frozenset({"/healthz", "/readyz", "/v2/health/live", "/v2/health/ready"})
OPEN_FLAG = "open_without_key"


def open_without_key(view):
    """Mark a view that answers without a key: the browser pages and their static assets
    (gateway/api/ui.py), which hold no data; the API calls they make carry the key."""
    setattr(view, OPEN_FLAG, True)
    return view


def presented_key(header: Callable[[str], str | None]) -> str | None:
    """The key a request carries, from ``header(name)`` (HTTP headers, or gRPC metadata)."""
    key = header("X-API-Key")
    if key:
        return key
    scheme, _, token = (header("Authorization") or "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def key_is_valid(presented: str, keys: tuple[str, ...]) -> bool:
    presented_b = presented.encode()
    # compare against every key (no early exit) so timing reveals nothing
    return sum(hmac.compare_digest(presented_b, k.encode()) for k in keys) > 0


def require_key(presented: str | None, keys: tuple[str, ...]) -> None:
    """Nothing when ``keys`` is empty or ``presented`` is one of them; 401 otherwise."""
    if not keys:
        return
    if presented is None:
        raise Unauthorized("missing API key: send it as X-API-Key: KEY or 'Authorization: Bearer KEY' "
                           "(HTTP headers, or gRPC metadata)", code="missing_api_key")
    if not key_is_valid(presented, keys):
        raise Unauthorized("invalid API key", code="invalid_api_key")


def install(app: Flask) -> None:
    @app.before_request
    def require_api_key():
        view = current_app.view_functions.get(request.endpoint or "")
        if request.path not in OPEN_PATHS and not getattr(view, OPEN_FLAG, False):
            require_key(presented_key(request.headers.get), current_app.extensions["gateway"].config.server.api_keys)
