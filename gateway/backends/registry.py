"""The engine kinds gateway.yaml's ``backends.<name>.kind`` may name, and their settings.

Adding an engine: its module in gateway/backends/, then one entry in ``KINDS`` and one member
in ``AnySettings`` here.
"""
from __future__ import annotations

from typing import Annotated

from pydantic import Field

from gateway.backends.base import Backend
from gateway.backends.embedded import EmbeddedBackend, EmbeddedSettings
from gateway.backends.tfserving import TFServingBackend, TFServingSettings
from gateway.backends.torchserve import TorchServeBackend, TorchServeSettings
from gateway.backends.triton import TritonBackend, TritonSettings

KINDS: dict[str, type[Backend]] = {
    "embedded": EmbeddedBackend, "triton": TritonBackend, "torchserve": TorchServeBackend,
    "tfserving": TFServingBackend,
}
AnySettings = Annotated[
    EmbeddedSettings | TritonSettings | TorchServeSettings | TFServingSettings,
    Field(discriminator="kind")]


def backend_class(kind: str) -> type[Backend]:
    return KINDS[kind]
