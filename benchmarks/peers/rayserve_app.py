"""Peer: Ray Serve.

    run/peers/rayserve/venv/bin/python benchmarks/peers/rayserve_app.py PORT

Configuration (Ray Serve's docs, for a 2-core machine): a local Ray instance of 2 CPUs on
127.0.0.1 (no dashboard, no usage stats, a small object store); one deployment of
num_replicas = number of cores (2) with num_cpus=1 each (Ray's unit of scheduling: one replica
per core), max_ongoing_requests at its default (5); the HTTP proxy on 127.0.0.1:PORT. The
deployment's `async __call__` reads the body and runs the blocking inference in the replica's
thread pool (asyncio.to_thread: Ray Serve's advice for blocking code in async methods). Each
replica's onnxruntime session takes cores // replicas = 1 intra-op thread (the gateway's rule).
Access log off (Ray Serve writes one line per request by default): the peers write no line per
request (see peer_model.py).
"""
from __future__ import annotations

import asyncio
import os
import signal
import sys
import time

import ray
from peer_model import Classifier
from ray import serve
from starlette.requests import Request

REPLICAS = os.cpu_count() or 1


@serve.deployment(num_replicas=REPLICAS, ray_actor_options={"num_cpus": 1})
class ImageClassifier:
    def __init__(self) -> None:
        self.model = Classifier(processes=REPLICAS)

    async def __call__(self, request: Request) -> dict:
        data = await request.body()
        return {"predictions": await asyncio.to_thread(self.model, data)}


if __name__ == "__main__":
    # SIGTERM (the driver's stop) exits through atexit, where Ray shuts its own processes down
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    ray.init(address="local", num_cpus=os.cpu_count() or 1, include_dashboard=False, _node_ip_address="127.0.0.1",
             object_store_memory=256 * 1024 * 1024, _temp_dir=os.environ.get("PEER_RAY_TMP"))
    serve.start(http_options={"host": "127.0.0.1", "port": int(sys.argv[1])},
                logging_config={"enable_access_log": False})
    serve.run(ImageClassifier.bind(), route_prefix="/classify", logging_config={"enable_access_log": False})
    while True:  # serve.run returns once the replicas are up; the driver stops us with SIGTERM
        time.sleep(3600)
