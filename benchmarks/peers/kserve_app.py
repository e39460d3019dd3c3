"""Peer: KServe's model server (the kserve 0.21.0 Python SDK, a custom kserve.Model).

    run/peers/kserve/venv/bin/python benchmarks/peers/kserve_app.py PORT

Configuration (KServe's docs, for a 2-core machine): a custom predictor with a synchronous
predict, the docs' example shape; --workers = number of cores (2), the docs' way to use more
than one core for CPU-bound models (uvicorn worker processes sharing one socket); gRPC off (only
REST is measured); no line per request (by default KServe logs a latency line, an access line
and a timing line per request; see peer_model.py): enable_latency_logging off, and its
own logging config (--log_config_file) with uvicorn.access and kserve.trace at WARNING. Each
worker's onnxruntime session takes cores // workers = 1 intra-op thread (the gateway's rule),
created in the worker: KServe pickles the model into its spawned workers and an onnxruntime
session does not pickle.

Request: raw JPEG bytes to the V1 protocol's POST /v1/models/efficientnet_lite0:predict with
Content-Type image/jpeg: KServe hands a body that is not JSON to the model as bytes.
The REST server binds 0.0.0.0 in kserve 0.21 (hard-coded); it is moved to 127.0.0.1 here.
"""
from __future__ import annotations

import copy
import json
import os
import sys
import warnings

import kserve
from kserve import logging as kserve_logging
from kserve import model_server
from kserve.protocol.rest import server as rest_server
from peer_model import Classifier

WORKERS = os.cpu_count() or 1
NAME = "efficientnet_lite0"
# kserve 0.21 answers through fastapi's ORJSONResponse, which fastapi 0.165 (the pin of
# requirements-kserve.txt) warns about; gateway/preprocess.py's decode_image enters
# warnings.catch_warnings() per photo, which resets the once-per-place warning registry, so the
# warning (two lines of stderr) would come back with every request: a logging cost, not the job.
# At module level so that KServe's spawned workers, which import this file, set it too.
warnings.filterwarnings("ignore", message="ORJSONResponse is deprecated")


class ImageClassifier(kserve.Model):
    def __init__(self, name: str):
        super().__init__(name)
        self.model: Classifier | None = None

    def load(self) -> bool:
        self.ready = True
        return self.ready

    def __getstate__(self):
        return {**self.__dict__, "model": None}

    def predict(self, payload, headers=None):
        if self.model is None:
            self.model = Classifier(processes=WORKERS)
        return {"predictions": self.model(payload)}


def loopback_only() -> None:
    """kserve.protocol.rest.server.RESTServer builds its uvicorn.Config with host="0.0.0.0"."""
    original = rest_server.RESTServer.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self.config.host = "127.0.0.1"

    rest_server.RESTServer.__init__ = init


def quiet_logging() -> None:
    """KServe's own logging config less the per-request lines, as the file --log_config_file names
    (it reaches the spawned workers, which configure their logging anew)."""
    config = copy.deepcopy(kserve_logging.KSERVE_LOG_CONFIG)
    for name in ("uvicorn.access", "kserve.trace"):
        config["loggers"][name]["level"] = "WARNING"
    path = os.path.abspath("kserve-logging.json")  # in run/peers/kserve/, the driver's cwd for us
    with open(path, "w") as f:
        json.dump(config, f)
    model_server.args.log_config_file = path


if __name__ == "__main__":
    loopback_only()
    quiet_logging()
    model = ImageClassifier(NAME)
    model.load()
    kserve.ModelServer(http_port=int(sys.argv[1]), workers=WORKERS, enable_grpc=False,
                       enable_latency_logging=False).start([model])
