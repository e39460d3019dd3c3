"""The Open Inference Protocol's meaning, once for REST and gRPC: which V2 models exist,
their metadata and Triton-style config, and how an infer request runs through the service.

Names. Every gateway model ``M`` is a V2 model of the same name taking a preprocessed
tensor in ``M``'s declared layout and dtype (input ``input``, e.g. FP32 [-1, 3, 224, 224]).
A classifier is also ``M_image``, taking encoded photos as a BYTES tensor [-1, 1] (input
``image``) that the gateway decodes and preprocesses as the model was trained, as Triton's
``ensemble_image_client.py`` expects of a DALI ensemble. Each has exactly one input and one
output (``logits`` or ``probabilities``, the meaning the model declares, whatever a route's
engine returns; a detector's raw ``output``), which is what ``image_client.py`` insists on.

Engines. A model's versions are its route names: no version routes with failover as the JSON
API does; version ``triton`` (say) forces that route. The answer's ``model_version`` names the
route that answered and ``parameters.backend`` its backend.

An input's name, datatype, shape and batch size are checked against the model before its data
is decoded (``InputTensor.decode``), so a crafted shape or a wrong name costs no decoding.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gateway.config import GatewayConfig, ModelConfig
from gateway.errors import BadRequest, NotFound
from gateway.postprocess import top_k
from gateway.service import Gateway
from gateway.v2.tensors import datatype_of

IMAGE_SUFFIX = "_image"
SERVER = {"name": "image-model-gateway", "version": "1.0.0",
          "extensions": ["binary_tensor_data", "classification", "model_configuration"]}
PLATFORM = "gateway"


# Request parameters Triton's clients send on request (tritonclient's priority=, timeout=): priority
# is accepted and not acted upon (the gateway has no priority queues); timeout (microseconds, as
# Triton reads it) is the request's deadline, capped by the server's request_timeout_s
ACCEPTED_PARAMETERS = frozenset({"priority", "timeout"})


@dataclass
class Tensor:
    """An output: numpy data, or a list of bytes for BYTES."""

    name: str
    datatype: str
    shape: list[int]
    data: Any


@dataclass
class InputTensor:
    """An input as a transport read it: its header, and how to decode its data once checked."""

    name: str
    datatype: str
    shape: list[int]
    decode: Callable[[], Any]  # -> numpy array of ``shape``, or BYTES elements


@dataclass
class RequestedOutput:
    name: str
    classification: int = 0  # k > 0: the classification extension's top-k strings
    binary: bool | None = None  # REST: send as binary data (None: the request's default)

    @classmethod
    def asking(cls, name: str, classification: Any, where: str, binary: bool | None = None) -> RequestedOutput:
        """An output as a client asked for it (REST or gRPC); ``where`` names the parameter in errors."""
        k = 0 if classification is None else classification
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise BadRequest(f"{where}: classification must be a positive integer, got {k!r}", code="invalid_output")
        return cls(name, k, binary)


@dataclass
class InferRequest:
    model: str
    version: str
    inputs: list[InputTensor]
    outputs: list[RequestedOutput] | None = None  # None: every output
    id: str | None = None
    parameters: dict = field(default_factory=dict)


@dataclass
class InferResponse:
    model: str
    version: str
    outputs: list[tuple[Tensor, RequestedOutput]]
    id: str | None = None
    parameters: dict = field(default_factory=dict)


@dataclass(frozen=True)
class V2Model:
    """One V2 model over one gateway model: a tensor in, or encoded images in."""

    name: str
    model: ModelConfig
    takes_images: bool
    max_batch_size: int

    @property
    def input_name(self) -> str:
        return "image" if self.takes_images else "input"

    @property
    def input_datatype(self) -> str:
        return "BYTES" if self.takes_images else datatype_of(self.model.preprocess.dtype)

    @property
    def input_dims(self) -> list[int]:
        """Without the batch axis."""
        return [1] if self.takes_images else list(self.model.preprocess.tensor_dims())

    @property
    def output_name(self) -> str:
        return self.model.task.output_name(self.model.output)

    @property
    def output_dims(self) -> list[int]:
        return list(self.model.task.output_dims(len(self.model.labels), self.model.preprocess))

    def check_input(self, tensor: InputTensor) -> list[int]:
        """The input's shape ([B, 1] for photos sent as [B]) once its name, datatype, shape
        and batch size fit this model; a 400 naming the first that does not."""
        if tensor.name != self.input_name:
            raise BadRequest(f"model {self.name!r} has no input {tensor.name!r}; its input is {self.input_name!r}",
                             code="invalid_input")
        if tensor.datatype != self.input_datatype:
            raise BadRequest(f"input {tensor.name!r} of model {self.name!r} is {self.input_datatype}, got "
                             f"{tensor.datatype}", code="invalid_datatype")
        expected, shape = [-1, *self.input_dims], tensor.shape
        if self.takes_images and len(shape) == 1:  # [B] as well as [B, 1]: one encoded image per row
            shape = [shape[0], 1]
        if len(shape) != len(expected) or any(e != -1 and e != d for e, d in zip(expected, shape)):
            raise BadRequest(f"input {tensor.name!r} of model {self.name!r} has shape {expected}, got {tensor.shape}",
                             code="invalid_shape")
        return shape

    def version(self, version: str | None) -> str | None:
        """The route a version names (None: every route, with failover); 404 for another."""
        if not version:
            return None
        names = [r.name for r in self.model.routes]
        if version not in names:
            raise NotFound(f"model {self.name!r} has no version {version!r}; its versions are its routes: "
                           + ", ".join(names), code="unknown_version")
        return version

    def metadata(self) -> dict:
        return {
            "name": self.name, "versions": [r.name for r in self.model.routes], "platform": PLATFORM,
            "inputs": [{"name": self.input_name, "datatype": self.input_datatype, "shape": [-1, *self.input_dims]}],
            "outputs": [{"name": self.output_name, "datatype": "FP32", "shape": [-1, *self.output_dims]}],
        }

    def config(self) -> dict:
        """Triton's model configuration (its JSON form; gRPC parses the same into ModelConfig)."""
        layout = "FORMAT_NONE" if self.takes_images else f"FORMAT_{self.model.preprocess.layout}"
        datatype = "TYPE_STRING" if self.takes_images else f"TYPE_{self.input_datatype}"
        output: dict[str, Any] = {"name": self.output_name, "data_type": "TYPE_FP32", "dims": self.output_dims}
        if self.model.task.name == "classification":
            output["label_filename"] = "labels.txt"
        return {
            "name": self.name, "platform": PLATFORM, "max_batch_size": self.max_batch_size,
            "input": [{"name": self.input_name, "data_type": datatype, "format": layout, "dims": self.input_dims}],
            "output": [output],
            "parameters": {"task": {"string_value": self.model.task.name},
                           "preprocess_source": {"string_value": self.model.preprocess_source}},
        }


def model_views(config: GatewayConfig) -> Iterator[tuple[str, ModelConfig, bool]]:
    """(V2 name, gateway model, takes encoded images) for every V2 model: each model under its
    own name, and each classifier as ``M_image`` unless a gateway model has that name."""
    yield from ((m.name, m, False) for m in config.models.values())
    for model in config.models.values():
        if model.task.name == "classification" and model.name + IMAGE_SUFFIX not in config.models:
            yield model.name + IMAGE_SUFFIX, model, True


class Catalog:
    """The V2 models of one gateway, and inference on them."""

    def __init__(self, gateway: Gateway):
        self.gateway = gateway
        limit = gateway.config.server.max_images
        self.models = {name: V2Model(name, model, images, limit) for name, model, images in model_views(gateway.config)}

    def resolve(self, name: str, version: str | None = None) -> tuple[V2Model, str | None]:
        """The V2 model and the route its version forces (None: every route); 404 for unknown ones."""
        try:
            v2 = self.models[name]
        except KeyError:
            raise NotFound(f"unknown model {name!r}; known models: {', '.join(self.models)}",
                           code="unknown_model") from None
        return v2, v2.version(version)

    def get(self, name: str, version: str | None = None) -> V2Model:
        return self.resolve(name, version)[0]

    def model_ready(self, name: str, version: str | None = None) -> bool:
        v2, route = self.resolve(name, version)
        return any(self.gateway.route_ready(r) for r in v2.model.routes if route in (None, r.name))

    def server_ready(self) -> bool:
        """Every model can be served by at least one of its routes."""
        return all(any(self.gateway.route_ready(r) for r in m.routes) for m in self.gateway.config.models.values())

    def infer(self, request: InferRequest, protocol: str, timeout_s: float | None = None) -> InferResponse:
        """``timeout_s``: the transport's deadline (gRPC's, REST's X-Request-Timeout); the request's
        ``timeout`` parameter (microseconds) may shorten it."""
        v2, route = self.resolve(request.model, request.version)
        for key, value in request.parameters.items():
            if key not in ACCEPTED_PARAMETERS:
                raise BadRequest(f"unknown request parameter {key!r} (accepted: "
                                 f"{', '.join(sorted(ACCEPTED_PARAMETERS))})", code="unexpected_field")
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise BadRequest(f"request parameter {key!r} must be a non-negative integer, got {value!r}",
                                 code="invalid_parameter")
        if len(request.inputs) != 1:
            raise BadRequest(f"model {v2.name!r} takes exactly one input ({v2.input_name!r}), "
                             f"got {len(request.inputs)}", code="invalid_input")
        wanted = self._outputs(v2, request.outputs)
        shape = v2.check_input(request.inputs[0])
        self.gateway.check_count(shape[0])
        data = request.inputs[0].decode()  # only now: the header fits the model
        inputs = data if v2.takes_images else np.asarray(data).reshape(shape)
        if request.parameters.get("timeout"):
            given = request.parameters["timeout"] / 1e6
            timeout_s = given if timeout_s is None else min(timeout_s, given)
        answer = self.gateway.scores(v2.model.name, inputs, route=route, protocol=protocol, timeout_s=timeout_s)
        scores = np.asarray(answer.scores, dtype=np.float32)
        outputs = [(self._output(v2, scores, asked), asked) for asked in wanted]
        return InferResponse(v2.name, answer.route.name, outputs, request.id,
                             {"backend": answer.route.backend})

    @staticmethod
    def _outputs(v2: V2Model, outputs: list[RequestedOutput] | None) -> list[RequestedOutput]:
        if not outputs:
            return [RequestedOutput(v2.output_name)]
        for asked in outputs:
            if asked.name != v2.output_name:
                raise BadRequest(f"model {v2.name!r} has no output {asked.name!r}; its output is "
                                 f"{v2.output_name!r}", code="invalid_output")
            if asked.classification and v2.model.task.name != "classification":
                raise BadRequest(f"output {asked.name!r} of {v2.model.task.name} model {v2.name!r} has no "
                                 "classification", code="invalid_output")
        return outputs

    @staticmethod
    def _output(v2: V2Model, scores: np.ndarray, asked: RequestedOutput) -> Tensor:
        if not asked.classification:
            return Tensor(asked.name, "FP32", list(scores.shape), scores)
        labels = v2.model.labels
        indices, values = top_k(scores, asked.classification)
        rows = [[f"{value:f}:{index}:{labels[index]}".encode() for index, value in zip(row_i, row_v)]
                for row_i, row_v in zip(indices.tolist(), values.tolist())]
        return Tensor(asked.name, "BYTES", [len(rows), indices.shape[1]], [e for row in rows for e in row])
