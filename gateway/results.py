"""A JSON Lines results file that lines arrive at out of order, on local disk or on S3.

Resumable either way: ``done()`` gives the keys (``"file"``) already written, and ``finish()``
leaves one file sorted by key with each key once, whatever order the lines came in.

- Local path: lines are appended as they arrive (a crash loses at most a torn last line,
  which ``done()`` cuts, exactly as `gateway batch` does), then ``finish()`` rewrites the file
  sorted (a temporary file renamed over it).  `gateway batch` can resume the same file.
- ``s3://``: objects cannot be appended to.  Lines are checkpointed as whole part objects
  under ``OUT.parts/`` every ``checkpoint_lines`` lines or ``checkpoint_s`` seconds; ``done()``
  reads the existing object and its parts; ``finish()`` writes the union of both, sorted, as
  one object, then deletes the parts.  A crash loses at most the lines since the last part.
  One run per output at a time (S3 has no locks).
"""
from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path
from typing import TextIO

from pyarrow import fs as pafs

from gateway import storage
from gateway.batch import load_done


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


def sorted_unique(rows: list[dict]) -> list[dict]:
    """One line per key (the first seen wins), sorted by key."""
    by_key: dict[str, dict] = {}
    for row in rows:
        by_key.setdefault(row["file"], row)
    return [by_key[k] for k in sorted(by_key)]


def encode(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


class LocalResults:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._sink: TextIO | None = None

    def done(self) -> set[str]:
        return load_done(self.path)

    def add(self, rows: list[dict]) -> None:
        if self._sink is None:
            self._sink = open(self.path, "a")  # noqa: SIM115 (kept open across add() calls, closed by close())
        self._sink.write("".join(json.dumps(r) + "\n" for r in rows))
        self._sink.flush()

    def checkpoint(self) -> None:
        pass  # every add() is already on disk

    def finish(self) -> int:
        """Sort the file in place (atomically); returns its number of lines."""
        self.close()
        if not self.path.exists():
            return 0
        data = self.path.read_bytes()
        rows = parse_lines(data)
        merged = sorted_unique(rows)
        if merged != rows:
            tmp = self.path.with_name(f".{self.path.name}.{uuid.uuid4().hex[:8]}.tmp")
            tmp.write_bytes(encode(merged))
            os.replace(tmp, self.path)
        return len(merged)

    def close(self) -> None:
        if self._sink is not None:
            self._sink.close()
            self._sink = None


class ObjectStoreResults:
    """Results on an object store (``s3://bucket/key.jsonl``); see the module docstring."""

    def __init__(self, filesystem: pafs.FileSystem, path: str, checkpoint_lines: int = 1000,
                 checkpoint_s: float = 60.0):
        self.fs, self.path = filesystem, path
        self.parts = path + ".parts"
        self.checkpoint_lines, self.checkpoint_s = checkpoint_lines, checkpoint_s
        self._pending: list[dict] = []
        self._last = time.monotonic()
        self._run = uuid.uuid4().hex[:8]
        self._seq = 0

    def _part_paths(self) -> list[str]:
        if storage.kind(self.fs, self.parts) != pafs.FileType.Directory:
            return []
        infos = self.fs.get_file_info(pafs.FileSelector(self.parts, recursive=False))
        return sorted(i.path for i in infos if i.type == pafs.FileType.File)

    def _rows(self) -> list[dict]:
        rows = []
        if storage.kind(self.fs, self.path) == pafs.FileType.File:
            rows += parse_lines(storage.read_bytes(self.fs, self.path))
        for part in self._part_paths():
            rows += parse_lines(storage.read_bytes(self.fs, part))
        return rows

    def done(self) -> set[str]:
        return {r["file"] for r in self._rows()}

    def add(self, rows: list[dict]) -> None:
        self._pending += rows
        if len(self._pending) >= self.checkpoint_lines or time.monotonic() - self._last >= self.checkpoint_s:
            self.checkpoint()

    def checkpoint(self) -> None:
        if self._pending:
            self._seq += 1
            storage.write_bytes(self.fs, f"{self.parts}/part-{self._run}-{self._seq:05d}.jsonl",
                                encode(self._pending))
            self._pending = []
        self._last = time.monotonic()

    def finish(self) -> int:
        """Write existing lines + parts + pending lines as one sorted object; drop the parts."""
        parts = self._part_paths()
        rows = self._rows() + self._pending
        merged = sorted_unique(rows)
        if parts or self._pending or merged != rows:
            storage.write_bytes(self.fs, self.path, encode(merged))
        self._pending = []
        for part in parts:  # only after the merged object is written: a crash here loses nothing
            self.fs.delete_file(part)
        if parts:
            try:
                self.fs.delete_dir(self.parts)
            except OSError:
                pass  # S3 "folders" vanish with their last object
        return len(merged)

    def close(self) -> None:
        self.checkpoint()


def open_results(location: str, endpoint: str | None = None, **options):
    """The results file for ``--out``: a local path or an ``s3://bucket/key``."""
    if storage.is_s3(location):
        filesystem, path = storage.locate(location, endpoint)
        bucket = path.split("/")[0]
        if "/" not in path:
            raise ValueError(f"--out {location!r} names a bucket, not an object: use s3://bucket/results.jsonl")
        if storage.kind(filesystem, bucket) != pafs.FileType.Directory:  # found now, not after the work
            raise ValueError(f"--out {location!r}: bucket {bucket!r} does not exist")
        return ObjectStoreResults(filesystem, path, **options)
    if not Path(location).parent.is_dir():
        raise ValueError(f"--out {location!r}: folder {str(Path(location).parent)!r} does not exist")
    return LocalResults(location)
