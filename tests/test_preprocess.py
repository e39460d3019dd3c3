"""Preprocessing against hand-computed references, and the image zoo it must accept or refuse."""
import io

import numpy as np
import pytest
from PIL import Image

from gateway.preprocess import ImageError, PreprocessSpec, decode_image, normalize, preprocess_bytes, resize

from helpers import encode, png_claiming

PIXELS = np.array([[[0, 128, 255], [10, 20, 30]]], dtype=np.uint8)  # 1x2 HWC
# normalize computes x * scale + offset in float32 against exact float64 references: two IEEE
# roundings of values below ~3 in magnitude (< 5e-7) in elementwise numpy operations, which give
# the same bits on every x86-64 CPU; hence 1e-6 (1e-5 where the values reach 255)


def test_imagenet_scaling_nchw_matches_hand_computed():
    spec = PreprocessSpec(size=(1, 2), scaling="imagenet", layout="NCHW")
    out = normalize(PIXELS, spec)
    assert out.shape == (3, 1, 2) and out.dtype == np.float32
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    for c in range(3):
        for x in range(2):
            expected = (PIXELS[0, x, c] / 255.0 - mean[c]) / std[c]
            assert out[c, 0, x] == pytest.approx(expected, abs=1e-6)


def test_tf_scaling_nhwc_is_x_over_127_5_minus_1():
    out = normalize(PIXELS, PreprocessSpec(size=(1, 2), scaling="tf", layout="NHWC"))
    assert out.shape == (1, 2, 3)
    np.testing.assert_allclose(out, PIXELS / 127.5 - 1.0, atol=1e-6)


@pytest.mark.parametrize("scaling,expected", [("unit", PIXELS / 255.0), ("raw", PIXELS.astype(np.float64))])
def test_unit_and_raw_scaling(scaling, expected):
    out = normalize(PIXELS, PreprocessSpec(size=(1, 2), scaling=scaling, layout="NHWC"))
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-5)


def test_dtypes_and_batched_layout():
    batch = np.stack([PIXELS, PIXELS[:, ::-1]])  # NHWC
    out = normalize(batch, PreprocessSpec(size=(1, 2), scaling="tf", layout="NCHW", dtype="float16"))
    assert out.shape == (2, 3, 1, 2) and out.dtype == np.float16
    assert normalize(PIXELS, PreprocessSpec(size=(1, 2), dtype="uint8", layout="NHWC")).dtype == np.uint8
    np.testing.assert_array_equal(out[1, :, 0, 0], out[0, :, 0, 1])


def test_custom_mean_std_override():
    spec = PreprocessSpec(size=(1, 2), scaling="unit", layout="NHWC", mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    np.testing.assert_allclose(normalize(PIXELS, spec), (PIXELS / 255.0 - 0.5) / 0.25, atol=1e-5)


def test_stretch_and_center_crop_geometry():
    img = Image.new("RGB", (400, 200))
    img.paste((255, 0, 0), (0, 0, 100, 200))  # a red left quarter
    stretched = resize(img, PreprocessSpec(size=(50, 60), resize="stretch"))
    assert stretched.shape == (50, 60, 3)
    cropped = resize(img, PreprocessSpec(size=(100, 100), resize="center_crop", crop_ratio=1.0))
    assert cropped.shape == (100, 100, 3)
    # the center crop of a 200x100 resize keeps columns 50..150: the red quarter (0..50) is cut away
    assert cropped[:, 2:, 0].max() < 10 and cropped[:, 0, 0].max() < 128
    assert stretched[:, 0, 0].min() > 200


def test_efficientnet_lite_scaling_is_x_minus_127_over_128():
    out = normalize(PIXELS, PreprocessSpec(size=(1, 2), scaling="efficientnet_lite", layout="NHWC"))
    # float32 x * scale + offset against exact float64 arithmetic: two IEEE roundings of values
    # below 2 in magnitude, identical on every x86-64 CPU (elementwise numpy ops, no reductions)
    np.testing.assert_allclose(out, (PIXELS - 127.0) / 128.0, atol=1e-6)


def test_bgr_channel_order_reverses_the_channels():
    img = Image.new("RGB", (4, 2), (10, 20, 30))
    assert resize(img, PreprocessSpec(size=(2, 4), channels="BGR"))[0, 0].tolist() == [30, 20, 10]
    assert resize(img, PreprocessSpec(size=(2, 4)))[0, 0].tolist() == [10, 20, 30]


def test_interpolation_is_applied():
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    outs = {m: resize(img, PreprocessSpec(size=(20, 20), interpolation=m)) for m in ("nearest", "bilinear", "bicubic")}
    assert not np.array_equal(outs["bilinear"], outs["bicubic"])
    assert not np.array_equal(outs["nearest"], outs["bilinear"])


@pytest.mark.parametrize("size,position,expected", [
    ((400, 200), "top_left", (0.5, 0, 0, 200, 100)),      # landscape: pad below
    ((100, 400), "top_left", (0.5, 0, 0, 50, 200)),       # portrait: pad right
    ((400, 200), "center", (0.5, 0, 50, 200, 100)),
    ((10, 5), "top_left", (20.0, 0, 0, 200, 100)),        # tiny photos are scaled up
])
def test_letterbox_geometry(size, position, expected):
    spec = PreprocessSpec(size=(200, 200), resize="letterbox", pad_position=position)
    from gateway.preprocess import letterbox_geometry

    assert letterbox_geometry(size, spec) == expected


def test_letterbox_pads_with_the_pad_value():
    img = Image.new("RGB", (400, 200), (255, 0, 0))
    out = resize(img, PreprocessSpec(size=(200, 200), resize="letterbox", pad_value=114))
    assert out.shape == (200, 200, 3)
    assert out[:100, :, 0].min() == 255 and out[100:, :, :].tolist() == [[[114] * 3] * 200] * 100


def test_decode_size_never_makes_resizing_enlarge():
    assert PreprocessSpec(size=(224, 224)).decode_size() == (224, 224)
    assert PreprocessSpec(size=(224, 224), resize="center_crop", crop_ratio=0.875).decode_size() == (256, 256)
    assert PreprocessSpec(size=(416, 416), resize="letterbox").decode_size() == (416, 416)


@pytest.mark.parametrize("spec", [dict(layout="NWHC"), dict(scaling="caffe"), dict(size=(0, 3)),
                                  dict(dtype="int8"), dict(resize="zoom"), dict(crop_ratio=2.0),
                                  dict(interpolation="lanczos9"), dict(channels="GBR"), dict(pad_value=300),
                                  dict(pad_position="bottom")])
def test_invalid_spec_is_refused(spec):
    with pytest.raises(ValueError):
        PreprocessSpec(**spec)


@pytest.mark.parametrize("mode,make", [
    ("L", lambda: Image.new("L", (30, 20), 100)),
    ("LA", lambda: Image.new("LA", (30, 20), (100, 128))),
    ("RGBA", lambda: Image.new("RGBA", (30, 20), (10, 20, 30, 0))),
    ("P", lambda: Image.new("RGB", (30, 20), (1, 2, 3)).convert("P")),
    ("CMYK", lambda: Image.new("CMYK", (30, 20), (0, 255, 0, 0))),
    ("I;16", lambda: Image.fromarray(np.full((20, 30), 65535, dtype=np.uint16))),
])
def test_modes_convert_to_rgb(mode, make):
    fmt = "JPEG" if mode == "CMYK" else ("TIFF" if mode == "I;16" else "PNG")
    img = decode_image(encode(make(), fmt))
    assert img.mode == "RGB" and img.size == (30, 20)


def test_sixteen_bit_white_stays_white_and_transparent_becomes_white():
    white16 = decode_image(encode(Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16)), "PNG"))
    assert np.asarray(white16).min() == 255
    clear = decode_image(encode(Image.new("RGBA", (4, 4), (0, 0, 0, 0)), "PNG"))
    assert np.asarray(clear).min() == 255


def test_exif_orientation_is_respected():
    img = Image.new("RGB", (40, 20), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    rotated = decode_image(encode(img, "JPEG", exif=exif.tobytes()))
    assert rotated.size == (20, 40)


def test_animated_gif_uses_first_frame():
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 255, 0))]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    img = decode_image(buf.getvalue())
    assert img.getpixel((0, 0))[0] > 200


def test_jpeg_draft_mode_keeps_enough_pixels_and_matches_full_decode_closely():
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (27, 48, 3), dtype=np.uint8)
    big = Image.fromarray(base).resize((1920, 1080), Image.BILINEAR)
    data = encode(big, "JPEG", quality=90)
    spec = PreprocessSpec()
    drafted = decode_image(data, draft_size=(224, 224))
    assert 224 <= min(drafted.size) < 1080  # decoded at reduced scale
    full = normalize(resize(decode_image(data), spec), spec)
    fast = preprocess_bytes(data, spec)
    assert fast.shape == full.shape == (3, 224, 224)
    assert np.abs(fast - full).mean() < 0.05


@pytest.mark.parametrize("data,match", [
    (b"", "empty"),
    (b"hello, this is text", "cannot identify"),
    (b"\xff\xd8\xff\xe0" + b"\x00" * 50, "decod|identify"),
])
def test_garbage_is_refused_with_a_message(data, match):
    with pytest.raises(ImageError, match=match):
        decode_image(data)


def test_truncated_jpeg_is_refused():
    data = encode(Image.new("RGB", (64, 64), (9, 9, 9)), "JPEG")
    with pytest.raises(ImageError):
        decode_image(data[: len(data) // 3])


def test_pixel_limit_and_absurd_dimensions_refused_before_decoding():
    png = encode(Image.new("L", (3000, 3000)), "PNG")
    with pytest.raises(ImageError, match="limit"):
        decode_image(png, max_pixels=1_000_000)
    # a real PNG whose header was patched to claim 100000 x 100000 pixels
    with pytest.raises(ImageError, match="absurd|limit|bomb"):
        decode_image(png_claiming(100_000, 100_000))


def test_letterbox_fills_the_fitted_side_exactly():
    """416 / 23 * 23 is 415.99999999999994 in floats: truncating it left a one-pixel pad stripe."""
    from gateway.preprocess import letterbox_geometry

    spec = PreprocessSpec(size=(416, 416), resize="letterbox")
    for side in range(1, 3000):
        assert letterbox_geometry((side, 1), spec)[3] == 416, side  # landscape: the width fills
        assert letterbox_geometry((1, side), spec)[4] == 416, side  # portrait: the height fills
    assert letterbox_geometry((23, 10), spec) == (416 / 23, 0, 0, 416, 180)
    out = resize(Image.new("RGB", (23, 10), (255, 0, 0)), spec)
    assert out[:180, :, 0].min() == 255  # no pad column on the right
