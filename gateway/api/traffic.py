"""GET|PUT /v1/models/<model>/traffic: a model's split, shadows and guard, read and changed at run time.

GET (read-only, an API key when the server has them): the weights, shadows with their counts and
agreement rates, latency percentiles since start, the guard's state and the change log
(gateway.traffic.Traffic.report). PUT (an admin's change, JSON ``{"weights": {route: n},
"shadows": [{"route", "fraction", "timeout_s"}], "guard": {...}, "by": "who"}``, any of them) needs
an admin key, ``X-Admin-Key``, one of ``server.admin_keys`` (never an API key); a server with no
admin keys takes changes from loopback clients only. Every HTTP request's ``X-Traffic-Key`` is
handed to the split here.
"""
from __future__ import annotations

import hmac

from flask import Blueprint, current_app, jsonify, request

from gateway import traffic
from gateway.errors import GatewayError

bp = Blueprint("traffic", __name__)
ADMIN_HEADER = "X-Admin-Key"
LOOPBACK = ("127.0.0.1", "::1", "localhost")


@bp.before_app_request
def traffic_key() -> None:
    """The request's key for the weighted split (every request: none when the header is absent)."""
    traffic.set_request_key(request.headers.get(traffic.KEY_HEADER))


@bp.get("/v1/models/<model>/traffic")
def show(model: str):
    gateway = current_app.extensions["gateway"]
    return jsonify(gateway.traffic.report(gateway.model(model), gateway.health))


@bp.put("/v1/models/<model>/traffic")
def change(model: str):
    gateway = current_app.extensions["gateway"]
    chosen = gateway.model(model)
    who = admin(gateway.config.server.admin_keys)
    body = request.get_json(silent=True)
    entry = gateway.traffic.change(chosen, body, who)
    return jsonify({"change": entry, **gateway.traffic.report(chosen, gateway.health)})


def admin(keys: tuple[str, ...]) -> str:
    """Who makes a change: the admin key's number (never the key) and the client's address; a
    401/403 naming ``server.admin_keys`` when the request may not."""
    address = request.remote_addr or "unknown"
    if not keys:
        if address not in LOOPBACK:
            raise GatewayError("traffic changes need an admin key: set server.admin_keys (or ask from the "
                               "gateway's own host)", code="admin_key_required", status=403)
        return f"loopback client {address}, no server.admin_keys"
    presented = request.headers.get(ADMIN_HEADER)
    if not presented:
        raise GatewayError(f"missing admin key: send it as {ADMIN_HEADER}: KEY (one of server.admin_keys)",
                           code="missing_admin_key", status=401)
    matches = [hmac.compare_digest(presented.encode(), key.encode()) for key in keys]  # every key: no early exit
    if not any(matches):
        raise GatewayError("invalid admin key", code="invalid_admin_key", status=403)
    return f"admin key #{matches.index(True) + 1} from {address}"
