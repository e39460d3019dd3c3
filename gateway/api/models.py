"""GET /v1/models and /v1/models/<model>: what is served, how, and whether it is ready."""
from __future__ import annotations

import functools
import json
from pathlib import Path

from flask import Blueprint, current_app, jsonify

bp = Blueprint("models", __name__)


def _route_info(gateway, route, with_metadata: bool) -> dict:
    info = {
        "name": route.name, "backend": route.backend,
        "kind": gateway.config.backends[route.backend].kind,
        "backend_model": route.backend_model, "version": route.version,
        "preprocess": route.preprocess.to_dict(), "output": route.output,
        "ready": gateway.route_ready(route), **gateway.health.state(route),
        **built_figures(gateway.config.server.artifacts, route.model, route.backend_model),
    }
    if with_metadata and info["ready"]:
        try:
            info["metadata"] = gateway.backends[route.backend].metadata(route)
        except Exception as exc:  # metadata is informative only; never fail the listing
            info["metadata"] = {"error": str(exc)}
    return info


def describe(gateway, model, with_metadata: bool = False) -> dict:
    routes = [_route_info(gateway, r, with_metadata) for r in model.routes]
    return {
        "name": model.name, **model.task.describe(model.output), "weights": model.weights, "labels": len(model.labels),
        "labels_source": model.labels_source,
        "preprocess": model.preprocess.to_dict(), "preprocess_source": model.preprocess_source,
        "default": model.name == gateway.config.server.default_model,
        "ready": any(r["ready"] for r in routes), "routes": routes,
    }


@bp.get("/v1/models")
def list_models():
    gateway = current_app.extensions["gateway"]
    return jsonify({"default_model": gateway.config.server.default_model,
                    "models": [describe(gateway, m) for m in gateway.config.models.values()]})


@bp.get("/v1/models/<model>")
def get_model(model: str):
    gateway = current_app.extensions["gateway"]
    return jsonify(describe(gateway, gateway.model(model), with_metadata=True))


def built_figures(artifacts: Path, model: str, backend_model: str) -> dict:
    """The route's precision, and its model file's accuracy and speed as the last `gateway models
    build` measured them (artifacts.json: the int8 gate's figures, FP32 and int8 side by side)."""
    try:
        stat = Path(artifacts).stat()
        int8 = _manifest(str(artifacts), stat.st_mtime_ns)["models"][model].get("int8") or {}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        int8 = {}
    precision = "int8" if backend_model == int8.get("backend_model") else "fp32"
    figures = (int8.get("report") or {}).get(precision) or {}
    return {"precision": precision, "accuracy": figures.get("accuracy"), "speed": figures.get("speed")}


@functools.lru_cache(maxsize=4)
def _manifest(path: str, mtime_ns: int) -> dict:  # read again when a build rewrites it
    return json.loads(Path(path).read_text())
