"""`gateway detect IMAGE... [--draw OUT.png]`: detection through a running gateway.

Prints one block per image, like `gateway classify`::

    Image 'astronaut.png': 1 detection
        0.9251 (0) = person  x1=11.2 y1=20.4 x2=368.0 y2=507.1
"""
from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from gateway.tools.client import DEFAULT_URL, ClientError, GatewayClient

DEFAULT_MODEL = "yolox_nano"


def register(subparsers) -> None:
    p = subparsers.add_parser("detect", help="detect objects in image files through a running gateway")
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--url", default=DEFAULT_URL, help=f"gateway URL (default {DEFAULT_URL})")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"detection model (default {DEFAULT_MODEL})")
    p.add_argument("--backend", default=None, help="force a route/backend")
    p.add_argument("--score-threshold", type=float, default=None, dest="score_threshold")
    p.add_argument("--iou-threshold", type=float, default=None, dest="iou_threshold")
    p.add_argument("--max-detections", type=int, default=None, dest="max_detections")
    p.add_argument("--draw", default=None, metavar="OUT.png",
                   help="draw the boxes on the photo and save it here (several images: OUT_<name>.png)")
    p.set_defaults(func=detect_command)


def format_detections(name: str, detections: Sequence[dict]) -> str:
    """One image's block: a header line, then `    score (index) = label  x1=.. y1=.. x2=.. y2=..`."""
    count = f"{len(detections)} detection{'' if len(detections) == 1 else 's'}"
    lines = [f"Image '{name}': {count}"]
    for d in detections:
        b = d["box"]
        lines.append(f"    {d['score']:.4f} ({d['index']}) = {d['label']}  "
                     f"x1={b['x1']:.1f} y1={b['y1']:.1f} x2={b['x2']:.1f} y2={b['y2']:.1f}")
    return "\n".join(lines)


def drawing_path(out: str, image: str, several: bool) -> Path:
    """--draw's file for one image: OUT itself, or OUT_<image name> when several images are drawn."""
    out_path = Path(out)
    if not several:
        return out_path
    return out_path.with_name(f"{out_path.stem}_{Path(image).stem}{out_path.suffix or '.png'}")


def save_drawing(image_path: str, detections: Sequence[dict], out: Path) -> None:
    """Decode the photo as the gateway does (EXIF orientation applied: the boxes' coordinates)
    and save it with the boxes drawn."""
    from gateway.preprocess import decode_image
    from gateway.tools.draw import draw_detections

    photo = decode_image(Path(image_path).read_bytes())
    out.parent.mkdir(parents=True, exist_ok=True)
    draw_detections(photo, detections).save(out)


def detect_command(args) -> int:
    client = GatewayClient(args.url)
    status = 0
    for path in args.images:
        try:
            body = client.detect(Path(path), model=args.model, backend=args.backend,
                                 score_threshold=args.score_threshold, iou_threshold=args.iou_threshold,
                                 max_detections=args.max_detections)
            found = body["results"][0]["detections"]
        except (ClientError, OSError, KeyError, IndexError, TypeError) as exc:
            print(f"Image '{path}': error: {exc}", file=sys.stderr)
            status = 1
            continue
        print(format_detections(path, found))
        if args.draw:
            out = drawing_path(args.draw, path, len(args.images) > 1)
            try:
                save_drawing(path, found, out)
            except (OSError, ValueError) as exc:
                print(f"Image '{path}': cannot draw to {out}: {exc}", file=sys.stderr)
                status = 1
                continue
            print(f"    drawn to {out}")
    return status
