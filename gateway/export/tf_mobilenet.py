"""The Keras MobileNetV2 as a SavedModel with the seed's signature: input_1 -> predictions.

Keras 3 ``model.export()`` would name the input ``keras_tensor_N``; a ``tf.Module`` with an
explicit input signature keeps the names the seed's clients and configs use.
"""
from __future__ import annotations

import os
import socket
from pathlib import Path


def build_and_save(targets: list[Path], weights: str, log=print) -> str:
    """Save the SavedModel into every target dir; returns the weights it got."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras
    import numpy as np
    import tensorflow as tf

    got = "random"
    model = None
    if weights == "imagenet":
        old = socket.getdefaulttimeout()
        socket.setdefaulttimeout(20)
        try:
            model = keras.applications.MobileNetV2(weights="imagenet")
            got = "imagenet"
        except Exception as exc:  # offline
            log(f"  tfmobilenet: Keras ImageNet weights unavailable ({type(exc).__name__}: "
                f"{str(exc)[:120]}); using seeded random weights")
        finally:
            socket.setdefaulttimeout(old)
    if model is None:
        keras.utils.set_random_seed(0)
        model = keras.applications.MobileNetV2(weights=None)
        recalibrate_batchnorm(model, np)

    class Serving(tf.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        @tf.function(input_signature=[tf.TensorSpec([None, 224, 224, 3], tf.float32, name="input_1")])
        def serve(self, input_1):
            return {"predictions": self.net(input_1, training=False)}

    module = Serving(model)
    for target in targets:
        target.parent.mkdir(parents=True, exist_ok=True)
        tf.saved_model.save(module, str(target), signatures={"serving_default": module.serve})
    return got


def recalibrate_batchnorm(model, np, logit_std: float = 3.0) -> None:
    """One training-mode call with momentum 0 so random weights give image-dependent
    outputs, then scale the classifier so logits spread (std ~3), as for the torch twin."""
    import keras

    layers = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    for layer in layers:
        layer.momentum = 0.0
    rng = np.random.default_rng(0)
    model(rng.uniform(-1, 1, (16, 224, 224, 3)).astype("float32"), training=True)
    for layer in layers:
        layer.momentum = 0.99
    head = model.get_layer("predictions")
    features = keras.Model(model.inputs, head.input)(rng.uniform(-1, 1, (16, 224, 224, 3)).astype("float32"))
    kernel, bias = head.get_weights()
    logits = np.asarray(features) @ kernel + bias
    head.set_weights([kernel * (logit_std / float(logits.std())), bias])
