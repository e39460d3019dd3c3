"""A python-based Triton backend that serves `platform: "onnxruntime_onnx"` models on CPU.

Stands in for Triton's ONNX Runtime backend (absent from the nvidia-pytriton wheel): placed
at ``<backend-dir>/onnxruntime/model.py``, it runs ``<version>/model.onnx`` (or the config's
``default_model_filename``) with the onnxruntime package, so the canonical ``config.pbtxt``
serves unchanged here and in the official image.
"""
import json
import os

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        filename = config.get("default_model_filename") or "model.onnx"
        path = os.path.join(args["model_repository"], args["model_version"], filename)
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(os.environ.get("GATEWAY_TRITON_THREADS", "0"))
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        self.input_name = config["input"][0]["name"]
        self.output_names = [o["name"] for o in config["output"]]
        # max_batch_size > 0: requests carry a batch axis the dynamic batcher may join
        self.batched = int(config.get("max_batch_size", 0)) > 0

    def execute(self, requests):
        # DLPack both ways: the stub's numpy bridge is built for numpy 1 and misreads numpy 2 arrays
        arrays = [np.from_dlpack(pb_utils.get_input_tensor_by_name(r, self.input_name)) for r in requests]
        if not self.batched:
            return [self._respond(self.session.run(self.output_names, {self.input_name: a})) for a in arrays]
        sizes = [a.shape[0] for a in arrays]
        outputs = self.session.run(self.output_names, {self.input_name: np.concatenate(arrays)})
        responses, start = [], 0
        for size in sizes:
            responses.append(self._respond([o[start:start + size] for o in outputs]))
            start += size
        return responses

    def _respond(self, outputs):
        tensors = [pb_utils.Tensor.from_dlpack(name, np.array(o, copy=True))
                   for name, o in zip(self.output_names, outputs)]
        return pb_utils.InferenceResponse(output_tensors=tensors)
