"""ONNX image classifier (NCHW) -> TensorFlow SavedModel (NHWC), run as its own process:

    python -m gateway.ops.export.onnx2tf_worker MODEL.onnx OUT_DIR --input-name images --output-name logits [--softmax]

onnx2tf (https://github.com/PINTO0309/onnx2tf) turns the ONNX graph into a Keras graph with
channels-last input; this wraps it in a ``tf.Module`` whose ``serving_default`` signature has
the given tensor names and a free batch dimension, and with ``--softmax`` answers probabilities.
Only the module is saved (no Keras metadata), so saving takes a second and a rebuild writes the
same bytes (``fingerprint.pb`` aside: TensorFlow puts a random UUID in it).

A process of its own: importing onnx2tf sets process-wide state (TF_USE_LEGACY_KERAS, seeds,
an unbounded recursion limit) and a conversion peaks near 1 GB. `gateway models build` and
`gateway models convert` call it and then check the result against ONNX Runtime themselves.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m gateway.ops.export.onnx2tf_worker", description=__doc__.split("\n")[0])
    p.add_argument("onnx", type=Path)
    p.add_argument("out", type=Path, help="the SavedModel directory to write (must not exist)")
    p.add_argument("--input-name", default="images")
    p.add_argument("--output-name", default="logits")
    p.add_argument("--softmax", action="store_true", help="the signature answers softmax probabilities")
    args = p.parse_args(argv)
    source, out = args.onnx.resolve(), args.out.resolve()
    if out.exists():
        p.error(f"{out} exists")
    # onnx2tf simplifies the graph by running the `onnxsim` command: the one beside this interpreter
    os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
    if shutil.which("onnxsim") is None:
        print("onnx2tf_worker: the onnxsim command is missing (pip install onnxsim)", file=sys.stderr)
        return 2
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    with tempfile.TemporaryDirectory(prefix="onnx2tf-") as work:
        os.chdir(work)  # onnx2tf writes scratch files into the working directory
        copy = Path(work) / "model.onnx"
        shutil.copyfile(source, copy)  # onnxsim rewrites its input file in place
        import onnx2tf

        net = onnx2tf.convert(input_onnx_file_path=str(copy), output_folder_path=str(Path(work) / "onnx2tf"),
                              non_verbose=True, disable_model_save=True)
        save(net, out, args.input_name, args.output_name, args.softmax)
    return 0


def save(net, out: Path, input_name: str, output_name: str, softmax: bool) -> None:
    import tensorflow as tf

    if len(net.inputs) != 1 or len(net.inputs[0].shape) != 4 or len(net.outputs) != 1:
        raise SystemExit(f"onnx2tf_worker: expected one 4-D image input and one output, got inputs "
                         f"{[i.shape for i in net.inputs]} and {len(net.outputs)} output(s)")
    spec = tf.TensorSpec([None, *net.inputs[0].shape[1:]], tf.float32, name=input_name)

    class Serving(tf.Module):
        def __init__(self):
            super().__init__()
            self.net_variables = list(net.variables)  # tracked, so the signature's captures are saved

            @tf.function(input_signature=[spec])
            def serve(x):
                y = net(x, training=False)
                return {output_name: tf.nn.softmax(y) if softmax else y}
            self.serve = serve

    module = Serving()
    tf.saved_model.save(module, str(out), signatures={"serving_default": module.serve})


if __name__ == "__main__":
    sys.exit(main())
