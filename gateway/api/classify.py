"""POST|PUT /v1/classify and /v1/models/<model>/<verb>: a model's task on photos (classify, detect)."""
from __future__ import annotations

from flask import Blueprint, abort, current_app, jsonify, request

from gateway import deadlines
from gateway.api.inputs import ROUTING_PARAMS, read_images, read_query
from gateway.tasks import TASKS

bp = Blueprint("classify", __name__)
METHODS = ["POST", "PUT"]  # PUT: `curl -T photo.jpg URL` uploads with PUT
VERBS = {task.verb: task for task in TASKS.values()}


@bp.route("/v1/classify", methods=METHODS, defaults={"model": None, "verb": "classify"})
@bp.route("/v1/models/<model>/<verb>", methods=METHODS)
def infer(model: str | None, verb: str):
    task = VERBS.get(verb)
    if task is None:
        abort(404)
    query = read_query(request, (*task.query, *ROUTING_PARAMS))
    options = {k: v for k, v in query.items() if k in task.query}
    answer = current_app.extensions["gateway"].infer(
        model, read_images(request), task=task.name, options=options, route=query.get("route"),
        backend=query.get("backend"), timeout_s=deadlines.parse_seconds(request.headers.get(deadlines.HEADER)))
    return jsonify(answer.to_dict())
