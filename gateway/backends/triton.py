"""PLACEHOLDER (being written): NVIDIA Triton adapter."""
from gateway.backends.base import Backend


class TritonBackend(Backend):
    kind = "triton"
    options = {}
