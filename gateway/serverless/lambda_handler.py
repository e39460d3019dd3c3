"""AWS Lambda entry point (``gateway.serverless.lambda_handler.handler``): the gateway's own
Flask app behind apig-wsgi.

apig-wsgi turns API Gateway REST (payload 1.0), HTTP API (2.0), function URL and ALB events
into WSGI requests and the answers back into their response shapes, so the function serves
the same HTTP API, bodies, errors and status codes as ``gateway serve``.

The app (config, backends, ONNX Runtime sessions) is built once per execution environment,
on its first event, and reused by every later one; importing this module costs nothing.

Environment:
  GATEWAY_CONFIG     the YAML (default: lambda.yaml beside this module, embedded backend only)
  GATEWAY_MODEL_DIR  where embedded backends find ``<model>.onnx`` (a layer under /opt, an EFS mount)
"""
from __future__ import annotations

import os
from pathlib import Path

DEFAULT_CONFIG = Path(__file__).with_name("lambda.yaml")

_handler = None  # the apig-wsgi handler around the app, once built


def load_lambda_config():
    """The config named by GATEWAY_CONFIG, with GATEWAY_MODEL_DIR applied to embedded backends."""
    from gateway.config import load_config

    config = load_config(os.environ.get("GATEWAY_CONFIG") or DEFAULT_CONFIG)
    model_dir = os.environ.get("GATEWAY_MODEL_DIR")
    if model_dir:
        for name, backend in config.backends.items():
            if backend.kind == "embedded":
                config = config.with_backend(name, model_dir=model_dir)
    return config


def init():
    """Build the app unless this execution environment already has (imports, config, model load)."""
    global _handler
    if _handler is None:
        from apig_wsgi import make_lambda_handler

        from gateway.app import create_app

        try:
            app = create_app(load_lambda_config())
        except ModuleNotFoundError as exc:  # e.g. a triton backend: the zip leaves tritonclient out
            raise RuntimeError(f"the gateway config needs the Python module {exc.name!r}, which this Lambda "
                               "bundle does not include (it serves embedded, TorchServe and TF Serving REST "
                               "backends)") from exc
        # weights apply as in `gateway serve`; shadows do not: Lambda freezes the environment once the
        # answer is returned, so a copy sent after it would run (or time out) during later invocations
        app.extensions["gateway"].traffic.shadows_enabled = False
        _handler = make_lambda_handler(app)
    return _handler


def handler(event: dict, context) -> dict:
    return init()(event, context)
