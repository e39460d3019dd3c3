"""GET /openapi.json: an OpenAPI 3.0 description of the API, built from the live config."""
from __future__ import annotations

from flask import Blueprint, current_app, jsonify

bp = Blueprint("openapi", __name__)

ERROR = {
    "type": "object", "required": ["error"],
    "properties": {"error": {"type": "object", "required": ["code", "message"], "properties": {
        "code": {"type": "string"}, "message": {"type": "string"}, "backend": {"type": "string"}}}},
}
PREDICTION = {"type": "object", "required": ["label", "index", "score"], "properties": {
    "label": {"type": "string"}, "index": {"type": "integer", "minimum": 0},
    "score": {"type": "number", "minimum": 0, "maximum": 1}}}
CLASSIFICATION = {
    "type": "object", "required": ["model", "backend", "weights", "results", "timings_ms"],
    "properties": {
        "model": {"type": "string"}, "backend": {"type": "string"}, "route": {"type": "string"},
        "weights": {"type": "string"},
        "results": {"type": "array", "items": {"type": "object", "required": ["predictions"], "properties": {
            "predictions": {"type": "array", "items": {"$ref": "#/components/schemas/Prediction"}}}}},
        "timings_ms": {"type": "object", "properties": {
            k: {"type": "number"} for k in ("preprocess", "inference", "postprocess", "total")}},
    },
}


def _error_responses(*statuses: int) -> dict:
    text = {400: "malformed request", 401: "missing or invalid API key", 404: "unknown model or backend",
            413: "body too large", 415: "unsupported content type", 502: "backend answered badly",
            503: "backend unavailable", 504: "backend timed out"}
    return {str(s): {"description": text[s], "content": {"application/json": {
        "schema": {"$ref": "#/components/schemas/Error"}}}} for s in statuses}


def _route_choices(models) -> list[str]:
    """What ?backend= accepts: a route name or the name of a backend a route uses."""
    return sorted({name for m in models for r in m.routes for name in (r.name, r.backend)})


def _classify_operation(config, with_model: bool) -> dict:
    models = config.models.values() if with_model else [config.models[config.server.default_model]]
    params = [
        {"name": "top_k", "in": "query", "required": False,
         "schema": {"type": "integer", "minimum": 1, "maximum": 1000, "default": config.server.default_top_k}},
        {"name": "route", "in": "query", "required": False,
         "description": "force one route by its name; a name this model has no route for is a 404",
         "schema": {"type": "string", "enum": sorted({r.name for m in models for r in m.routes})}},
        {"name": "backend", "in": "query", "required": False,
         "description": "force the model's route to this backend (a route name is accepted too); "
                        "with route, that route must be on this backend",
         "schema": {"type": "string", "enum": _route_choices(models)}},
    ]
    if with_model:
        params.insert(0, {"name": "model", "in": "path", "required": True,
                          "schema": {"type": "string", "enum": sorted(config.models)}})
    binary = {"schema": {"type": "string", "format": "binary"}}
    return {
        "summary": "Classify one or more images" + ("" if with_model else " with the default model"),
        "parameters": params,
        "requestBody": {"required": True, "content": {
            "image/jpeg": binary, "image/png": binary, "application/octet-stream": binary,
            "multipart/form-data": {"schema": {
                "type": "object", "required": ["image"], "additionalProperties": False,
                "properties": {"image": {"type": "array", "minItems": 1, "items": {"type": "string", "format": "binary"},
                                         "description": f"one file per image, at most {config.server.max_images}"}}}},
            "application/json": {"schema": {"oneOf": [
                {"type": "object", "required": ["image"], "additionalProperties": False, "properties": {
                    "image": {"type": "string", "format": "byte", "minLength": 4,
                              "description": "base64 (a data: URL is accepted too)"}}},
                {"type": "object", "required": ["images"], "additionalProperties": False, "properties": {
                    "images": {"type": "array", "minItems": 1, "maxItems": config.server.max_images, "items": {
                    "type": "string", "format": "byte", "minLength": 4}}}},
            ]}},
        }},
        "responses": {
            "200": {"description": "top-k per image, in request order", "content": {"application/json": {
                "schema": {"$ref": "#/components/schemas/Classification"}}}},
            **_error_responses(400, 401, 404, 413, 415, 502, 503, 504),
        },
    }


def build_spec(config) -> dict:
    classify_model = _classify_operation(config, True)
    classify_default = _classify_operation(config, False)
    json_ok = {"description": "OK", "content": {"application/json": {"schema": {"type": "object"}}}}
    model_param = {"name": "model", "in": "path", "required": True,
                   "schema": {"type": "string", "enum": sorted(config.models)}}
    return {
        "openapi": "3.0.3",
        "info": {"title": "Image classification gateway", "version": "1.0.0",
                 "description": "One API in front of embedded ONNX Runtime, Triton, TorchServe and TF Serving."},
        "paths": {
            "/v1/classify": {"post": classify_default, "put": {**classify_default, "operationId": "classifyPut"}},
            "/v1/models/{model}/classify": {"post": classify_model,
                                            "put": {**classify_model, "operationId": "classifyModelPut"}},
            "/v1/models": {"get": {"summary": "List models", "responses": {"200": json_ok, **_error_responses(401)}}},
            "/v1/models/{model}": {"get": {"summary": "Describe one model", "parameters": [model_param],
                                           "responses": {"200": json_ok, **_error_responses(401, 404)}}},
            "/healthz": {"get": {"summary": "Liveness", "responses": {"200": json_ok}}},
            "/readyz": {"get": {"summary": "Readiness of the default model", "responses": {
                "200": json_ok, "503": json_ok}}},
            "/metrics": {"get": {"summary": "Prometheus metrics", "responses": {"200": {
                "description": "Prometheus text format", "content": {"text/plain": {"schema": {"type": "string"}}}},
                **_error_responses(401)}}},
        },
        "components": {"schemas": {"Error": ERROR, "Prediction": PREDICTION, "Classification": CLASSIFICATION}},
    }


@bp.get("/openapi.json")
def openapi_json():
    return jsonify(build_spec(current_app.extensions["gateway"].config))
