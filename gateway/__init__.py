"""A multi-backend model-serving gateway for image classification."""

__version__ = "0.1.0"
