"""A python-based Triton backend that serves `platform: "pytorch_libtorch"` models on CPU.

The nvidia-pytriton wheel's tritonserver bundles only the python backend; placed at
``<backend-dir>/pytorch/model.py`` this file stands in for libtorch, so the canonical
``config.pbtxt`` + ``<version>/model.pt`` layout serves unchanged (the official image uses
the real libtorch backend on the same repository).
"""
import json
import os

import numpy as np
import torch
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        filename = config.get("default_model_filename") or "model.pt"
        path = os.path.join(args["model_repository"], args["model_version"], filename)
        torch.set_num_threads(int(os.environ.get("GATEWAY_TRITON_THREADS", "0")) or torch.get_num_threads())
        self.model = torch.jit.load(path, map_location="cpu").eval()
        self.input_name = config["input"][0]["name"]
        self.output_names = [o["name"] for o in config["output"]]

    def execute(self, requests):
        # the dynamic batcher hands us several requests at once: run them as one batch
        # DLPack both ways: the stub's numpy bridge is built for numpy 1 and misreads numpy 2 arrays
        arrays = [np.from_dlpack(pb_utils.get_input_tensor_by_name(r, self.input_name)) for r in requests]
        sizes = [a.shape[0] for a in arrays]
        with torch.inference_mode():
            out = self.model(torch.from_numpy(np.concatenate(arrays)))
        outputs = out if isinstance(out, (tuple, list)) else (out,)
        outputs = [o.numpy().astype(np.float32, copy=False) for o in outputs]
        responses, start = [], 0
        for size in sizes:
            tensors = [pb_utils.Tensor.from_dlpack(name, np.array(o[start:start + size], copy=True))
                       for name, o in zip(self.output_names, outputs)]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
            start += size
        return responses
