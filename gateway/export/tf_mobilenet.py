"""The Keras MobileNetV2 as a SavedModel with the seed's signature: input_1 -> predictions.

Keras 3 ``model.export()`` would name the input ``keras_tensor_N``; a ``tf.Module`` with an
explicit input signature keeps the names the seed's clients and configs use. TensorFlow is
imported only inside ``build_and_save`` (it takes seconds).
"""
from __future__ import annotations

import os
import shutil
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
    first = targets[0]
    staging = first.with_name(f".{first.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.parent.mkdir(parents=True, exist_ok=True)
    tf.saved_model.save(module, str(staging), signatures={"serving_default": module.serve})
    verify(staging, model, got, log)
    for target in targets[1:]:  # same bytes in every layout
        tmp = target.with_name(f".{target.name}.partial")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(staging, tmp)
        _swap(tmp, target)
    _swap(staging, first)
    return got


def _swap(new: Path, target: Path) -> None:
    """Replace a directory with as short a gap as a directory rename allows."""
    old = target.with_name(f".{target.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        target.rename(old)
    new.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def verify(path: Path, model, got: str, log=print) -> dict:
    """The saved signature vs the in-memory Keras model on two seeded inputs; random weights
    must still give image-dependent, non-flat answers."""
    import numpy as np
    import tensorflow as tf

    x = np.random.default_rng(1).uniform(-1, 1, (2, 224, 224, 3)).astype("float32")
    x[1] = np.clip(x[1] * 0.5 + 0.3, -1, 1)  # a second image with different statistics
    fn = tf.saved_model.load(str(path)).signatures["serving_default"]
    probs = fn(input_1=tf.constant(x))["predictions"].numpy()
    ref = np.asarray(model(x, training=False))
    checks = {"saved_vs_keras": float(np.abs(probs - ref).max()),
              "sum_minus_1": float(np.abs(probs.sum(axis=1) - 1).max()),
              "max_prob": float(probs.max()),
              "inputs_differ_by": float(np.abs(probs[0] - probs[1]).max())}
    log("  check tfmobilenet: " + ", ".join(f"{k} {v:.1e}" for k, v in checks.items()))
    if checks["saved_vs_keras"] > 1e-4 or checks["sum_minus_1"] > 1e-4 or (
            got == "random" and (checks["max_prob"] < 0.005 or checks["inputs_differ_by"] < 1e-3)):
        raise RuntimeError(f"tfmobilenet SavedModel failed its checks: {checks}")
    return checks


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
