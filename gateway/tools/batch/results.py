"""The results file of both batch engines: JSON Lines that arrive in any order, on local disk or on S3.

Resumable either way: ``done()`` gives the keys (``"file"``) already answered (error lines count
only when the run is told to keep them), and ``finish()`` leaves one file sorted by key with each
key once (gateway.tools.batch.lines.merged), whatever order the lines came in.

- Local path: lines are appended as they arrive (a crash loses at most a torn last line,
  which ``done()`` cuts), then ``finish()`` rewrites the file sorted (a temporary file renamed
  over it). Either engine can resume the other's file.
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

from gateway.tools.batch import storage
from gateway.tools.batch.lines import done_keys, encode, merged, parse_lines, read_local


class LocalResults:
    def __init__(self, path: str | Path, keep_errors: bool = False):
        self.path = Path(path)
        self.keep_errors = keep_errors
        self._sink: TextIO | None = None

    def done(self) -> set[str]:
        return done_keys(read_local(self.path), self.keep_errors)

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
        rows = parse_lines(self.path.read_bytes())
        final = merged(rows)
        if final != rows:
            tmp = self.path.with_name(f".{self.path.name}.{uuid.uuid4().hex[:8]}.tmp")
            tmp.write_bytes(encode(final))
            os.replace(tmp, self.path)
        return len(final)

    def close(self) -> None:
        if self._sink is not None:
            self._sink.close()
            self._sink = None


class ObjectStoreResults:
    """Results on an object store (``s3://bucket/key.jsonl``); see the module docstring."""

    def __init__(self, filesystem: pafs.FileSystem, path: str, checkpoint_lines: int = 1000,
                 checkpoint_s: float = 60.0, keep_errors: bool = False):
        self.fs, self.path = filesystem, path
        self.keep_errors = keep_errors
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
        return done_keys(self._rows(), self.keep_errors)

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
        final = merged(rows)
        if parts or self._pending or final != rows:
            storage.write_bytes(self.fs, self.path, encode(final))
        self._pending = []
        for part in parts:  # only after the merged object is written: a crash here loses nothing
            self.fs.delete_file(part)
        if parts:
            try:
                self.fs.delete_dir(self.parts)
            except OSError:
                pass  # S3 "folders" vanish with their last object
        return len(final)

    def close(self) -> None:
        self.checkpoint()


def open_results(location: str, endpoint: str | None = None, keep_errors: bool = False, **options):
    """The results file for ``--out``: a local path or an ``s3://bucket/key``, checked before any work."""
    if storage.is_s3(location):
        filesystem, path = storage.locate(location, endpoint)
        bucket = path.split("/")[0]
        if "/" not in path:
            raise ValueError(f"--out {location!r} names a bucket, not an object: use s3://bucket/results.jsonl")
        if storage.kind(filesystem, bucket) != pafs.FileType.Directory:  # found now, not after the work
            raise ValueError(f"--out {location!r}: bucket {bucket!r} does not exist")
        return ObjectStoreResults(filesystem, path, keep_errors=keep_errors, **options)
    local = Path(location)
    if local.is_dir():
        raise ValueError(f"--out {location!r} is a folder: name a file in it, e.g. {str(local / 'results.jsonl')!r}")
    if not local.parent.is_dir():
        raise ValueError(f"--out {location!r}: folder {str(local.parent)!r} does not exist")
    return LocalResults(location, keep_errors=keep_errors)
