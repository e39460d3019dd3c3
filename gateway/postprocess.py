"""Backend output -> the gateway's one response format (pure numpy)."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

OUTPUTS = ("logits", "probabilities")


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax, stable for large logits, computed in float64 for the last axis."""
    x = np.asarray(logits, dtype=np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    np.exp(x, out=x)
    x /= x.sum(axis=-1, keepdims=True)
    return x


def to_probabilities(batch: np.ndarray, output: str) -> np.ndarray:
    """(N, C) scores as the model emits them -> (N, C) probabilities."""
    batch = np.asarray(batch)
    if batch.ndim != 2:
        batch = batch.reshape(batch.shape[0], -1)
    if output == "logits":
        return softmax(batch)
    return batch.astype(np.float64, copy=False)


def to_meaning(batch: np.ndarray, have: str, want: str) -> np.ndarray:
    """Scores as a route's engine returns them (``have``) -> as the model declares them
    (``want``): softmax for logits -> probabilities; log for probabilities -> logits (logits
    are defined up to a constant per row, so log p is a faithful choice)."""
    if have == want:
        return batch
    if want == "probabilities":
        return to_probabilities(batch, have).astype(np.float32)
    return np.log(np.clip(np.asarray(batch, dtype=np.float64), np.finfo(np.float32).tiny, None)).astype(np.float32)


def top_k(probabilities: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices and scores of the k best classes per row, best first (ties: lower index)."""
    probabilities = np.asarray(probabilities)
    k = min(k, probabilities.shape[-1])
    part = np.argpartition(-probabilities, k - 1, axis=-1)[:, :k]
    part_scores = np.take_along_axis(probabilities, part, axis=-1)
    order = np.lexsort((part, -part_scores), axis=-1)
    indices = np.take_along_axis(part, order, axis=-1)
    return indices, np.take_along_axis(probabilities, indices, axis=-1)


def predictions(batch: np.ndarray, output: str, labels: Sequence[str], k: int) -> list[list[dict]]:
    """Per image, the top-k as [{"label", "index", "score"}, ...] sorted by score."""
    if batch.shape[-1] != len(labels):
        raise ValueError(f"backend returned {batch.shape[-1]} classes, the model has {len(labels)} labels")
    indices, scores = top_k(to_probabilities(batch, output), k)
    return [
        [{"label": labels[i], "index": int(i), "score": float(s)} for i, s in zip(row_i, row_s)]
        for row_i, row_s in zip(indices.tolist(), scores.tolist())
    ]
