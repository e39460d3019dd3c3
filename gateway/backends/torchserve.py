"""PLACEHOLDER (being written): TorchServe adapter."""
from gateway.backends.base import Backend


class TorchServeBackend(Backend):
    kind = "torchserve"
    options = {"management_url": ""}
