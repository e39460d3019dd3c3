"""Image decoding and per-model preprocessing.

Pure functions: bytes -> PIL image -> uint8 HWC array -> model tensor.  This module
depends only on numpy and Pillow so that TorchServe's handler can ship it inside a
``.mar`` and preprocess exactly as the gateway does (one implementation, not two).
"""
from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# name -> (mean, std) in 0..1 pixel units: value = (x/255 - mean) / std
SCALINGS = {
    "imagenet": (IMAGENET_MEAN, IMAGENET_STD),  # torchvision convention
    "tf": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),  # Keras MobileNetV2: x/127.5 - 1
    # (x - 127) / 128: TF EfficientNet-Lite (MEAN_RGB 127, STDDEV_RGB 128 in tensorflow/tpu
    # models/official/efficientnet/lite/efficientnet_lite_builder.py)
    "efficientnet_lite": ((127 / 255,) * 3, (128 / 255,) * 3),
    "unit": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),  # x/255
    "raw": ((0.0, 0.0, 0.0), (1 / 255, 1 / 255, 1 / 255)),  # 0..255 unchanged
}
# stretch: to size, ignoring the aspect ratio; center_crop: shorter side to size/crop_ratio,
# then the centre; letterbox: the whole photo scaled to fit, padded (detectors)
RESIZES = ("stretch", "center_crop", "letterbox")
INTERPOLATIONS = {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
                  "bicubic": Image.Resampling.BICUBIC}
PAD_POSITIONS = ("top_left", "center")
CHANNEL_ORDERS = ("RGB", "BGR")
LAYOUTS = ("NCHW", "NHWC")
DTYPES = ("float32", "float16", "uint8")

MAX_SIDE = 65_535  # larger is never a real photo; PIL would still try to allocate it


class ImageError(ValueError):
    """The bytes are not an image we can classify (maps to HTTP 400)."""


class SpecError(ValueError):
    """A preprocessing setting out of range; ``field`` names it."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field, self.message = field, message


@dataclass(frozen=True)
class PreprocessSpec:
    """How one model wants its input tensor built."""

    size: tuple[int, int] = (224, 224)  # (height, width)
    resize: str = "stretch"  # one of RESIZES
    crop_ratio: float = 0.875  # center_crop only: size / resized shorter side
    interpolation: str = "bilinear"
    pad_value: int = 114  # letterbox only: the canvas colour (0..255, every channel)
    pad_position: str = "top_left"  # letterbox only: where the scaled photo sits on the canvas
    channels: str = "RGB"  # channel order the model was trained with
    scaling: str = "imagenet"
    layout: str = "NCHW"
    dtype: str = "float32"
    mean: tuple[float, float, float] | None = None  # override the scaling's mean/std
    std: tuple[float, float, float] | None = None
    _affine: tuple | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self):
        for name, value, allowed in (
            ("resize", self.resize, RESIZES),
            ("interpolation", self.interpolation, INTERPOLATIONS),
            ("pad_position", self.pad_position, PAD_POSITIONS),
            ("channels", self.channels, CHANNEL_ORDERS),
            ("scaling", self.scaling, SCALINGS),
            ("layout", self.layout, LAYOUTS),
            ("dtype", self.dtype, DTYPES),
        ):
            if value not in allowed:
                raise SpecError(name, f"expected one of {sorted(allowed)}, got {value!r}")
        if len(self.size) != 2 or min(self.size) < 1 or max(self.size) > 4096:
            raise SpecError("size", f"expected [height, width] within 1..4096, got {list(self.size)!r}")
        if not 0.1 <= self.crop_ratio <= 1.0:
            raise SpecError("crop_ratio", f"expected a value within 0.1..1.0, got {self.crop_ratio!r}")
        if not 0 <= self.pad_value <= 255:
            raise SpecError("pad_value", f"expected a value within 0..255, got {self.pad_value!r}")
        mean, std = SCALINGS[self.scaling]
        mean = self.mean if self.mean is not None else mean
        std = self.std if self.std is not None else std
        if len(mean) != 3 or len(std) != 3 or any(s == 0 for s in std):
            raise SpecError("std" if len(mean) == 3 else "mean",
                            f"expected three values each for mean and std, std non-zero, got {mean!r} / {std!r}")
        # x * scale + offset == (x/255 - mean) / std, computed once in float32
        scale = np.array([1.0 / (255.0 * s) for s in std], dtype=np.float32)
        offset = np.array([-m / s for m, s in zip(mean, std)], dtype=np.float32)
        object.__setattr__(self, "_affine", (scale, offset))

    def to_dict(self) -> dict:
        out: dict[str, Any] = {"size": list(self.size), "resize": self.resize}
        if self.resize == "center_crop":
            out["crop_ratio"] = self.crop_ratio
        out["interpolation"] = self.interpolation
        if self.resize == "letterbox":
            out.update(pad_value=self.pad_value, pad_position=self.pad_position)
        out.update(channels=self.channels, scaling=self.scaling, layout=self.layout, dtype=self.dtype)
        if self.mean:
            out["mean"] = list(self.mean)
        if self.std:
            out["std"] = list(self.std)
        return out

    @classmethod
    def from_dict(cls, values: dict) -> PreprocessSpec:
        fields: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
        return cls(**fields)

    def tensor_dims(self, layout: str | None = None) -> tuple[int, int, int]:
        """One preprocessed image's dims (no batch axis) in ``layout`` (default: the spec's)."""
        height, width = self.size
        return (3, height, width) if (layout or self.layout) == "NCHW" else (height, width, 3)

    def decode_size(self) -> tuple[int, int]:
        """(width, height) the decoded photo needs so that resizing only ever shrinks it:
        JPEG draft mode may decode at 1/2, 1/4, 1/8 scale down to this, never below."""
        height, width = self.size
        if self.resize == "center_crop":
            side = math.ceil(min(height, width) / self.crop_ratio)
            return max(width, side), max(height, side)
        if self.resize == "letterbox":
            side = max(height, width)
            return side, side
        return width, height


# Pillow's decompression-bomb warning is an error here, set once for the process: a
# catch_warnings() per photo would rewrite the global warning filters from several threads at
# once (not thread-safe) and reset Python's warn-once memory on every request.
warnings.filterwarnings("error", category=Image.DecompressionBombWarning)


def decode_image(data: bytes, max_pixels: int = 40_000_000, draft_size=None) -> Image.Image:
    """Decode bytes into an RGB image, refusing anything that is not a sane picture.

    ``draft_size`` (width, height) lets the JPEG decoder downscale by 1/2, 1/4 or 1/8
    while decoding, which makes large photos several times cheaper; the result is still
    at least that big. ``original_size(img)`` is then the photo's own size (after EXIF
    orientation), for coordinates that must refer to the photo, not to the decoded copy.
    """
    if not data:
        raise ImageError("empty image: the body holds no bytes")
    try:
        img = Image.open(io.BytesIO(data))
        width, height = img.size
        if width < 1 or height < 1 or width > MAX_SIDE or height > MAX_SIDE:
            raise ImageError(f"absurd image dimensions {width}x{height}")
        if width * height > max_pixels:
            raise ImageError(
                f"image has {width}x{height} = {width * height} pixels, "
                f"more than the limit of {max_pixels}")
        if draft_size is not None and img.format == "JPEG":
            img.draft("RGB", _draft_target(img.size, draft_size))
        img.load()
        upright = to_rgb(ImageOps.exif_transpose(img))
        turned = upright.size != img.size  # EXIF orientations 5-8 swap the axes
        upright.info["original_size"] = (height, width) if turned else (width, height)
        return upright
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"image refused as a decompression bomb: {exc}") from None
    except UnidentifiedImageError:
        raise ImageError("cannot identify image file: not a supported image format") from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, MemoryError) as exc:
        raise ImageError(f"image could not be decoded: {exc}") from None


def original_size(img: Image.Image) -> tuple[int, int]:
    """(width, height) of the photo as sent, upright: decode_image's draft decoding may have
    returned a smaller copy."""
    return img.info.get("original_size", img.size)


def _draft_target(size, target):
    """The draft request: PIL picks the largest 1/2, 1/4, 1/8 reduction that keeps the
    decoded image at least this big, so the final resize still only shrinks."""
    return (min(size[0], target[0]), min(size[1], target[1]))


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode (L, LA, P, RGBA, CMYK, I;16, I, F, ...) to 8-bit RGB."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float32)
        hi = 65535.0 if img.mode.startswith("I;16") else max(float(arr.max()), 1.0)
        arr = np.clip(arr * (255.0 / hi), 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def letterbox_geometry(image_size: tuple[int, int], spec: PreprocessSpec) -> tuple[float, int, int, int, int]:
    """Where a (width, height) photo lands on the letterbox canvas:
    (scale, left, top, scaled width, scaled height). Model-space x = left + scale * photo x."""
    width, height = image_size
    canvas_h, canvas_w = spec.size
    # integer arithmetic: int(width * (canvas_w / width)) is canvas_w - 1 for thousands of widths
    # (416 / 23 * 23 == 415.99999999999994), which would leave a pad stripe on the fitted side
    if canvas_w * height <= canvas_h * width:  # the width limits
        scale, new_w, new_h = canvas_w / width, canvas_w, max(1, canvas_w * height // width)
    else:
        scale, new_w, new_h = canvas_h / height, max(1, canvas_h * width // height), canvas_h
    if spec.pad_position == "center":
        left, top = (canvas_w - new_w) // 2, (canvas_h - new_h) // 2
    else:
        left, top = 0, 0
    return scale, left, top, new_w, new_h


def resize(img: Image.Image, spec: PreprocessSpec) -> np.ndarray:
    """Resize (and crop or pad) an RGB image to the spec's size; returns uint8 HWC in the
    spec's channel order."""
    height, width = spec.size
    method = INTERPOLATIONS[spec.interpolation]
    if spec.resize == "stretch":
        out = img.resize((width, height), method, reducing_gap=3.0)
    elif spec.resize == "center_crop":
        short = min(height, width) / spec.crop_ratio
        scale = short / min(img.size)
        rw, rh = max(width, round(img.size[0] * scale)), max(height, round(img.size[1] * scale))
        out = img.resize((rw, rh), method, reducing_gap=3.0)
        left, top = (rw - width) // 2, (rh - height) // 2
        out = out.crop((left, top, left + width, top + height))
    else:
        _, left, top, new_w, new_h = letterbox_geometry(img.size, spec)
        out = Image.new("RGB", (width, height), (spec.pad_value,) * 3)
        out.paste(img.resize((new_w, new_h), method, reducing_gap=3.0), (left, top))
    pixels = np.asarray(out, dtype=np.uint8)
    return pixels[..., ::-1] if spec.channels == "BGR" else pixels


def normalize(pixels: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """uint8 HWC (or NHWC) pixels -> the model's scaling, layout and dtype.

    The layout change happens on the uint8 pixels (4x less memory to shuffle than
    float32), then one float32 pass applies the per-channel affine: ~15x faster than
    converting first and transposing floats.
    """
    if spec.layout == "NCHW":
        pixels = np.ascontiguousarray(np.moveaxis(pixels, -1, -3))
    if spec.dtype == "uint8":
        return np.ascontiguousarray(pixels)
    assert spec._affine is not None  # set by __post_init__
    scale, offset = spec._affine
    if spec.layout == "NCHW":
        scale, offset = scale[:, None, None], offset[:, None, None]
    out = pixels.astype(np.float32)
    out *= scale
    out += offset
    return out.astype(np.float16) if spec.dtype == "float16" else out


def preprocess_image(img: Image.Image, spec: PreprocessSpec) -> np.ndarray:
    """One decoded image -> one model input (no batch axis)."""
    return normalize(resize(img, spec), spec)


def preprocess_bytes(data: bytes, spec: PreprocessSpec, max_pixels: int = 40_000_000) -> np.ndarray:
    """Encoded image bytes -> one model input, decoding large JPEGs in draft mode."""
    return preprocess_image(decode_image(data, max_pixels, draft_size=spec.decode_size()), spec)
