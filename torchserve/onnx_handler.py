"""TorchServe handler for ONNX models the gateway pre- and postprocesses itself: the detectors
(one class: TorchServe's rule; torchserve/handler.py is the classifiers').

Each request in a batch is a ``.npy`` float32 tensor, one input (C, H, W) or a batch
(N, C, H, W) in the model's input shape, already preprocessed by the gateway; the answer is
the model's first output, raw, as ``.npy`` (N, ...). The model runs in onnxruntime, the same
engine and file as the gateway's embedded backend. A bad request gets its own 400 while the
rest of the batch is served.
"""
import io
import json
import os

import numpy as np
import onnxruntime as ort

NPY_MAGIC = b"\x93NUMPY"
MAX_FORWARD = 16  # images per run: bounds memory when big requests meet in one batch


class GatewayOnnxModel:
    def initialize(self, context):
        model_dir = context.system_properties.get("model_dir")
        path = os.path.join(model_dir, context.manifest["model"]["serializedFile"])
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(os.environ.get("GATEWAY_TORCHSERVE_THREADS", "0"))
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        model_input = self.session.get_inputs()[0]
        self.input_name, self.shape = model_input.name, tuple(model_input.shape[1:])
        self.initialized = True

    def _tensor(self, body) -> np.ndarray:
        """-> a float32 batch, or raises ValueError with a client-facing message."""
        if isinstance(body, (dict, list, str)):
            body = json.dumps(body).encode() if not isinstance(body, str) else body.encode()
        body = bytes(body or b"")
        if body[:6] != NPY_MAGIC:
            raise ValueError("expected a .npy float32 tensor (the gateway preprocesses for this model)")
        try:
            arr = np.load(io.BytesIO(body), allow_pickle=False)
        except Exception as exc:
            raise ValueError(f"unreadable .npy payload: {exc}") from None
        arr = arr[None] if arr.ndim == len(self.shape) else arr
        if arr.ndim != len(self.shape) + 1 or tuple(arr.shape[1:]) != self.shape or arr.dtype != np.float32:
            raise ValueError(f"expected float32 (N, {', '.join(map(str, self.shape))}), "
                             f"got {arr.dtype} {tuple(arr.shape)}")
        return arr

    def handle(self, data, context):
        answers, tensors = [None] * len(data), []
        for i, row in enumerate(data):
            body = row.get("data") if row.get("data") is not None else row.get("body")
            try:
                tensors.append((i, self._tensor(body)))
            except ValueError as exc:
                context.set_response_status(400, str(exc), idx=i)
                answers[i] = json.dumps({"code": 400, "type": "BadInput", "message": str(exc)})
        if tensors:
            batch = np.concatenate([t for _, t in tensors])
            outputs = np.concatenate([self.session.run(None, {self.input_name: batch[j:j + MAX_FORWARD]})[0]
                                      for j in range(0, len(batch), MAX_FORWARD)])
            start = 0
            for i, t in tensors:
                buf = io.BytesIO()
                np.save(buf, outputs[start:start + len(t)].astype(np.float32, copy=False), allow_pickle=False)
                start += len(t)
                context.set_response_content_type(i, "application/octet-stream")
                answers[i] = buf.getvalue()
        return answers
