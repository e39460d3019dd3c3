"""Peer: Seldon's MLServer with a custom inference runtime.

    run/peers/mlserver/venv/bin/python benchmarks/peers/mlserver_app.py PORT

Configuration (MLServer's docs, for a 2-core machine): parallel_workers = number of cores (2),
the docs' "parallel inference" (inference runs in that many worker processes, the HTTP server
in the main one); debug off (on by default: DEBUG logging); gRPC and the metrics server on free
loopback ports (they cannot be switched off); everything on 127.0.0.1. Each worker's onnxruntime
session takes cores // workers = 1 intra-op thread (the gateway's rule).

Request: raw JPEG bytes to a custom endpoint (MLServer's documented @custom_handler, which it
dispatches to the parallel workers like predict): POST /classify, Content-Type image/jpeg. The
V2 protocol's own infer endpoint would need the photo as base64 inside JSON.
"""
# no `from __future__ import annotations`: FastAPI reads the custom handler's signature through
# MLServer's wrapper, whose module cannot resolve the names of string annotations
import asyncio
import os
import socket
import sys
from typing import Annotated

from fastapi import Body
from mlserver import MLModel
from mlserver.handlers import custom_handler
from peer_model import Classifier

WORKERS = os.cpu_count() or 1


class ImageClassifier(MLModel):
    async def load(self) -> bool:
        self.model = Classifier(processes=WORKERS)
        return True

    @custom_handler(rest_path="/classify")
    async def classify(self, data: Annotated[bytes, Body(media_type="image/jpeg")]) -> dict:
        return {"predictions": self.model(data)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def main(port: int) -> None:
    from mlserver import MLServer
    from mlserver.settings import ModelSettings, Settings

    settings = Settings(host="127.0.0.1", http_port=port, grpc_port=free_port(), metrics_port=free_port(),
                        parallel_workers=WORKERS, debug=False)
    await MLServer(settings).start([ModelSettings(name="efficientnet_lite0",
                                                  implementation="mlserver_app.ImageClassifier")])


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))
