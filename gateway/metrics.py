"""Prometheus metrics; multi-process aware when served by several gunicorn workers.

``gateway serve`` sets PROMETHEUS_MULTIPROC_DIR before any worker starts, so every
worker writes its samples there and ``/metrics`` aggregates them. Model metrics are
recorded by the service (gateway.service.Gateway.observed, .run); HTTP answers, every one
of them, by the app (gateway.app).
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import GaugeMetricFamily

LATENCY_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1, 2.5, 5, 10, 30)

REQUESTS = Counter("gateway_requests_total", "Model requests by the status they ended with",
                   ["model", "backend", "status", "protocol"])
IMAGES = Counter("gateway_images_total", "Images answered", ["model", "backend"])
HTTP_RESPONSES = Counter("gateway_http_responses_total", "Every HTTP answer", ["method", "endpoint", "status"])
GRPC_RESPONSES = Counter("gateway_grpc_responses_total", "Every gRPC answer (the V2 front)", ["method", "code"])
ERRORS = Counter("gateway_errors_total", "Error responses by status and error code", ["status", "code"])
LATENCY = Histogram("gateway_request_latency_seconds", "Model request latency (whole request)",
                    ["model", "backend"], buckets=LATENCY_BUCKETS)
IN_FLIGHT = Gauge("gateway_in_flight", "Requests admitted and not yet answered", ["model"],
                  multiprocess_mode="livesum")
QUEUED = Gauge("gateway_queued", "Requests waiting for admission (a model's slot, or the CPU)", ["model"],
               multiprocess_mode="livesum")
REJECTED = Counter("gateway_rejected_total", "Requests refused by admission control (429) or dropped at their "
                   "deadline while waiting (504)", ["model", "reason"])
QUEUE_WAIT = Histogram("gateway_queue_wait_seconds", "Time a request waited for admission", ["model"],
                       buckets=LATENCY_BUCKETS)
INFERENCE = Histogram("gateway_inference_latency_seconds", "Backend inference latency",
                      ["model", "backend"], buckets=LATENCY_BUCKETS)
# Set by gateway.breaker; the most open over the live workers (each has its own breakers)
BREAKER_OPEN = Gauge("gateway_breaker_open", "1 while a route's circuit breaker is open or half-open (from a failure "
                     "until the route answers again), 0 once it answered", ["model", "route", "backend"],
                     multiprocess_mode="livemax")


def render() -> tuple[bytes, str]:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry) + _readiness(), CONTENT_TYPE_LATEST
    from prometheus_client import REGISTRY

    return generate_latest(REGISTRY) + _readiness(), CONTENT_TYPE_LATEST


def _readiness() -> bytes:
    """``gateway_route_ready{model,route,backend}``: 1 when the route's engine says it can serve
    now, asked when /metrics is scraped (the gateway's readiness check, cached 1 s; every route at
    once, so engines that do not answer cost one timeout, not one each). Empty outside a request."""
    from flask import current_app, has_app_context

    gateway = current_app.extensions.get("gateway") if has_app_context() else None
    if gateway is None:
        return b""
    routes = [r for m in gateway.config.models.values() for r in m.routes]
    family = GaugeMetricFamily("gateway_route_ready", "1 when the route's engine can serve it now (asked at scrape "
                               "time), else 0", labels=["model", "route", "backend"])
    with ThreadPoolExecutor(max(1, min(16, len(routes))), thread_name_prefix="ready") as pool:
        for route, ready in zip(routes, pool.map(gateway.route_ready, routes)):
            family.add_metric([route.model, route.name, route.backend], 1.0 if ready else 0.0)
    registry = CollectorRegistry()
    registry.register(_Families([family]))
    return generate_latest(registry)


class _Families:
    def __init__(self, families: list):
        self.families = families

    def collect(self):
        return self.families


# Traffic between a model's routes (gateway/traffic.py): the weighted split, shadow routes compared
# with the primary that answered, and the guard that zeroes a failing canary.
TRAFFIC_WEIGHT = Gauge("gateway_traffic_weight", "A route's share of its model's weighted split (0..1; the most "
                       "recent worker's view)", ["model", "route"], multiprocess_mode="livemostrecent")
TRAFFIC_SPLIT = Counter("gateway_traffic_split_total", "Requests the weighted split sent first to a route",
                        ["model", "route"])
SHADOW_CALLS = Counter("gateway_shadow_calls_total", "Shadow copies by outcome: compared, error, dropped (the shadow "
                       "queue was full)", ["model", "primary", "shadow", "outcome"])
SHADOW_ERRORS = Counter("gateway_shadow_errors_total", "Shadow calls that failed, by error code",
                        ["model", "primary", "shadow", "code"])
SHADOW_AGREEMENT = Histogram("gateway_shadow_agreement", "Per compared image, 0..1: top1 (1 when the top classes "
                             "agree), top5 (overlap of the top 5), boxes (fraction of boxes matched by class at IoU "
                             ">= 0.5); sum/count is the agreement rate", ["model", "primary", "shadow", "measure"],
                             buckets=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0))
SHADOW_SCORE_DIFF = Histogram("gateway_shadow_max_score_difference", "Per compared image: the largest |score "
                              "difference| between primary and shadow", ["model", "primary", "shadow"],
                              buckets=(1e-6, 1e-5, 1e-4, 1e-3, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0))
SHADOW_LATENCY_RATIO = Histogram("gateway_shadow_latency_ratio", "A shadow's engine time over the primary's "
                                 "(inference + postprocessing)", ["model", "primary", "shadow"],
                                 buckets=(0.1, 0.25, 0.5, 0.8, 1.0, 1.25, 1.5, 2, 4, 10, 100))
GUARD_TRIPS = Counter("gateway_guard_trips_total", "Canary routes whose weight the guard set to 0, by reason "
                      "(error_rate, agreement)", ["model", "route", "reason"])
