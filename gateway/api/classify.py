"""POST|PUT /v1/classify, /v1/models/<model>/classify and /v1/models/<model>/detect."""
from __future__ import annotations

from flask import Blueprint, current_app, jsonify, request

from gateway.api.inputs import ROUTING_PARAMS, read_images, read_query, read_top_k
from gateway.detection import QUERY_FIELDS

bp = Blueprint("classify", __name__)
METHODS = ["POST", "PUT"]  # PUT: `curl -T photo.jpg URL` uploads with PUT


@bp.route("/v1/classify", methods=METHODS)
@bp.route("/v1/models/<model>/classify", methods=METHODS)
def classify(model: str | None = None):
    query = read_query(request, ("top_k", *ROUTING_PARAMS))
    result = current_app.extensions["gateway"].classify(
        model, read_images(request), top_k=read_top_k(query), route=query.get("route"), backend=query.get("backend"))
    return jsonify(result.to_dict())


@bp.route("/v1/models/<model>/detect", methods=METHODS)
def detect(model: str):
    query = read_query(request, (*QUERY_FIELDS, *ROUTING_PARAMS))
    params = {k: v for k, v in query.items() if k in QUERY_FIELDS}
    result = current_app.extensions["gateway"].detect(
        model, read_images(request), params, route=query.get("route"), backend=query.get("backend"))
    return jsonify(result.to_dict())
