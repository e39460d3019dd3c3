"""Detection: a plain onnxruntime loop with the gateway's preprocessing and decoding (YOLOX-Nano).

Target (issue 14): the gateway's detect endpoint at 4 clients >= 0.8x this loop's images/s.
The gateway side joins once `POST /v1/models/<m>/detect` exists; for now the loop alone,
at 1 and 4 calling threads, and where each image's time goes.
Usage: .venv/bin/python benchmarks/detect_bench.py [--requests N]
"""
from __future__ import annotations

import argparse
import statistics
import time

import onnxruntime as ort
from common import ROOT, fmt, photos, run_load

from gateway.detection import DetectionSpec, detections
from gateway.preprocess import PreprocessSpec, decode_image, preprocess_image

# as models/yolox_nano/README.md and the proposed gateway.yaml entry declare it
PREPROCESS = PreprocessSpec(size=(416, 416), resize="letterbox", pad_value=114, pad_position="top_left",
                            interpolation="bilinear", channels="BGR", scaling="raw", layout="NCHW", dtype="float32")
POSTPROCESS = DetectionSpec()
LABELS = [line for line in (ROOT / "models/yolox_nano/coco80.txt").read_text().splitlines() if line]


def make_loop(session):
    name = session.get_inputs()[0].name

    def detect(data: bytes) -> list[dict]:
        photo = decode_image(data, draft_size=PREPROCESS.decode_size())
        raw = session.run(None, {name: preprocess_image(photo, PREPROCESS)[None]})[0]
        return detections(raw, [photo.size], LABELS, PREPROCESS, POSTPROCESS)[0]

    return detect


def stages(session, items: list[bytes], rounds: int = 10) -> dict[str, float]:
    """Median ms per image of decode+preprocess, inference and decoding+NMS, one thread."""
    name = session.get_inputs()[0].name
    times = {"preprocess": [], "inference": [], "postprocess": []}
    for _ in range(rounds):
        for data in items:
            t0 = time.perf_counter()
            photo = decode_image(data, draft_size=PREPROCESS.decode_size())
            x = preprocess_image(photo, PREPROCESS)[None]
            t1 = time.perf_counter()
            raw = session.run(None, {name: x})[0]
            t2 = time.perf_counter()
            detections(raw, [photo.size], LABELS, PREPROCESS, POSTPROCESS)
            t3 = time.perf_counter()
            for key, value in zip(times, (t1 - t0, t2 - t1, t3 - t2)):
                times[key].append(value * 1e3)
    return {key: statistics.median(values) for key, values in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--model", default=str(ROOT / "onnx/yolox_nano.onnx"))
    args = ap.parse_args()

    items = list(photos().values())
    session = ort.InferenceSession(args.model, providers=["CPUExecutionProvider"])  # default threads: all cores
    loop = make_loop(session)
    found = {name: [d["label"] for d in loop(data)] for name, data in photos().items()}
    print("detections:", {name: labels[:3] for name, labels in found.items()})
    print("per image, median ms:", {k: round(v, 2) for k, v in stages(session, items).items()})
    results = {c: run_load(loop, items, concurrency=c, total=args.requests) for c in (1, 4)}
    for c, result in results.items():
        print(fmt(f"plain onnxruntime loop, {c} calling thread{'s' if c > 1 else ''}", result))
    print(f"4 threads / 1 thread: {results[4]['throughput'] / results[1]['throughput']:.2f}x")
    # TODO(issue 14, phase 2): the gateway's POST /v1/models/yolox_nano/detect at 4 clients,
    # measured here side by side; target >= 0.8x the 4-thread loop above.


if __name__ == "__main__":
    main()
