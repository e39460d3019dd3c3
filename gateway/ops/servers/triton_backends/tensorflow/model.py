"""A python-based Triton backend that serves `platform: "tensorflow_savedmodel"` on CPU.

Stands in for Triton's TensorFlow backend (absent from the nvidia-pytriton wheel, and
deprecated upstream since 25.03): loads ``<version>/model.savedmodel`` and calls its
``serving_default`` signature with the config's tensor names.
"""
import json
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import tensorflow as tf
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        filename = config.get("default_model_filename") or "model.savedmodel"
        path = os.path.join(args["model_repository"], args["model_version"], filename)
        threads = int(os.environ.get("GATEWAY_TRITON_THREADS", "0"))
        if threads:
            tf.config.threading.set_intra_op_parallelism_threads(threads)
            tf.config.threading.set_inter_op_parallelism_threads(1)
        self.module = tf.saved_model.load(path)
        self.signature = self.module.signatures["serving_default"]
        self.input_name = config["input"][0]["name"]
        self.output_names = [o["name"] for o in config["output"]]

    def execute(self, requests):
        # DLPack both ways: the stub's numpy bridge is built for numpy 1 and misreads numpy 2 arrays
        arrays = [np.from_dlpack(pb_utils.get_input_tensor_by_name(r, self.input_name)) for r in requests]
        sizes = [a.shape[0] for a in arrays]
        result = self.signature(**{self.input_name: tf.constant(np.concatenate(arrays))})
        outputs = {name: result[name].numpy() for name in self.output_names}
        responses, start = [], 0
        for size in sizes:
            tensors = [pb_utils.Tensor.from_dlpack(name, np.array(outputs[name][start:start + size], copy=True))
                       for name in self.output_names]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
            start += size
        return responses
