"""The results file's lines, for both engines: one JSON object per image, keyed by ``"file"``.

A result line: ``{"file", "model", "backend", <the task's result key>: results}``
(``predictions`` for a classifier, ``detections`` for a detector); an error line:
``{"file", "error": {"status", "code", "message"}}``: a corrupt file is an error line, never a gap.
"""
from __future__ import annotations

import json
from pathlib import Path


def result_line(key: str, model: str, backend: str, result_key: str, results) -> dict:
    return {"file": key, "model": model, "backend": backend, result_key: results}


def error_line(key: str, status: int | None, code: str, message: str) -> dict:
    return {"file": key, "error": {"status": status, "code": code, "message": message}}


def encode(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def parse_lines(data: bytes) -> list[dict]:
    """Complete, parsable lines; stops at the first torn or broken one."""
    rows = []
    for line in data.splitlines(keepends=True):
        try:
            row = json.loads(line)
            row["file"]
        except (ValueError, KeyError, TypeError):
            break
        if not line.endswith(b"\n"):
            break
        rows.append(row)
    return rows


def merged(rows: list[dict]) -> list[dict]:
    """One line per key, sorted by key: a result beats an error, else the later line wins (a
    re-run that retried an image replaces its old error line)."""
    by_key: dict[str, dict] = {}
    for row in rows:
        old = by_key.get(row["file"])
        if old is None or "error" in old:
            by_key[row["file"]] = row
    return [by_key[k] for k in sorted(by_key)]


def done_keys(rows: list[dict], with_errors: bool) -> set[str]:
    """The keys a run skips: those with a result (and those with an error line if ``with_errors``)."""
    return {r["file"] for r in rows if with_errors or "error" not in r}


def read_local(path: Path) -> list[dict]:
    """A local results file's lines; cuts a torn (unterminated or unparsable) last line in place."""
    if not path.exists():
        return []
    data = path.read_bytes()
    rows = parse_lines(data)
    good = sum(len(line) for line in data.splitlines(keepends=True)[:len(rows)])
    if good != len(data):
        with open(path, "r+b") as f:
            f.truncate(good)
    return rows
