"""`gateway eval FOLDER --labels labels.csv`: accuracy of each route of a model on labelled photos.

Parity between engines cannot show that every engine is fed wrongly in the same way;
accuracy against labels can. For each route this prints top-1/top-5, images/s, agreement
with the first route on top-1 and the most frequent confusions, and writes it all as JSON.

The labels file is a CSV with a header holding at least ``file`` (relative to FOLDER) and
``class_index`` (the model's output index); other columns (``wnid``, ``label``) are ignored.
Routes are called in process (``--config``) or through a running gateway (``--url``), forced
one at a time with ``?route=<route>``, in batches of ``--batch-size`` photos.
"""
from __future__ import annotations

import csv
import json
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

TOP_K = 5


@dataclass(frozen=True)
class LabelledPhoto:
    file: str
    path: Path
    class_index: int


def read_labels(folder: Path, labels: Path) -> list[LabelledPhoto]:
    """The photos named in the CSV, in its order; every problem names the row."""
    if not labels.is_file():
        raise ValueError(f"no labels file {str(labels)!r}: give a CSV with the columns file,class_index "
                         f"with --labels FILE, or put it in the folder as labels.csv")
    with open(labels, newline="") as f:
        reader = csv.DictReader(f)
        missing = {"file", "class_index"} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{labels}: the header needs the columns file and class_index "
                             f"(missing: {', '.join(sorted(missing))})")
        photos = []
        for line, row in enumerate(reader, start=2):
            try:
                index = int(row["class_index"])
            except (TypeError, ValueError):
                raise ValueError(f"{labels}:{line}: class_index {row['class_index']!r} is not an integer") from None
            path = folder / row["file"]
            if not path.is_file():
                raise ValueError(f"{labels}:{line}: {path} does not exist")
            photos.append(LabelledPhoto(row["file"], path, index))
    if not photos:
        raise ValueError(f"{labels}: no photos listed")
    return photos


# A classifier answers, for a batch of encoded photos sent to one route, each photo's top-5
# class indices (best first); it raises on failure.
Classifier = Callable[[list[bytes], str], list[list[int]]]


def evaluate_route(classify: Classifier, route: str, photos: list[LabelledPhoto], batch_size: int = 8,
                   on_batch: Callable[[int], None] = lambda n: None) -> dict:
    """Top-1/top-5 and speed of one route; a failed batch counts its photos as errors."""
    top5: dict[str, list[int]] = {}
    errors: list[dict] = []
    started = time.perf_counter()
    for i in range(0, len(photos), batch_size):
        chunk = photos[i:i + batch_size]
        try:
            answers = classify([p.path.read_bytes() for p in chunk], route)
            top5.update({p.file: a for p, a in zip(chunk, answers)})
        except Exception as exc:  # reported per route, never fatal to the others
            errors += [{"file": p.file, "error": str(exc)} for p in chunk]
        on_batch(len(chunk))
    seconds = time.perf_counter() - started
    answered = [p for p in photos if p.file in top5]
    confused = Counter((p.class_index, top5[p.file][0]) for p in answered if top5[p.file][0] != p.class_index)
    n = len(photos)
    return {
        "route": route, "photos": n, "answered": len(answered), "errors": errors,
        "top1": sum(top5[p.file][0] == p.class_index for p in answered) / n,
        "top5": sum(p.class_index in top5[p.file] for p in answered) / n,
        "images_per_s": round(len(answered) / seconds, 2) if seconds else 0.0,
        "confused": [{"true": t, "predicted": pr, "count": c} for (t, pr), c in confused.most_common()],
        "top5_by_file": top5,
    }


def agreement(result: dict, reference: dict) -> float | None:
    """Share of photos both routes answered where their top-1 is the same."""
    common = set(result["top5_by_file"]) & set(reference["top5_by_file"])
    if not common:
        return None
    same = sum(result["top5_by_file"][f][0] == reference["top5_by_file"][f][0] for f in common)
    return same / len(common)


def evaluate(classify: Classifier, routes: list[str], photos: list[LabelledPhoto], batch_size: int = 8,
             progress: bool = True) -> list[dict]:
    """Every route in order; the first one is the reference for agreement."""
    from tqdm import tqdm

    results = []
    with tqdm(total=len(routes) * len(photos), unit="img", disable=not progress, file=sys.stderr,
              dynamic_ncols=True) as bar:
        for route in routes:
            bar.set_description(route)
            results.append(evaluate_route(classify, route, photos, batch_size, bar.update))
    for result in results:
        result["agreement_top1"] = agreement(result, results[0])
    return results


def report(model: str, results: list[dict], labels: list[str], confused: int = 5) -> str:
    """The table a person reads; the JSON holds the rest."""
    name = lambda i: labels[i] if 0 <= i < len(labels) else str(i)
    ref = results[0]["route"]
    lines = [f"{model}: {results[0]['photos']} labelled photos",
             f"{'route':<14}{'top-1':>7}{'top-5':>7}{'img/s':>8}{'errors':>8}  top-1 agrees with {ref}"]
    for r in results:
        agree = "-" if r["agreement_top1"] is None else f"{r['agreement_top1']:.2f}"
        lines.append(f"{r['route']:<14}{r['top1']:>7.2f}{r['top5']:>7.2f}{r['images_per_s']:>8.1f}"
                     f"{len(r['errors']):>8}  {agree}")
    for r in results:
        if r["confused"][:confused]:
            pairs = ", ".join(f"{name(c['true'])} -> {name(c['predicted'])}"
                              + (f" x{c['count']}" if c["count"] > 1 else "") for c in r["confused"][:confused])
            lines.append(f"most confused ({r['route']}): {pairs}")
        for e in r["errors"][:3]:
            lines.append(f"error ({r['route']}) {e['file']}: {e['error']}")
    return "\n".join(lines)


def in_process_classifier(gateway, model: str) -> Classifier:
    def classify(images: list[bytes], route: str) -> list[list[int]]:
        result = gateway.infer(model, images, task="classification", options={"top_k": TOP_K}, route=route)
        return [[p["index"] for p in preds] for preds in result.results]
    return classify


def http_classifier(url: str, model: str) -> Classifier:
    from gateway.tools.client import GatewayClient

    client = GatewayClient(url, timeout=300)

    def classify(images: list[bytes], route: str) -> list[list[int]]:
        body = client.classify(images, model=model, route=route, top_k=TOP_K)
        return [[p["index"] for p in r["predictions"]] for r in body["results"]]
    return classify


def register(subparsers) -> None:
    p = subparsers.add_parser("eval", help="accuracy of a model's routes on labelled photos")
    p.add_argument("folder", type=Path, help="folder of photos")
    p.add_argument("--labels", type=Path, default=None, help="CSV with file,class_index (default: FOLDER/labels.csv)")
    p.add_argument("--model", default=None, help="model (default: the default model)")
    p.add_argument("--backend", action="append", default=None, dest="routes",
                   help="route to evaluate (repeatable; default: every ready route)")
    p.add_argument("--url", default=None, help="evaluate through a running gateway instead of in process")
    p.add_argument("--config", default="gateway.yaml", help="config for in-process evaluation")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--out", type=Path, default=None, help="JSON results (default: eval-<model>.json)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=eval_command)


def eval_command(args) -> int:
    from gateway.config import ConfigError

    try:
        photos = read_labels(args.folder, args.labels or args.folder / "labels.csv")
        if args.url:
            model, routes, labels, classify = _remote(args)
        else:
            model, routes, labels, classify = _local(args)
    except (ValueError, OSError, ConfigError) as exc:
        print(f"gateway eval: {exc}", file=sys.stderr)
        return 2
    if not routes:
        print(f"gateway eval: no route of {model!r} is ready", file=sys.stderr)
        return 1
    results = evaluate(classify, routes, photos, args.batch_size, progress=not args.no_progress)
    print(report(model, results, labels))
    out = args.out or Path(f"eval-{model}.json")
    out.write_text(json.dumps({"model": model, "folder": str(args.folder), "routes": results}, indent=1) + "\n")
    print(f"results: {out}")
    return 1 if any(r["errors"] for r in results) else 0


def _local(args):
    from gateway.config import load_config
    from gateway.service import Gateway

    gateway = Gateway(load_config(args.config))
    gateway.load()
    model = gateway.model(args.model)
    routes = args.routes or [r.name for r in model.routes if gateway.route_ready(r)]
    return model.name, routes, list(model.labels), in_process_classifier(gateway, model.name)


def _remote(args):
    from gateway.tools.client import GatewayClient

    client = GatewayClient(args.url)
    name = args.model or client.models()["default_model"]
    info = client.model(name)
    routes = args.routes or [r["name"] for r in info["routes"] if r["ready"]]
    labels = _labels_of(info)
    return name, routes, labels, http_classifier(args.url, name)


def _labels_of(info: dict) -> list[str]:
    """Class names for the report: the packaged ImageNet names when the model uses them."""
    if info.get("labels_source") == "imagenet":
        return (Path(__file__).parents[1] / "data" / "imagenet_labels.txt").read_text().splitlines()
    return []
