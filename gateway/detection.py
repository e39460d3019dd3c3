"""Object detection postprocessing (pure numpy): raw detector output -> boxes in the photo's pixels.

    raw (N, anchors, 5 + classes) --decode_yolox--> boxes in model space, scores, class ids
      --model_to_photo--> the original photo's pixels (after EXIF orientation), clipped to it
      --nms / class_aware_nms--> at most max_detections, best first

Boxes are ``x1, y1, x2, y2`` in continuous pixel units: (0, 0) is the top-left corner of the
top-left pixel and (width, height) the bottom-right corner of the last one.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from gateway.preprocess import PreprocessSpec, letterbox_geometry

DECODERS = ("yolox",)
MAX_DETECTIONS_LIMIT = 1000
# settings a request may override (query parameters); the rest belong to the model
QUERY_FIELDS = ("score_threshold", "iou_threshold", "max_detections")
# resizes whose geometry can be inverted to map boxes back (center_crop loses the photo's edges)
BOX_RESIZES = ("letterbox", "stretch")


@dataclass(frozen=True)
class DetectionSpec:
    """How one detector's raw output becomes detections. Errors name the field first
    (``"score_threshold: ..."``) so the config loader can prefix its own key path."""

    decoder: str = "yolox"
    strides: tuple[int, ...] = (8, 16, 32)  # YOLOX: one grid per stride, row-major, finest first
    score_threshold: float = 0.3  # objectness * class score >= this (YOLOX demo's default 0.3)
    iou_threshold: float = 0.45  # suppress a box whose IoU with a better one is above this (YOLOX: 0.45)
    max_detections: int = 100  # per image, best first
    class_aware: bool = True  # NMS per class: boxes of different classes never suppress each other

    def __post_init__(self):
        if self.decoder not in DECODERS:
            raise ValueError(f"decoder: {self.decoder!r} is not one of {list(DECODERS)}")
        strides = self.strides
        if (not isinstance(strides, (tuple, list)) or not strides
                or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in strides)):
            raise ValueError(f"strides: {strides!r} must be a non-empty list of positive integers")
        object.__setattr__(self, "strides", tuple(strides))
        for name in ("score_threshold", "iou_threshold"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise ValueError(f"{name}: {value!r} must be a number within 0..1")
            object.__setattr__(self, name, float(value))
        value = self.max_detections
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_DETECTIONS_LIMIT:
            raise ValueError(f"max_detections: {value!r} must be an integer within 1..{MAX_DETECTIONS_LIMIT}")
        if not isinstance(self.class_aware, bool):
            raise ValueError(f"class_aware: {self.class_aware!r} must be true or false")

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["strides"] = list(self.strides)
        return out

    @classmethod
    def from_dict(cls, values: Mapping) -> DetectionSpec:
        unknown = sorted(set(values) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"{unknown[0]}: unknown detection setting")
        return cls(**values)

    def with_overrides(self, values: Mapping[str, object]) -> DetectionSpec:
        """This spec with a request's QUERY_FIELDS replaced; values may be query strings."""
        changes = {}
        for name, value in values.items():
            if name not in QUERY_FIELDS:
                raise ValueError(f"{name}: not a detection parameter (one of {list(QUERY_FIELDS)})")
            changes[name] = _parse(name, value)
        return dataclasses.replace(self, **changes)


def _parse(name: str, value):
    if not isinstance(value, str):
        return value
    if name == "max_detections":
        try:
            return int(value.strip())
        except ValueError:
            raise ValueError(f"{name}: {value!r} is not an integer") from None
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"{name}: {value!r} is not a number") from None
    if not math.isfinite(number):
        raise ValueError(f"{name}: {value!r} is not a finite number")
    return number


@lru_cache(maxsize=16)
def _yolox_grid(height: int, width: int, strides: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Per anchor point its grid cell (x, y) and its stride, in the model's output order."""
    cells, steps = [], []
    for step in strides:
        rows, cols = height // step, width // step
        ys, xs = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
        cells.append(np.stack([xs.ravel(), ys.ravel()], axis=1))
        steps.append(np.full((rows * cols, 1), step))
    grid = np.concatenate(cells).astype(np.float32)
    stride = np.concatenate(steps).astype(np.float32)
    grid.flags.writeable = False  # cached: shared by every call
    stride.flags.writeable = False
    return grid, stride


def decode_yolox(raw: np.ndarray, input_size: tuple[int, int], strides: Sequence[int] = (8, 16, 32)
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """YOLOX head output (..., anchors, 5 + classes) -> (boxes (..., anchors, 4) x1 y1 x2 y2 in
    model-input pixels, scores (..., anchors), class ids (..., anchors)).

    Per anchor ``[cx, cy, w, h, objectness, class scores...]`` with objectness and class scores
    already sigmoid-ed (the exported head does it): centre = (cx + grid) * stride,
    size = exp(w) * stride; the score is objectness times the best class's score (YOLOX's own
    ``postprocess``: one class per anchor point).
    """
    raw = np.asarray(raw, dtype=np.float32)
    height, width = input_size
    grid, stride = _yolox_grid(int(height), int(width), tuple(strides))
    if raw.ndim < 2 or raw.shape[-2] != len(grid) or raw.shape[-1] < 6:
        raise ValueError(f"expected YOLOX output (..., {len(grid)}, 5 + classes) for a {height}x{width} input "
                         f"and strides {list(strides)}, got {raw.shape}")
    centre = (raw[..., 0:2] + grid) * stride
    with np.errstate(over="ignore"):  # garbage logits become infinite boxes, clipped later
        half = np.exp(raw[..., 2:4]) * stride / 2
    boxes = np.concatenate([centre - half, centre + half], axis=-1)
    class_ids = raw[..., 5:].argmax(axis=-1)
    best = np.take_along_axis(raw[..., 5:], class_ids[..., None], axis=-1)[..., 0]
    return boxes, raw[..., 4] * best, class_ids


def iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one box (4,) with each of boxes (K, 4); 0 where the union is empty."""
    w = np.clip(np.minimum(box[2], boxes[:, 2]) - np.maximum(box[0], boxes[:, 0]), 0, None)
    h = np.clip(np.minimum(box[3], boxes[:, 3]) - np.maximum(box[1], boxes[:, 1]), 0, None)
    inter = w * h
    area = (box[2] - box[0]) * (box[3] - box[1])
    union = area + (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, inter / union, 0.0)


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float, max_detections: int | None = None
        ) -> np.ndarray:
    """Greedy non-maximum suppression: indices of the kept boxes, best score first (ties: lower
    index first). A box is dropped when its IoU with a kept, better box is above the threshold."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    order = np.argsort(-np.asarray(scores, dtype=np.float64).reshape(-1), kind="stable")
    limit = len(order) if max_detections is None else max_detections
    keep: list[int] = []
    while order.size and len(keep) < limit:
        best, order = order[0], order[1:]
        keep.append(best)
        order = order[iou(boxes[best], boxes[order]) <= iou_threshold]
    return np.array(keep, dtype=np.int64)


def class_aware_nms(boxes: np.ndarray, scores: np.ndarray, class_ids: np.ndarray, iou_threshold: float,
                    max_detections: int | None = None) -> np.ndarray:
    """NMS within each class only: indices of the kept boxes over all classes, best score first."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    class_ids = np.asarray(class_ids).reshape(-1)
    per_class = [np.flatnonzero(class_ids == c)[nms(boxes[class_ids == c], scores[class_ids == c],
                                                    iou_threshold, max_detections)]
                 for c in np.unique(class_ids)]
    kept = np.concatenate(per_class) if per_class else np.zeros(0, dtype=np.int64)
    kept = kept[np.lexsort((kept, -scores[kept]))]  # best first, ties: lower index
    return kept if max_detections is None else kept[:max_detections]


def _geometry(photo_size: tuple[int, int], preprocess: PreprocessSpec):
    """(left, top, x factor, y factor): model x = left + photo x * x factor."""
    width, height = photo_size
    if preprocess.resize == "letterbox":
        _, left, top, new_w, new_h = letterbox_geometry(photo_size, preprocess)
        return left, top, new_w / width, new_h / height  # per axis: the pasted photo's true scale
    if preprocess.resize == "stretch":
        canvas_h, canvas_w = preprocess.size
        return 0, 0, canvas_w / width, canvas_h / height
    raise ValueError(f"resize: {preprocess.resize!r} cannot map boxes back to the photo; "
                     f"a detector needs one of {list(BOX_RESIZES)}")


def model_to_photo(boxes: np.ndarray, photo_size: tuple[int, int], preprocess: PreprocessSpec) -> np.ndarray:
    """Boxes (..., 4) in model-input pixels -> the (width, height) photo's pixels, clipped to it."""
    left, top, fx, fy = _geometry(photo_size, preprocess)
    boxes = np.asarray(boxes, dtype=np.float64)
    out = (boxes - [left, top, left, top]) / [fx, fy, fx, fy]
    width, height = photo_size
    return np.clip(out, 0.0, [width, height, width, height])


def photo_to_model(boxes: np.ndarray, photo_size: tuple[int, int], preprocess: PreprocessSpec) -> np.ndarray:
    """The inverse of model_to_photo (without clipping): where a photo box lands in the model's input."""
    left, top, fx, fy = _geometry(photo_size, preprocess)
    return np.asarray(boxes, dtype=np.float64) * [fx, fy, fx, fy] + [left, top, left, top]


def image_detections(raw: np.ndarray, photo_size: tuple[int, int], labels: Sequence[str],
                     preprocess: PreprocessSpec, spec: DetectionSpec) -> list[dict]:
    """One image's raw output (anchors, 5 + classes) -> its detections, best first."""
    boxes, scores, class_ids = decode_yolox(raw, preprocess.size, spec.strides)
    candidates = np.flatnonzero(scores >= spec.score_threshold)
    boxes = model_to_photo(boxes[candidates], photo_size, preprocess)
    visible = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])  # not wholly in the padding
    boxes, scores, class_ids = boxes[visible], scores[candidates][visible], class_ids[candidates][visible]
    if spec.class_aware:
        keep = class_aware_nms(boxes, scores, class_ids, spec.iou_threshold, spec.max_detections)
    else:
        keep = nms(boxes, scores, spec.iou_threshold, spec.max_detections)
    return [{"label": labels[c], "index": int(c), "score": float(s),
             "box": {"x1": float(b[0]), "y1": float(b[1]), "x2": float(b[2]), "y2": float(b[3])}}
            for b, s, c in zip(boxes[keep].tolist(), scores[keep].tolist(), class_ids[keep].tolist())]


def detections(raw_batch: np.ndarray, photo_sizes: Sequence[tuple[int, int]], labels: Sequence[str],
               preprocess: PreprocessSpec, spec: DetectionSpec) -> list[list[dict]]:
    """A batch of raw outputs (N, anchors, 5 + classes) and each photo's (width, height) ->
    per image ``[{"label", "index", "score", "box": {"x1", "y1", "x2", "y2"}}, ...]``, best
    first, at most ``spec.max_detections``. A shape that does not fit raises ValueError
    (a backend answering garbage: the gateway's 502)."""
    raw_batch = np.asarray(raw_batch)
    if raw_batch.ndim != 3 or raw_batch.shape[0] != len(photo_sizes):
        raise ValueError(f"expected detector output (N={len(photo_sizes)}, anchors, 5 + classes), "
                         f"got {raw_batch.shape}")
    if raw_batch.shape[-1] != 5 + len(labels):
        raise ValueError(f"backend returned {raw_batch.shape[-1] - 5} classes, the model has {len(labels)} labels")
    return [image_detections(raw, size, labels, preprocess, spec) for raw, size in zip(raw_batch, photo_sizes)]


def rescale(found: list[dict], decoded_size: tuple[int, int], photo_size: tuple[int, int]) -> list[dict]:
    """Detections in the decoded copy's pixels -> in the photo's own pixels (JPEG draft decoding
    may have decoded a 1/2, 1/4 or 1/8 copy), clipped to the photo."""
    if tuple(decoded_size) == tuple(photo_size):
        return found
    fx, fy = photo_size[0] / decoded_size[0], photo_size[1] / decoded_size[1]
    limits = {"x1": photo_size[0], "x2": photo_size[0], "y1": photo_size[1], "y2": photo_size[1]}
    return [{**d, "box": {k: min(limits[k], v * (fx if k[0] == "x" else fy)) for k, v in d["box"].items()}}
            for d in found]
