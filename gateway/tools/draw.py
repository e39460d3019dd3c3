"""Draw detections (boxes, labels, scores) on a photo (Pillow only)."""
from __future__ import annotations

import colorsys
from collections.abc import Sequence

from PIL import Image, ImageDraw, ImageFont

GOLDEN_RATIO = 0.618033988749895


def class_colour(index: int) -> tuple[int, int, int]:
    """A saturated colour per class index; hues step by the golden ratio, so neighbouring
    indices (and any few classes in one photo) get clearly different colours."""
    r, g, b = colorsys.hsv_to_rgb((index * GOLDEN_RATIO) % 1.0, 0.85, 0.95)
    return round(r * 255), round(g * 255), round(b * 255)


def text_colour(background: tuple[int, int, int]) -> tuple[int, int, int]:
    """Black on light backgrounds, white on dark ones (ITU-R BT.601 luma)."""
    luma = 0.299 * background[0] + 0.587 * background[1] + 0.114 * background[2]
    return (0, 0, 0) if luma > 140 else (255, 255, 255)


def draw_detections(image: Image.Image, detections: Sequence[dict]) -> Image.Image:
    """A copy of ``image`` (RGB) with each detection's box and "label score" drawn in its class's
    colour. Boxes are in the image's pixels, as the detect endpoint answers them."""
    out = image.convert("RGB")  # always a copy
    draw = ImageDraw.Draw(out)
    short = min(out.size)
    line = max(2, round(short / 200))
    font = ImageFont.load_default(size=max(12, round(short / 32)))
    # worst first, so the best detections' labels end up on top
    for det in sorted(detections, key=lambda d: d["score"]):
        box = det["box"]
        x1, y1, x2, y2 = box["x1"], box["y1"], box["x2"], box["y2"]
        colour = class_colour(det["index"])
        draw.rectangle((x1, y1, x2, y2), outline=colour, width=line)
        text = f"{det['label']} {det['score']:.2f}"
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        w, h = right - left + 2 * line, bottom - top + 2 * line
        # the label sits on the box's top edge, inside the photo: above it where there is room
        tx = min(max(0, x1), max(0, out.size[0] - w))
        ty = y1 - h if y1 - h >= 0 else min(y1, out.size[1] - h)
        draw.rectangle((tx, ty, tx + w, ty + h), fill=colour)
        draw.text((tx + line - left, ty + line - top), text, fill=text_colour(colour), font=font)
    return out
