"""POST|PUT /v1/classify and /v1/models/<model>/classify."""
from __future__ import annotations

from flask import Blueprint, current_app, jsonify, request

from gateway.api.inputs import read_images, read_params

bp = Blueprint("classify", __name__)
METHODS = ["POST", "PUT"]  # PUT: `curl -T photo.jpg URL` uploads with PUT


@bp.route("/v1/classify", methods=METHODS)
@bp.route("/v1/models/<model>/classify", methods=METHODS)
def classify(model: str | None = None):
    top_k, route, backend = read_params(request)
    result = current_app.extensions["gateway"].classify(model, read_images(request), top_k=top_k, route=route,
                                                        backend=backend)
    return jsonify(result.to_dict())
