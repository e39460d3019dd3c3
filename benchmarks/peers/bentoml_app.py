"""Peer: BentoML (a 1.2+ style service).

    run/peers/bentoml/venv/bin/python benchmarks/peers/bentoml_app.py PORT
    (runs `bentoml serve bentoml_app:ImageClassifier --host 127.0.0.1 --port PORT`)

Configuration (BentoML's docs, for a 2-core machine): workers="cpu_count" (one worker process per
core: the docs' setting for CPU-bound services); a synchronous API, which BentoML runs in its
thread pool (threads=1 per worker, its default) off the event loop. Each worker's onnxruntime
session takes cores // workers = 1 intra-op thread (the gateway's rule). Access log off (BentoML
logs every request by default): the peers write no line per request (see peer_model.py).

Request: raw JPEG bytes: a positional-only parameter (`data: bytes, /`) makes the request body
itself the input (BentoML's "root input").
"""
from __future__ import annotations

import os
import sys

import bentoml
from peer_model import Classifier

WORKERS = os.cpu_count() or 1


@bentoml.service(workers="cpu_count", logging={"access": {"enabled": False}})
class ImageClassifier:
    def __init__(self) -> None:
        self.model = Classifier(processes=WORKERS)

    @bentoml.api(route="/classify")
    def classify(self, data: bytes, /) -> dict:
        return {"predictions": self.model(data)}


if __name__ == "__main__":
    here = os.path.dirname(os.path.abspath(__file__))
    bento = os.path.join(os.path.dirname(sys.executable), "bentoml")
    os.execv(bento, [bento, "serve", "bentoml_app:ImageClassifier", "--host", "127.0.0.1", "--port", sys.argv[1],
                     "--working-dir", here])
