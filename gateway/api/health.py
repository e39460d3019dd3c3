"""Liveness, readiness and Prometheus metrics."""
from __future__ import annotations

from flask import Blueprint, Response, current_app, jsonify

from gateway import metrics

bp = Blueprint("health", __name__)


@bp.get("/healthz")
def healthz():
    """The process is up and answering (no backend is consulted)."""
    return jsonify({"status": "ok"})


@bp.get("/readyz")
def readyz():
    """Ready when the default model has at least one ready route."""
    gateway = current_app.extensions["gateway"]
    model = gateway.model(None)
    ready_route = next((r.name for r in model.routes if gateway.route_ready(r)), None)
    body = {"ready": ready_route is not None, "default_model": model.name, "route": ready_route}
    return jsonify(body), 200 if ready_route else 503


@bp.get("/metrics")
def prometheus():
    payload, content_type = metrics.render()
    return Response(payload, content_type=content_type)
