"""Local-or-S3 file access through fsspec and the one atomic writer of the project.

Every path is a string that is either a local path or a URL such as ``s3://bucket/prefix``; s3fs picks up
AWS_ENDPOINT_URL / AWS_* credentials (or an AWS profile) from the environment. ``storage_options`` (fsspec
keyword arguments, e.g. ``endpoint_url``) may be passed where a caller has them; credentials do not belong
there when the options are saved anywhere (``credential_keys`` finds them, ``redact_options`` hides them).

Atomicity: nothing is ever visible half-written.
  * local file: written to a temp name in the same folder (``tmp_path``: ``.{name}.tmp-{pid}-{random}``),
    flushed and fsynced, then ``os.replace``d over the final name (atomic on POSIX), then the folder is
    fsynced where the filesystem allows it;
  * local folder (checkpoints, releases): built under ``tmp_path(folder)`` and renamed with ``replace_dir``;
  * S3: the object is uploaded whole (one PUT, or a multipart upload that becomes visible only when
    completed), so readers see either no object or the complete one.
A temp name is recognisable (``is_tmp``) so that cleanup code can remove leftovers of a crash.

S3 requests have timeouts and bounded retries (``pixeldit.s3``: ``S3Settings``, ``configure_s3``); every
``s3://`` URL opened here goes through ``pixeldit.s3.s3_filesystem``.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import uuid
from typing import Any, Iterator

import fsspec
from fsspec.implementations.local import LocalFileSystem

from pixeldit.errors import DataError, StorageError
from pixeldit.s3 import cut_off_error, retry_reason, s3_filesystem

TMP_MARK = ".tmp-"


def fs_and_path(url: str, storage_options: dict[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path inside it) of a local path or URL; local paths become absolute, no trailing '/'.

    ``s3://`` URLs get the retrying S3 filesystem with the timeouts of ``pixeldit.s3.s3_settings()``."""
    url = str(url)
    if url.startswith(("s3://", "s3a://")):
        return s3_filesystem(url, storage_options)
    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    if isinstance(fs, LocalFileSystem):
        path = os.path.abspath(path)
    return fs, path.rstrip("/") or "/"


def is_local(url: str) -> bool:
    return "://" not in str(url) or str(url).startswith("file://")


def normalise_root(url: str) -> str:
    """A root without trailing slash; local roots made absolute (so child processes agree on it)."""
    url = str(url)
    if not is_local(url):
        return url.rstrip("/")
    return os.path.abspath(url.removeprefix("file://"))


def join(root: str, *parts: str) -> str:
    """Join path parts onto a local path or URL with '/'."""
    out = str(root).rstrip("/")
    for p in parts:
        out = out + "/" + p.strip("/")
    return out


def exists(url: str, storage_options: dict[str, Any] | None = None) -> bool:
    fs, path = fs_and_path(url, storage_options)
    return bool(fs.exists(path))


def read_bytes(url: str, storage_options: dict[str, Any] | None = None) -> bytes:
    fs, path = fs_and_path(url, storage_options)
    with fs.open(path, "rb") as f:
        return f.read()


def tmp_path(path: str | os.PathLike) -> str:
    """The temp name a local file or folder is built under before it is renamed to ``path``."""
    path = os.fspath(path)
    head, name = os.path.split(path.rstrip("/"))
    return os.path.join(head, f".{name}{TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}")


def is_tmp(name: str | os.PathLike) -> bool:
    """True for a name made by ``tmp_path`` (a leftover of an interrupted write when found later)."""
    base = os.path.basename(os.fspath(name).rstrip("/"))
    return base.startswith(".") and TMP_MARK in base


def tmp_target(name: str | os.PathLike) -> str:
    """The path a ``tmp_path`` name was to be renamed to (same folder), for cleanup code that only removes
    leftovers of its own files."""
    if not is_tmp(name):
        raise ValueError(f"{os.fspath(name)!r} is not a temp name made by pixeldit.storage.tmp_path")
    head, base = os.path.split(os.fspath(name).rstrip("/"))
    return os.path.join(head, base[1:].rpartition(TMP_MARK)[0])


def _fsync_dir(folder: str) -> None:
    with contextlib.suppress(OSError):  # some filesystems (and all of Windows) cannot fsync a folder
        fd = os.open(folder or ".", os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_local_file(path: str | os.PathLike, durable: bool = True) -> Iterator[str]:
    """Yield a temp path to write; on success it is fsynced and renamed to ``path``, on error removed.
    ``durable=False`` skips the fsyncs: readers still never see a partial file, but a machine crash may lose the
    write (for a file rewritten every second or so, like the trainer's heartbeat).

    For writers that need a file name (``torch.save``, ``PIL.Image.save``, ``tarfile``)::

        with atomic_local_file(out) as tmp:
            torch.save(state, tmp)
    """
    path = os.path.abspath(os.fspath(path))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = tmp_path(path)
    try:
        yield tmp
        if durable:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
    if durable:
        _fsync_dir(os.path.dirname(path))


def write_bytes_atomic(url: str | os.PathLike, data: bytes, storage_options: dict[str, Any] | None = None,
                       durable: bool = True) -> None:
    """Write ``data`` so that ``url`` holds either its old content or all of ``data``, never a prefix
    (``durable``: see ``atomic_local_file``)."""
    fs, path = fs_and_path(os.fspath(url), storage_options)
    if isinstance(fs, LocalFileSystem):
        with atomic_local_file(path, durable) as tmp:
            with open(tmp, "wb") as f:
                f.write(data)
    else:
        fs.pipe_file(path, data)  # one object upload: invisible until complete


def write_text_atomic(url: str | os.PathLike, text: str, storage_options: dict[str, Any] | None = None,
                      durable: bool = True) -> None:
    write_bytes_atomic(url, text.encode(), storage_options, durable)


def write_json_atomic(url: str | os.PathLike, obj: Any, storage_options: dict[str, Any] | None = None) -> None:
    """JSON with sorted keys and 2-space indent; non-finite floats are refused (they are not JSON)."""
    write_text_atomic(url, json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n", storage_options)


def replace_dir(tmp_dir: str | os.PathLike, final_dir: str | os.PathLike) -> None:
    """Move a finished local folder (built under ``tmp_path(final_dir)``) to ``final_dir``.

    An existing ``final_dir`` is moved aside first and deleted only once the new folder is in place, so at
    every instant either the old or the new folder is complete under the final name or beside it.
    """
    tmp_dir, final_dir = os.fspath(tmp_dir), os.fspath(final_dir)
    old = None
    if os.path.exists(final_dir):
        old = tmp_path(final_dir)
        os.replace(final_dir, old)
    os.replace(tmp_dir, final_dir)
    _fsync_dir(os.path.dirname(os.path.abspath(final_dir)))
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def staging_path(url: str, scratch_dir: str) -> str:
    """Where to build the file that will become ``url``: next to it locally, in ``scratch_dir`` for S3."""
    fs, path = fs_and_path(url)
    if isinstance(fs, LocalFileSystem):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        return tmp_path(path)
    return os.path.join(scratch_dir, f"{uuid.uuid4().hex}-{os.path.basename(path)}")


def publish(staged: str, url: str) -> None:
    """Make the finished local file ``staged`` appear at ``url`` atomically, then drop the staged copy."""
    fs, path = fs_and_path(url)
    if isinstance(fs, LocalFileSystem):
        with open(staged, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(staged, path)
        _fsync_dir(os.path.dirname(path))
    else:
        fs.put_file(staged, path)
        os.remove(staged)


def list_files(url: str, pattern: str, storage_options: dict[str, Any] | None = None) -> list[str]:
    """Sorted paths (as fs paths, no protocol) under ``url`` matching the glob ``pattern`` ([] if missing)."""
    fs, path = fs_and_path(url, storage_options)
    fs.invalidate_cache()
    if not fs.exists(path):
        return []
    return sorted(fs.glob(path.rstrip("/") + "/" + pattern))


@contextlib.contextmanager
def local_copy(url: str, storage_options: dict[str, Any] | None = None) -> Iterator[str]:
    """A local path with the content of ``url`` (the file itself if local; a temp download for S3)."""
    fs, path = fs_and_path(url, storage_options)
    if isinstance(fs, LocalFileSystem):
        yield path
        return
    tmpdir = tempfile.mkdtemp(prefix="pixeldit-")
    try:
        local = os.path.join(tmpdir, os.path.basename(path))
        fs.get_file(path, local)
        yield local
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def file_sizes(url: str, storage_options: dict[str, Any] | None = None) -> dict[str, int]:
    """{path relative to ``url``: size in bytes} of every file below ``url`` ({} if it does not exist).

    One recursive listing (S3: one LIST request per 1000 objects)."""
    fs, path = fs_and_path(url, storage_options)
    fs.invalidate_cache()
    if not fs.exists(path):
        return {}
    base = path.rstrip("/") + "/"
    found = fs.find(path, detail=True)
    return {p[len(base):]: int(info["size"]) for p, info in found.items()
            if p.startswith(base) and info.get("type", "file") == "file"}


FETCH_CHUNK_BYTES = 32 << 20  # one ranged GET per chunk: a 1 GB shard is 32 requests, each retried on its own


def fetch_to_file(url: str, dest: str, size: int | None = None, storage_options: dict[str, Any] | None = None,
                  chunk_bytes: int = FETCH_CHUNK_BYTES) -> int:
    """Copy the object at ``url`` into the local file ``dest`` (created or truncated); returns the bytes written.

    Remote objects are read in ranged GETs of ``chunk_bytes``, each retried on its own (a transfer cut off
    mid-way repeats one chunk, not the object). ``size`` (e.g. from a manifest) saves the HEAD request and is
    checked: a shorter object raises ``DataError`` naming it (a longer one is caught by the manifest check
    before training, ``data_pipeline.dataset_format.check_shards``)."""
    fs, path = fs_and_path(url, storage_options)
    if size is None:
        size = int(fs.size(path))
    written = 0
    with open(dest, "wb") as out:
        while written < size:
            end = min(size, written + chunk_bytes)
            data = _read_range(fs, path, url, written, end)
            out.write(data)
            written += len(data)
            if len(data) < end - (written - len(data)):
                break  # the object ends early
    if written != size:
        raise DataError(f"{url}: {written} bytes where {size} were expected; the stored file is truncated or "
                         f"does not match the dataset index (manifest)")
    return written


def read_range(url: str, start: int, end: int, storage_options: dict[str, Any] | None = None) -> bytes:
    """Bytes [start, end) of ``url`` (one ranged GET for S3, retried)."""
    fs, path = fs_and_path(url, storage_options)
    return _read_range(fs, path, url, start, end)


def _read_range(fs: fsspec.AbstractFileSystem, path: str, url: str, start: int, end: int) -> bytes:
    try:
        return fs.cat_file(path, start=start, end=end)
    except (StorageError, FileNotFoundError, PermissionError):
        raise
    except Exception as err:  # a body cut off after s3fs's retries: name the object and the setting
        reason = retry_reason(err)
        if reason is None or isinstance(fs, LocalFileSystem):
            raise
        raise cut_off_error(url, fs, start, end, reason, err) from err


# ---- credentials: never saved ---------------------------------------------------------------------------------

# fsspec / s3fs / gcsfs / adlfs keyword arguments that carry a secret
CREDENTIAL_OPTION_KEYS = frozenset({
    "key", "secret", "token", "password", "aws_access_key_id", "aws_secret_access_key", "aws_session_token",
    "session_token", "secret_key", "access_key", "account_key", "sas_token", "client_secret", "credentials",
    "connection_string",
})
REDACTED = "<redacted>"


def credential_keys(options: Any, prefix: str = "") -> list[str]:
    """Dotted keys of ``options`` (nested dicts too, e.g. client_kwargs) that hold credentials."""
    found = []
    if isinstance(options, dict):
        for k, v in options.items():
            name = f"{prefix}{k}"
            if str(k).lower() in CREDENTIAL_OPTION_KEYS and v not in (None, "", REDACTED):
                found.append(name)
            else:
                found.extend(credential_keys(v, name + "."))
    return found


def redact_options(options: Any) -> Any:
    """A copy of ``options`` with every credential value replaced by ``REDACTED`` (for files, logs, wandb)."""
    if not isinstance(options, dict):
        return options
    return {k: (REDACTED if str(k).lower() in CREDENTIAL_OPTION_KEYS and v not in (None, "") else redact_options(v))
            for k, v in options.items()}


def credential_env_names(env: dict[str, str]) -> list[str]:
    """Names in an environment mapping that look like credentials (AWS keys, *SECRET*, *TOKEN*, *PASSWORD*)."""
    markers = ("SECRET", "TOKEN", "PASSWORD", "CREDENTIAL")
    return sorted(k for k in env if k.upper() == "AWS_ACCESS_KEY_ID" or any(m in k.upper() for m in markers))
