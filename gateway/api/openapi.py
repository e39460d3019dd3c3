"""GET /openapi.json: an OpenAPI 3.0 description of the API, built from the live config."""
from __future__ import annotations

from typing import Any

from flask import Blueprint, current_app, jsonify

from gateway.tasks import TASKS

bp = Blueprint("openapi", __name__)

ERROR = {
    "type": "object", "required": ["error"],
    "properties": {"error": {"type": "object", "required": ["code", "message"], "properties": {
        "code": {"type": "string"}, "message": {"type": "string"}, "backend": {"type": "string"},
        "routes_tried": {"type": "array", "items": {"type": "string"}},
        "request_id": {"type": "string", "description": "the answer's X-Request-Id"}}}},
}
TIMINGS = {"type": "object", "properties": {k: {"type": "number"} for k in ("preprocess", "inference", "postprocess",
                                                                          "total")}}


def _answer_schema(task) -> dict[str, Any]:
    """A v1 answer for ``task``: each image's results under the task's result key."""
    return {
        "type": "object", "required": ["model", "backend", "weights", "results", "timings_ms"],
        "properties": {
            "model": {"type": "string"}, "backend": {"type": "string"}, "route": {"type": "string"},
            "weights": {"type": "string"},
            "results": {"type": "array", "items": {"type": "object", "required": [task.result_key], "properties": {
                task.result_key: {"type": "array", "items": {"$ref": f"#/components/schemas/{task.result_name}"}}}}},
            "timings_ms": TIMINGS,
        },
    }


def _schema_name(task) -> str:
    return task.name.capitalize()  # Classification, Detection


def _error_responses(*statuses: int) -> dict:
    text = {400: "malformed request", 401: "missing or invalid API key", 404: "unknown model or backend",
            413: "body too large", 415: "unsupported content type", 502: "backend answered badly",
            503: "backend unavailable", 504: "backend timed out"}
    return {str(s): {"description": text[s], "content": {"application/json": {
        "schema": {"$ref": "#/components/schemas/Error"}}}} for s in statuses}


def _route_choices(models) -> list[str]:
    """What ?backend= accepts: a route name or the name of a backend a route uses."""
    return sorted({name for m in models for r in m.routes for name in (r.name, r.backend)})


def _images_body(config) -> dict:
    binary = {"schema": {"type": "string", "format": "binary"}}
    return {"required": True, "content": {
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
    }}


def _routing_params(models) -> list[dict]:
    return [
        {"name": "route", "in": "query", "required": False,
         "description": "force one route by its name; a name this model has no route for is a 404",
         "schema": {"type": "string", "enum": sorted({r.name for m in models for r in m.routes})}},
        {"name": "backend", "in": "query", "required": False,
         "description": "force the model's route to this backend (a route name is accepted too); "
                        "with route, that route must be on this backend",
         "schema": {"type": "string", "enum": _route_choices(models)}},
    ]


def _operation(config, task, with_model: bool) -> dict:
    """The model's task (classify, detect, ...) on one model or the default one."""
    if with_model:
        models = [m for m in config.models.values() if m.task.name == task.name]
    else:
        models = [config.models[config.server.default_model]]
    params = [{"name": name, "in": "query", "required": False, "schema": schema}
              for name, schema in task.query_schemas(config.server.default_top_k).items()]
    params += _routing_params(models)
    if with_model:
        params.insert(0, {"name": "model", "in": "path", "required": True,
                          "schema": {"type": "string", "enum": sorted(m.name for m in models)}})
    return {
        "summary": task.summary + ("" if with_model else " with the default model"),
        "parameters": params,
        "requestBody": _images_body(config),
        "responses": {
            "200": {"description": f"the {task.name} of each image", "content": {"application/json": {
                "schema": {"$ref": f"#/components/schemas/{_schema_name(task)}"}}}},
            **_error_responses(400, 401, 404, 413, 415, 502, 503, 504),
        },
    }


V2_ERROR = {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}}
V2_TENSOR = {"type": "object", "required": ["name", "datatype", "shape"], "properties": {
    "name": {"type": "string"}, "datatype": {"type": "string"},
    "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
    "parameters": {"type": "object"}, "data": {"type": "array"}}}


def _v2_paths(config) -> dict:
    """The Open Inference Protocol's REST part (gateway/v2/rest.py); tensors are not schema-checkable
    beyond their structure (a shape must match its data), so infer bodies are described, not enumerated."""
    from gateway.v2.protocol import model_views

    names = sorted(name for name, _, _ in model_views(config))
    versions = sorted({r.name for m in config.models.values() for r in m.routes})

    def v2_json(description: str) -> dict:
        return {"description": description, "content": {"application/json": {"schema": {"type": "object"}}}}

    error_body = {"application/json": {"schema": {"$ref": "#/components/schemas/V2Error"}}}
    errors = {str(s): {"description": d, "content": error_body}
              for s, d in ((400, "malformed request"), (401, "missing or invalid API key"),
                           (404, "unknown model or version"), (503, "not ready / backend unavailable"))}
    params = [{"name": "model", "in": "path", "required": True, "schema": {"type": "string", "enum": names}}]
    versioned = [*params, {"name": "version", "in": "path", "required": True,
                           "description": "a route name: forces that engine",
                           "schema": {"type": "string", "enum": versions}}]
    infer_body = {"required": True, "content": {
        "application/json": {"schema": {"type": "object", "required": ["inputs"], "properties": {
            "id": {"type": "string"}, "parameters": {"type": "object"},
            "inputs": {"type": "array", "minItems": 1, "items": {"$ref": "#/components/schemas/V2Tensor"}},
            "outputs": {"type": "array", "items": {"type": "object", "required": ["name"]}}}}},
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"},
                                     "description": "binary tensor extension: the JSON header "
                                                    "(Inference-Header-Content-Length bytes), then the tensors"}}}
    paths: dict = {
        "/v2": {"get": {"summary": "V2 server metadata", "responses": {"200": v2_json("name, version, extensions")}}},
        "/v2/health/live": {"get": {"summary": "V2 liveness", "responses": {"200": v2_json("live")}}},
        "/v2/health/ready": {"get": {"summary": "V2 readiness: every model has a ready route",
                                     "responses": {"200": v2_json("ready"), "503": v2_json("not ready")}}},
    }
    for prefix, parameters in (("/v2/models/{model}", params), ("/v2/models/{model}/versions/{version}", versioned)):
        paths[prefix] = {"get": {"summary": "V2 model metadata", "parameters": parameters,
                                 "responses": {"200": v2_json("name, versions (route names), inputs, outputs"),
                                               **{k: errors[k] for k in ("401", "404")}}}}
        paths[prefix + "/ready"] = {"get": {"summary": "V2 model readiness", "parameters": parameters,
                                            "responses": {"200": v2_json("ready"), **errors}}}
        paths[prefix + "/config"] = {"get": {"summary": "Triton model configuration", "parameters": parameters,
                                             "responses": {"200": v2_json("max_batch_size, input format, dims"),
                                                           **{k: errors[k] for k in ("401", "404")}}}}
        paths[prefix + "/infer"] = {"post": {"summary": "V2 inference (JSON or binary tensors)", "parameters": [
            *parameters, {"name": "Inference-Header-Content-Length", "in": "header", "required": False,
                          "schema": {"type": "integer", "minimum": 0}}],
            "requestBody": infer_body, "responses": {"200": {
                "description": "outputs (JSON, or a JSON header then binary tensors)", "content": {
                    "application/json": {"schema": {"type": "object"}},
                    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}},
                **errors, "502": errors["503"], "504": errors["503"]}}}
    return _default_error(paths, "V2Error")


def _default_error(paths: dict, schema: str) -> dict:
    """Every other status (405, 414, 431, ...) of every operation has the same JSON body."""
    for operations in paths.values():
        for operation in operations.values():
            operation["responses"].setdefault("default", {"description": "any other error", "content": {
                "application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}}})
    return paths


def _post_and_put(operation: dict, name: str) -> dict:
    return {"post": operation, "put": {**operation, "operationId": name + "Put"}}


def build_spec(config) -> dict:
    tasks = {m.task.name: m.task for m in config.models.values()}
    images: dict = {}
    default_task = config.models[config.server.default_model].task
    if default_task.name == "classification":
        images["/v1/classify"] = _post_and_put(_operation(config, default_task, False), "classify")
    for task in tasks.values():
        images[f"/v1/models/{{model}}/{task.verb}"] = _post_and_put(_operation(config, task, True),
                                                                   f"{task.verb}Model")
    json_ok = {"description": "OK", "content": {"application/json": {"schema": {"type": "object"}}}}
    model_param = {"name": "model", "in": "path", "required": True,
                   "schema": {"type": "string", "enum": sorted(config.models)}}
    paths = {
        **images,
        "/v1/models": {"get": {"summary": "List models", "responses": {"200": json_ok, **_error_responses(401)}}},
        "/v1/models/{model}": {"get": {"summary": "Describe one model", "parameters": [model_param],
                                       "responses": {"200": json_ok, **_error_responses(401, 404)}}},
        "/healthz": {"get": {"summary": "Liveness", "responses": {"200": json_ok}}},
        "/readyz": {"get": {"summary": "Readiness of the default model", "responses": {
            "200": json_ok, "503": json_ok}}},
        "/metrics": {"get": {"summary": "Prometheus metrics", "responses": {"200": {
            "description": "Prometheus text format", "content": {"text/plain": {"schema": {"type": "string"}}}},
            **_error_responses(401)}}},
    }
    paths = {**_default_error(paths, "Error"), **_v2_paths(config)}
    spec = {
        "openapi": "3.0.3",
        "info": {"title": "Image model gateway", "version": "1.0.0",
                 "description": "One API in front of embedded ONNX Runtime, Triton, TorchServe and TF Serving: "
                                "classification and object detection; /v2 is the Open Inference Protocol "
                                "(KServe V2) over the same models."},
        "paths": paths,
        "components": {"schemas": {"Error": ERROR, "V2Error": V2_ERROR, "V2Tensor": V2_TENSOR,
                                   **{t.result_name: t.result_schema for t in TASKS.values()},
                                   **{_schema_name(t): _answer_schema(t) for t in TASKS.values()}}},
    }
    if config.server.api_keys:
        _declare_keys(spec)
    return spec


def _declare_keys(spec: dict) -> None:
    """When the gateway requires a key: how to send it (/docs's "Authorize", then "Try it out"),
    on every operation but the probes that stay open (gateway/api/auth.py)."""
    from gateway.api.auth import OPEN_PATHS

    spec["components"]["securitySchemes"] = {
        "ApiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
        "Bearer": {"type": "http", "scheme": "bearer", "description": "Authorization: Bearer KEY"}}
    spec["security"] = [{"ApiKey": []}, {"Bearer": []}]
    for path in OPEN_PATHS & set(spec["paths"]):
        for operation in spec["paths"][path].values():
            operation["security"] = []


@bp.get("/openapi.json")
def openapi_json():
    return jsonify(build_spec(current_app.extensions["gateway"].config))
