"""Local-or-S3 file access through fsspec, with atomic publication.

Every path in data_pipeline is a string that is either a local path or a URL such as
``s3://bucket/prefix``; s3fs picks up AWS_ENDPOINT_URL / AWS_* credentials from the environment.

Atomicity: nothing is ever visible half-written.
  * local: write ``{path}.tmp`` in the same folder, then ``os.replace`` (atomic on POSIX);
  * S3: the object is uploaded whole (one PUT, or a multipart upload that becomes visible only when
    completed), so readers see either no object or the complete one.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from typing import Iterator

import fsspec
from fsspec.implementations.local import LocalFileSystem

TMP_SUFFIX = ".tmp"


def fs_and_path(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path inside it) for a local path or URL; local paths become absolute."""
    fs, path = fsspec.core.url_to_fs(url)
    if isinstance(fs, LocalFileSystem):
        path = os.path.abspath(path)
    return fs, path


def is_local(url: str) -> bool:
    return isinstance(fs_and_path(url)[0], LocalFileSystem)


def normalise_root(url: str) -> str:
    """A root without trailing slash; local roots made absolute (so child processes agree on it)."""
    if "://" in url and not url.startswith("file://"):
        return url.rstrip("/")
    return os.path.abspath(url.removeprefix("file://"))


def join(root: str, *parts: str) -> str:
    """Join path parts onto a local path or URL with '/'."""
    out = root.rstrip("/")
    for p in parts:
        out = out + "/" + p.strip("/")
    return out


def exists(url: str) -> bool:
    fs, path = fs_and_path(url)
    return bool(fs.exists(path))


def read_bytes(url: str) -> bytes:
    fs, path = fs_and_path(url)
    with fs.open(path, "rb") as f:
        return f.read()


def write_bytes_atomic(url: str, data: bytes) -> None:
    """Write `data` so that `url` holds either its old content or all of `data`, never a prefix."""
    fs, path = fs_and_path(url)
    if isinstance(fs, LocalFileSystem):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}{TMP_SUFFIX}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    else:
        fs.pipe_file(path, data)  # one object upload: invisible until complete


def staging_path(url: str, scratch_dir: str) -> str:
    """Where to build the file that will become `url`: next to it locally, in `scratch_dir` for S3."""
    fs, path = fs_and_path(url)
    if isinstance(fs, LocalFileSystem):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        return f"{path}{TMP_SUFFIX}"
    return os.path.join(scratch_dir, f"{uuid.uuid4().hex}-{os.path.basename(path)}")


def publish(staged: str, url: str) -> None:
    """Make the finished local file `staged` appear at `url` atomically, then drop the staged copy."""
    fs, path = fs_and_path(url)
    if isinstance(fs, LocalFileSystem):
        os.replace(staged, path)
    else:
        fs.put_file(staged, path)
        os.remove(staged)


def list_files(url: str, pattern: str) -> list[str]:
    """Sorted paths (as fs paths, no protocol) under `url` matching the glob `pattern` ('' if missing)."""
    fs, path = fs_and_path(url)
    fs.invalidate_cache()
    if not fs.exists(path):
        return []
    return sorted(fs.glob(path.rstrip("/") + "/" + pattern))


@contextlib.contextmanager
def local_copy(url: str) -> Iterator[str]:
    """A local path with the content of `url` (the file itself if local; a temp download for S3)."""
    fs, path = fs_and_path(url)
    if isinstance(fs, LocalFileSystem):
        yield path
        return
    tmpdir = tempfile.mkdtemp(prefix="pixeldit-data-")
    try:
        local = os.path.join(tmpdir, os.path.basename(path))
        fs.get_file(path, local)
        yield local
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
