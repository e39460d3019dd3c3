"""Peer: LitServe (Lightning AI).

    run/peers/litserve/venv/bin/python benchmarks/peers/litserve_app.py PORT

Configuration (LitServer's docs, for a 2-core machine): accelerator="cpu";
workers_per_device = number of cores (2), as its docs say for CPU ("set to the number of cores
available on the machine"); num_api_servers left at its default, one API server process per
inference worker ("recommended"); fast_queue=True (ZeroMQ over IPC), which the docs advise above
~100 requests/s, where this job runs. Each inference worker's onnxruntime session takes
cores // workers = 1 intra-op thread (the gateway's rule). Access log off (uvicorn's, on by
default: one line per request): the peers write no line per request (see peer_model.py).

Request: LitServe's request handler parses JSON (or a form) only, so the photo comes as JSON
{"image": "<base64>"}, LitServe's documented way to send an image; the driver encodes it once
per photo, before timing.
"""
from __future__ import annotations

import base64
import os
import sys

import litserve as ls
from peer_model import Classifier

WORKERS = os.cpu_count() or 1


class ClassifierAPI(ls.LitAPI):
    def setup(self, device):
        self.model = Classifier(processes=WORKERS)

    def decode_request(self, request):
        return base64.b64decode(request["image"])

    def predict(self, data):
        return self.model(data)

    def encode_response(self, output):
        return {"predictions": output}


if __name__ == "__main__":
    server = ls.LitServer(ClassifierAPI(api_path="/classify"), accelerator="cpu", workers_per_device=WORKERS,
                          fast_queue=True)
    server.run(host="127.0.0.1", port=int(sys.argv[1]), generate_client_file=False, access_log=False)
