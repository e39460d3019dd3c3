"""TorchServe handler for the gateway's image classifiers (one class: TorchServe's rule).

Each request in a batch is either
- a raw image (JPEG, PNG, ...): preprocessed here with the gateway's own
  ``gateway/preprocess.py`` (shipped inside the .mar), answered like the seed with the
  top-5 ``{label: probability}``; or
- a ``.npy`` float32 tensor, one image (3, H, W) or a batch (N, 3, H, W), already
  preprocessed by the gateway: answered with the raw logits as ``.npy``.
A bad request gets its own 4xx while the rest of the batch is served.
"""
import io
import json
import os

import numpy as np
import torch
from ts.torch_handler.base_handler import BaseHandler

try:  # the gateway's preprocessing: one implementation for the gateway and this handler
    from gateway.preprocess import ImageError, PreprocessSpec, preprocess_bytes
except ImportError:  # inside the .mar, the same file ships as preprocess.py
    from preprocess import ImageError, PreprocessSpec, preprocess_bytes

NPY_MAGIC = b"\x93NUMPY"
TOP_K = 5
MAX_FORWARD = 32  # images per forward pass: bounds memory when big requests meet in one batch


class GatewayImageClassifier(BaseHandler):
    def initialize(self, context):
        threads = os.environ.get("GATEWAY_TORCHSERVE_THREADS")  # set by `gateway backends up torchserve`
        if threads:
            torch.set_num_threads(int(threads))
        super().initialize(context)  # loads the TorchScript file and index_to_name.json
        model_dir = context.system_properties.get("model_dir")
        with open(os.path.join(model_dir, "preprocess.json")) as f:
            spec = json.load(f)
        self.spec = PreprocessSpec.from_dict(spec)
        self.labels = [self.mapping[str(i)] for i in range(len(self.mapping))]

    def _tensor(self, body: bytes):
        """-> (tensor batch, was_npy) or raises ValueError with a client-facing message."""
        if body[:6] == NPY_MAGIC:
            try:
                arr = np.load(io.BytesIO(body), allow_pickle=False)
            except Exception as exc:
                raise ValueError(f"unreadable .npy payload: {exc}") from None
            arr = arr[None] if arr.ndim == 3 else arr
            expected = (3, *self.spec.size) if self.spec.layout == "NCHW" else (*self.spec.size, 3)
            if arr.ndim != 4 or tuple(arr.shape[1:]) != expected or arr.dtype != np.float32:
                raise ValueError(f"expected float32 (N, {', '.join(map(str, expected))}), "
                                 f"got {arr.dtype} {tuple(arr.shape)}")
            return arr, True
        try:
            return preprocess_bytes(body, self.spec)[None], False
        except ImageError as exc:
            raise ValueError(str(exc)) from None

    def handle(self, data, context):
        bodies = [row.get("data") if row.get("data") is not None else row.get("body") for row in data]
        tensors, answers = [], [None] * len(bodies)
        for i, body in enumerate(bodies):
            if isinstance(body, (dict, list, str)):
                body = json.dumps(body).encode() if not isinstance(body, str) else body.encode()
            try:
                tensors.append((i, *self._tensor(bytes(body or b""))))
            except ValueError as exc:
                context.set_response_status(400, str(exc), idx=i)
                answers[i] = json.dumps({"code": 400, "type": "BadInput", "message": str(exc)})
        if tensors:
            batch = np.concatenate([t for _, t, _ in tensors])
            with torch.inference_mode():
                logits = np.concatenate([
                    self.model(torch.from_numpy(batch[i:i + MAX_FORWARD]).to(self.device)).float().cpu().numpy()
                    for i in range(0, len(batch), MAX_FORWARD)])
            start = 0
            for i, t, was_npy in tensors:
                rows = logits[start:start + len(t)]
                start += len(t)
                answers[i] = self._npy(rows, context, i) if was_npy else self._top5(rows[0])
        return answers

    @staticmethod
    def _npy(rows: np.ndarray, context, idx: int) -> bytes:
        buf = io.BytesIO()
        np.save(buf, rows.astype(np.float32), allow_pickle=False)
        context.set_response_content_type(idx, "application/octet-stream")
        return buf.getvalue()

    def _top5(self, logits: np.ndarray) -> dict:
        e = np.exp(logits.astype(np.float64) - logits.max())
        probs = e / e.sum()
        best = np.argsort(-probs, kind="stable")[:TOP_K]
        return {self.labels[i]: float(probs[i]) for i in best}
