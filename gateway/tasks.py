"""What a model does with its engine's raw output: one object per task, owned by the model's config.

A task says what one image's raw output looks like (``output_dims``), which request options it
takes (``options``), how raw output becomes each image's results (``finish``), what those results
are called in an answer (``result_key``) and which v1 endpoint serves it (``verb``). Every
consumer (the v1 API, V2, Lambda, `gateway batch` on Ray, bench, eval) goes through the model's
task, so a rule such as "a detector's boxes are in the photo's own pixels" lives here once.

A new task (say, embeddings) is a class here plus its entry in ``TASKS``; the config schema
takes its name and its ``settings`` from there.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
from PIL import Image

from gateway import detection, postprocess
from gateway.errors import BackendBadResponse, BadRequest
from gateway.preprocess import ImageError, PreprocessSpec, decode_image, original_size, preprocess_image

if TYPE_CHECKING:
    from gateway.routing import Route

Size = tuple[int, int]
PhotoSizes = tuple[Size, Size]  # (the decoded copy's (width, height), the photo's own): see ``sizes``


def decode(images: Sequence[bytes], specs: Sequence[PreprocessSpec], max_pixels: int) -> list[Image.Image]:
    """Decode every photo once, JPEG draft mode sized for the most demanding of ``specs`` (the
    model's routes); a 400 ``invalid_image`` naming the photo when one is not a sane picture."""
    sizes = [spec.decode_size() for spec in specs]
    draft = (max(w for w, _ in sizes), max(h for _, h in sizes))
    decoded = []
    for i, data in enumerate(images):
        try:
            decoded.append(decode_image(data, max_pixels, draft_size=draft))
        except ImageError as exc:
            where = f"image {i}: " if len(images) > 1 else ""
            raise BadRequest(f"{where}{exc}", code="invalid_image") from None
    return decoded


def sizes(images: Sequence[Image.Image]) -> list[PhotoSizes]:
    """Each decoded photo's (decoded copy's (width, height), the photo's own (width, height))."""
    return [(image.size, original_size(image)) for image in images]


def prepare(images: Sequence[Image.Image], spec: PreprocessSpec) -> np.ndarray:
    """Decoded photos -> the (N, ...) batch a route with preprocessing ``spec`` takes."""
    return np.stack([preprocess_image(image, spec) for image in images])


@dataclass(frozen=True)
class Task:
    """The part of a model that is about its task (the model's labels and preprocessing are the
    model's). ``finish`` raises ValueError when the raw output does not fit (the gateway's 502)."""

    name: ClassVar[str]  # "classification": what gateway.yaml's ``task`` says
    verb: ClassVar[str]  # "classify": /v1/models/<model>/<verb>
    result_key: ClassVar[str]  # "predictions": what each image's results are called in a v1 answer
    query: ClassVar[tuple[str, ...]]  # the request options a v1 query string may carry
    has_settings: ClassVar[bool] = False  # takes gateway.yaml's ``postprocess`` mapping
    # the v1 API's OpenAPI: what the endpoint does, one result's schema and its component name
    summary: ClassVar[str]
    result_schema: ClassVar[dict[str, Any]]
    result_name: ClassVar[str]  # "Prediction": one result; the answer's schema is named after the task

    @classmethod
    def query_schemas(cls, default_top_k: int) -> dict[str, dict[str, Any]]:
        """The OpenAPI schema of each ``query`` option."""
        return {}

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any]) -> Task:
        """The task from gateway.yaml's ``postprocess`` (ValueError: "field: problem")."""
        return cls()

    @staticmethod
    def route_problem(spec: PreprocessSpec) -> str | None:
        """Why a route with this preprocessing cannot serve the task ("field: problem"), or None."""
        return None

    def output_dims(self, labels: int, spec: PreprocessSpec) -> tuple[int, ...]:
        """One image's raw output dims (no batch axis), as every route must answer them."""
        raise NotImplementedError

    def options(self, given: Mapping[str, Any], default_top_k: int, labels: int) -> Any:
        """A request's options (query strings accepted), validated; ValueError names the bad one."""
        raise NotImplementedError

    def finish(self, raw: np.ndarray, route: Route, labels: Sequence[str], sizes: Sequence[PhotoSizes],
               options: Any) -> list:
        """A route's raw output, in the declared dims, for photos of ``sizes`` -> each image's results."""
        raise NotImplementedError

    def describe(self, output: str) -> dict:
        """What /v1/models says of the task (``output``: what the model's scores mean)."""
        return {"task": self.name}

    def output_name(self, output: str) -> str:
        """The V2 front's name for the model's raw output (``output``: what its scores mean)."""
        return "output"

    def shaped(self, raw: np.ndarray, route: Route, labels: int) -> np.ndarray:
        """A route's raw (N, ...) output in the declared dims (an engine may add unit axes, e.g.
        (N, 1000, 1, 1)); an answer that does not fit the model is the engine's bad answer: a
        502 naming the backend and both shapes."""
        dims = self.output_dims(labels, route.preprocess)
        if tuple(raw.shape[1:]) == dims:
            return raw
        if raw.ndim >= 1 and [d for d in raw.shape[1:] if d != 1] == [d for d in dims if d != 1]:
            return raw.reshape(len(raw), *dims)
        raise BackendBadResponse(route.backend, f"model {route.backend_model!r} answered shape {list(raw.shape)}; "
                                                f"the model declares [N, {', '.join(map(str, dims))}]")

    def answer(self, raw: np.ndarray, route: Route, labels: Sequence[str], sizes: Sequence[PhotoSizes],
               options: Any) -> list:
        """A route's raw output -> each image's results (a 502 when it does not fit)."""
        return self.finish(self.shaped(raw, route, len(labels)), route, labels, sizes, options)


@dataclass(frozen=True)
class Classification(Task):
    name: ClassVar[str] = "classification"
    verb: ClassVar[str] = "classify"
    result_key: ClassVar[str] = "predictions"
    query: ClassVar[tuple[str, ...]] = ("top_k",)
    summary: ClassVar[str] = "Classify one or more images (top-k per image, in request order)"
    result_name: ClassVar[str] = "Prediction"
    result_schema: ClassVar[dict[str, Any]] = {
        "type": "object", "required": ["label", "index", "score"], "properties": {
            "label": {"type": "string"}, "index": {"type": "integer", "minimum": 0},
            "score": {"type": "number", "minimum": 0, "maximum": 1}}}

    @classmethod
    def query_schemas(cls, default_top_k: int) -> dict[str, dict[str, Any]]:
        return {"top_k": {"type": "integer", "minimum": 1, "maximum": 1000, "default": default_top_k}}

    def output_dims(self, labels: int, spec: PreprocessSpec) -> tuple[int, ...]:
        return (labels,)

    def options(self, given: Mapping[str, Any], default_top_k: int, labels: int) -> int:
        k = given.get("top_k")
        if k is None:
            k = default_top_k
        elif isinstance(k, str):
            try:
                k = int(k)
            except ValueError:
                raise ValueError(f"top_k must be an integer, got {k!r}") from None
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= labels:
            raise ValueError(f"top_k must be between 1 and {labels}, got {k}")
        return k

    def finish(self, raw, route, labels, sizes, options) -> list:
        return postprocess.predictions(raw, route.output, labels, options)

    def describe(self, output: str) -> dict:
        return {"task": self.name, "output": output}

    def output_name(self, output: str) -> str:
        return output  # logits | probabilities


@dataclass(frozen=True)
class Detection(Task):
    """A detector; ``spec`` is its postprocessing (gateway.yaml's ``postprocess``)."""

    spec: detection.DetectionSpec = detection.DetectionSpec()
    name: ClassVar[str] = "detection"
    verb: ClassVar[str] = "detect"
    result_key: ClassVar[str] = "detections"
    query: ClassVar[tuple[str, ...]] = detection.QUERY_FIELDS
    has_settings: ClassVar[bool] = True
    summary: ClassVar[str] = "Detect objects in one or more images (boxes per image, in request order)"
    result_name: ClassVar[str] = "Box"
    result_schema: ClassVar[dict[str, Any]] = {
        "type": "object", "required": ["label", "index", "score", "box"], "properties": {
            "label": {"type": "string"}, "index": {"type": "integer", "minimum": 0},
            "score": {"type": "number", "minimum": 0, "maximum": 1},
            "box": {"type": "object", "required": ["x1", "y1", "x2", "y2"],
                    "description": "in the photo's own pixels after EXIF orientation, clipped to it",
                    "properties": {k: {"type": "number", "minimum": 0} for k in ("x1", "y1", "x2", "y2")}}}}

    @classmethod
    def query_schemas(cls, default_top_k: int) -> dict[str, dict[str, Any]]:
        unit = {"type": "number", "minimum": 0, "maximum": 1}
        return {"score_threshold": unit, "iou_threshold": unit,
                "max_detections": {"type": "integer", "minimum": 1, "maximum": detection.MAX_DETECTIONS_LIMIT}}

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any]) -> Detection:
        return cls(detection.DetectionSpec.from_dict(settings))

    @staticmethod
    def route_problem(spec: PreprocessSpec) -> str | None:
        if spec.resize not in detection.BOX_RESIZES:  # center_crop loses the photo's edges
            return (f"resize: a detector's boxes map back to the photo only through "
                    f"{list(detection.BOX_RESIZES)}, got {spec.resize!r}")
        return None

    def output_dims(self, labels: int, spec: PreprocessSpec) -> tuple[int, ...]:
        height, width = spec.size
        anchors = sum((height // s) * (width // s) for s in self.spec.strides)
        return (anchors, 5 + labels)  # YOLOX: box, objectness, class scores per anchor

    def options(self, given: Mapping[str, Any], default_top_k: int, labels: int) -> detection.DetectionSpec:
        return self.spec.with_overrides({k: v for k, v in given.items() if v is not None})

    def finish(self, raw, route, labels, sizes, options) -> list:
        """Boxes in each photo's own pixels (after EXIF orientation): JPEG draft decoding may
        have decoded a smaller copy, so boxes found in the copy are scaled back."""
        found = detection.detections(raw, [decoded for decoded, _ in sizes], labels, route.preprocess, options)
        return [detection.rescale(f, decoded, photo) for f, (decoded, photo) in zip(found, sizes)]

    def describe(self, output: str) -> dict:
        return {"task": self.name, "postprocess": self.spec.to_dict()}


TASKS: dict[str, type[Classification] | type[Detection]] = {"classification": Classification, "detection": Detection}
