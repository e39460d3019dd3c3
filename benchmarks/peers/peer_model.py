"""What every peer app runs per request: the gateway's own decoding and preprocessing (imported
from gateway/preprocess.py, numpy + Pillow only) and its top-k (gateway/postprocess.py, numpy
only), on the same ONNX file as the gateway's embedded route.

benchmarks/peers_bench.py passes the model as JSON in PEER_MODEL (the ONNX path, the
efficientnet_lite0 preprocess section of gateway.yaml, the labels file, top_k, max_pixels), so the
peers' venvs need no YAML parser and no gateway dependencies.

Logging: every peer is set to write no line per request (several log each request by default),
so that what is compared is serving the model. The gateway runs as `make serve` starts it, with
its own default access log (gateway.yaml server.access_log: one JSON line per answer), a small
cost beside the ~20 ms of CPU each image takes on the development machine.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))  # appended: the repo's folders must not shadow the peer venv's packages

import onnxruntime as ort  # noqa: E402

from gateway.postprocess import predictions  # noqa: E402
from gateway.preprocess import ImageError, PreprocessSpec, decode_image, preprocess_image  # noqa: E402

__all__ = ["Classifier", "ImageError", "threads_per_process"]


def threads_per_process(processes: int) -> int:
    """The gateway's rule (gateway/backends/embedded.py default_threads): the cores divided among
    the processes that each hold a session, so they do not fight for every core."""
    return max(1, (os.cpu_count() or 1) // max(1, processes))


class Classifier:
    """bytes of one photo -> the top-k as the gateway answers it: [{"label", "index", "score"}]."""

    def __init__(self, processes: int):
        spec = json.loads(os.environ["PEER_MODEL"])
        self.spec = PreprocessSpec.from_dict(spec["preprocess"])
        self.labels = Path(spec["labels"]).read_text().splitlines()
        self.output = spec["output"]
        self.top_k = int(spec["top_k"])
        self.max_pixels = int(spec["max_pixels"])
        self.draft = self.spec.decode_size()
        opts = ort.SessionOptions()  # as the gateway's embedded backend sets them
        opts.intra_op_num_threads = threads_per_process(processes)
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        self.session = ort.InferenceSession(spec["onnx"], opts, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[0].name

    def __call__(self, data: bytes) -> list[dict]:
        image = decode_image(data, self.max_pixels, draft_size=self.draft)
        batch = preprocess_image(image, self.spec)[None]
        (raw,) = self.session.run([self.output_name], {self.input_name: batch})
        return predictions(raw, self.output, self.labels, self.top_k)[0]
