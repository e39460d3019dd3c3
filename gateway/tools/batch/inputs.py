"""What a batch job reads: a folder, a list file or (on Ray) an ``s3://`` prefix, as (key, path) pairs.

- A folder: its files, not sub-folders, in sorted name order; dot-files skipped.
- A list file: one path per line (blank lines and # comments skipped); relative paths resolve
  against the list file's folder.
- ``--shard i/n``: only every n-th input starting at i, so n machines split one dataset.
Keys are paths relative to the folder (or the list file's folder): what the results file's
``"file"`` says, and what a re-run matches to skip done work.
"""
from __future__ import annotations

import os
import posixpath
from pathlib import Path


def list_inputs(source: Path, exclude: tuple[Path, ...] = ()) -> list[Path]:
    """The images of a local folder or list file. ``exclude`` names the run's own files (its
    output), which are never inputs even when they sit in the input folder."""
    if source.is_dir():
        skip = {p.resolve() for p in exclude}
        return sorted((p for p in source.iterdir()
                       if p.is_file() and not p.name.startswith(".") and p.resolve() not in skip),
                      key=lambda p: p.name)
    paths = [Path(entry) for entry in list_file_entries(source.read_text())]
    return [p if p.is_absolute() else source.parent / p for p in paths]


def list_file_entries(text: str) -> list[str]:
    """A list file's paths: one a line, blank lines and # comments skipped."""
    lines = (line.strip() for line in text.splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def parse_shard(text: str) -> tuple[int, int]:
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard must look like i/n (e.g. 0/4), got {text!r}") from None
    if n < 1 or not 0 <= i < n:
        raise ValueError(f"--shard {text}: need 0 <= i < n")
    return i, n


def shard(items: list, i: int, n: int) -> list:
    return items[i::n]


def file_key(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


def local_inputs(source: Path, out: str | None = None) -> list[tuple[str, str]]:
    """(key, path) of a local folder's or list file's images, in input order."""
    if not source.exists():
        raise ValueError(f"{source} does not exist")
    root = source if source.is_dir() else source.parent
    files = list_inputs(source, exclude=(Path(out),) if out else ())
    return [(file_key(p, root), os.path.abspath(p)) for p in files]


def find_inputs(source: str, out: str, endpoint: str | None = None):
    """(filesystem, [(key, path)]) in input order, local or on S3 (pyarrow filesystems, for Ray)."""
    from pyarrow import fs as pafs

    from gateway.tools.batch import storage

    if not storage.is_s3(source):
        return pafs.LocalFileSystem(), local_inputs(Path(source), None if storage.is_s3(out) else out)
    filesystem, path = storage.locate(source, endpoint)
    kind = storage.kind(filesystem, path)
    if kind == pafs.FileType.Directory:
        skip = (storage.locate(out, endpoint)[1],) if storage.is_s3(out) else ()
        return filesystem, [(p[len(path) + 1:], p) for p in storage.list_folder(filesystem, path, skip)]
    if kind == pafs.FileType.File:  # a list file: entries relative to its folder, or s3:// URIs
        base = posixpath.dirname(path)
        entries = list_file_entries(storage.read_bytes(filesystem, path).decode())
        return filesystem, [(e, e[len(storage.S3):] if storage.is_s3(e) else posixpath.normpath(f"{base}/{e}"))
                            for e in entries]
    raise ValueError(f"{source} does not exist (no object, and no objects under {source}/)")
