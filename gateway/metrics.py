"""Prometheus metrics; multi-process aware when served by several gunicorn workers.

``gateway serve`` sets PROMETHEUS_MULTIPROC_DIR before any worker starts, so every
worker writes its samples there and ``/metrics`` aggregates them. Model metrics are
recorded by the service (gateway.service.Gateway.observed, .run); HTTP answers, every one
of them, by the app (gateway.app).
"""
from __future__ import annotations

import os

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest, multiprocess

LATENCY_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1, 2.5, 5, 10, 30)

REQUESTS = Counter("gateway_requests_total", "Model requests by the status they ended with",
                   ["model", "backend", "status", "protocol"])
IMAGES = Counter("gateway_images_total", "Images answered", ["model", "backend"])
HTTP_RESPONSES = Counter("gateway_http_responses_total", "Every HTTP answer", ["method", "endpoint", "status"])
GRPC_RESPONSES = Counter("gateway_grpc_responses_total", "Every gRPC answer (the V2 front)", ["method", "code"])
ERRORS = Counter("gateway_errors_total", "Error responses by status and error code", ["status", "code"])
LATENCY = Histogram("gateway_request_latency_seconds", "Model request latency (whole request)",
                    ["model", "backend"], buckets=LATENCY_BUCKETS)
INFERENCE = Histogram("gateway_inference_latency_seconds", "Backend inference latency",
                      ["model", "backend"], buckets=LATENCY_BUCKETS)


def render() -> tuple[bytes, str]:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    from prometheus_client import REGISTRY

    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
