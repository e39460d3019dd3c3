"""PLACEHOLDER (being written): TensorFlow Serving adapter."""
from gateway.backends.base import Backend


class TFServingBackend(Backend):
    kind = "tfserving"
    options = {}
