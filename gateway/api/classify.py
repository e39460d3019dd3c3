"""POST|PUT /v1/classify and /v1/models/<model>/classify."""
from __future__ import annotations

import time

from flask import Blueprint, current_app, jsonify, request

from gateway import metrics
from gateway.api.inputs import read_images, read_params
from gateway.errors import BackendError, GatewayError

bp = Blueprint("classify", __name__)
METHODS = ["POST", "PUT"]  # PUT: `curl -T photo.jpg URL` uploads with PUT


@bp.route("/v1/classify", methods=METHODS)
@bp.route("/v1/models/<model>/classify", methods=METHODS)
def classify(model: str | None = None):
    gateway = current_app.extensions["gateway"]
    started = time.perf_counter()
    model_label = model or gateway.config.server.default_model
    try:
        top_k, backend = read_params(request)
        images = read_images(request)
        result = gateway.classify(model, images, top_k=top_k, backend=backend)
    except GatewayError as exc:
        backend_label = exc.backend if isinstance(exc, BackendError) else "none"
        metrics.REQUESTS.labels(model_label, backend_label, str(exc.status)).inc()
        raise
    backend_name = result.route.backend
    metrics.REQUESTS.labels(result.model.name, backend_name, "200").inc()
    metrics.IMAGES.labels(result.model.name, backend_name).inc(len(result.predictions))
    metrics.LATENCY.labels(result.model.name, backend_name).observe(time.perf_counter() - started)
    metrics.INFERENCE.labels(result.model.name, backend_name).observe(result.timings_ms["inference"] / 1e3)
    return jsonify(result.to_dict())
