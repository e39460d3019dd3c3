"""Local paths and ``s3://`` URIs behind one interface: pyarrow filesystems.

``locate("s3://bucket/photos")`` gives ``(filesystem, "bucket/photos")``; a plain path gives
the local filesystem and an absolute path.  S3-compatible stores (MinIO, Ceph, a local
emulator) are reached through an endpoint: ``--s3-endpoint``, else ``AWS_ENDPOINT_URL_S3`` or
``AWS_ENDPOINT_URL``.  Credentials come from the AWS SDK's usual sources (``AWS_ACCESS_KEY_ID``
/ ``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN``, ``~/.aws``, instance roles).

The filesystem objects pickle, so Ray tasks on any node read with the driver's settings.
"""
from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlparse

from pyarrow import fs as pafs

S3 = "s3://"


def is_s3(location: str) -> bool:
    return str(location).startswith(S3)


def s3_endpoint(explicit: str | None = None) -> str | None:
    return explicit or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def s3_filesystem(endpoint: str | None = None) -> pafs.S3FileSystem:
    """An S3 filesystem for AWS or, given an endpoint URL, for any S3-compatible store."""
    endpoint = s3_endpoint(endpoint)
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    if endpoint is None:
        return pafs.S3FileSystem(region=region)
    url = urlparse(endpoint)
    if url.scheme not in ("http", "https") or not url.netloc:
        raise ValueError(f"S3 endpoint must look like http(s)://host:port, got {endpoint!r}")
    return pafs.S3FileSystem(endpoint_override=url.netloc, scheme=url.scheme, region=region)


def locate(location: str | Path, endpoint: str | None = None) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path within it) for a local path or an ``s3://bucket/key`` URI."""
    location = str(location)
    if is_s3(location):
        path = location[len(S3):].strip("/")
        if not path:
            raise ValueError(f"{location!r} names no bucket: use s3://bucket/prefix")
        return s3_filesystem(endpoint), path
    return pafs.LocalFileSystem(), str(Path(location).resolve())


def kind(filesystem: pafs.FileSystem, path: str) -> pafs.FileType:
    return filesystem.get_file_info(path).type


def list_folder(filesystem: pafs.FileSystem, folder: str, exclude: tuple[str, ...] = ()) -> list[str]:
    """A folder's (or prefix's) files, not sub-folders, in name order; dot-files skipped,
    as `gateway batch` lists a local folder."""
    infos = filesystem.get_file_info(pafs.FileSelector(folder, recursive=False))
    return sorted((i.path for i in infos if i.type == pafs.FileType.File
                   and not i.base_name.startswith(".") and i.path not in exclude),
                  key=lambda p: p.rsplit("/", 1)[-1])


def read_bytes(filesystem: pafs.FileSystem, path: str) -> bytes:
    with filesystem.open_input_stream(path) as f:
        return f.read()


def write_bytes(filesystem: pafs.FileSystem, path: str, data: bytes) -> None:
    """One whole object (S3 objects cannot be appended to; a PUT replaces atomically)."""
    with filesystem.open_output_stream(path) as f:
        f.write(data)
