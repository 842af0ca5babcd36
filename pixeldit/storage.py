"""Local-or-S3 file access through fsspec, the one atomic writer, and the S3 timeouts and retries of the project.

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

S3 timeouts and retries (``S3Settings``; defaults < ``PIXELDIT_S3_*`` environment variables < the run config's
``data.s3``, applied with ``configure_s3``):
  * every request has a connect timeout and a read timeout (per socket read);
  * every S3 filesystem made by ``fs_and_path`` sends each request once per attempt (botocore's own retries
    are off) and retries throttling (503 SlowDown, 429), 5xx answers, timeouts and connection errors up to
    ``max_attempts`` attempts with exponential backoff and full jitter; a body cut off mid-transfer is
    retried by s3fs up to the same number of attempts; 4xx answers (missing object, denied) fail at once;
  * after the last attempt a ``pixeldit.errors.StorageError`` says in one line what failed, at which
    endpoint, and which setting to change; a silent endpoint fails within ``S3Settings.worst_case_s()``
    (max_attempts x (connect + read timeout) + the backoff caps: 127 s with the defaults);
  * other s3fs users in the process (img2dataset, webdataset) and in child processes get the same timeouts
    and botocore's standard retry mode with the same number of attempts (fsspec configuration + ``FSSPEC_S3``).
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import random
import shutil
import socket
import tempfile
import time
import uuid
from dataclasses import dataclass
from typing import Any, Iterator

import fsspec
from fsspec.implementations.local import LocalFileSystem

from pixeldit.errors import ConfigError, DataError, StorageError

TMP_MARK = ".tmp-"


def fs_and_path(url: str, storage_options: dict[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path inside it) of a local path or URL; local paths become absolute, no trailing '/'.

    ``s3://`` URLs get the retrying S3 filesystem with the timeouts of ``s3_settings()``."""
    url = str(url)
    if url.startswith(("s3://", "s3a://")):
        cls = _retrying_s3_class()
        fs = cls(**_s3_kwargs(storage_options))
        fs.retries = s3_settings().max_attempts  # s3fs's own attempts: only for bodies cut off mid-transfer
        return fs, cls._strip_protocol(url).rstrip("/") or "/"
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
        settings = s3_settings()
        raise StorageError(f"{url}: S3 endpoint {s3_endpoint(fs)}: bytes {start}..{end} cut off mid-transfer "
                           f"{settings.max_attempts} times ({reason}: {_one_line(err)}); check the network or raise "
                           f"{S3_ENV['max_attempts']} (run config: data.s3.max_attempts)") from err


# ---- S3: timeouts, retries, one-line errors -------------------------------------------------------------------


@dataclass(frozen=True)
class S3Settings:
    """Timeouts and retries of every S3 request (see the module docstring). Retry i (1-based) waits a uniform
    random time in [0, min(backoff_max_s, backoff_s * 2**(i-1))] ("full jitter")."""

    connect_timeout_s: float = 10.0
    read_timeout_s: float = 20.0  # per socket read: a large GET may take longer as long as bytes keep coming
    max_attempts: int = 4
    backoff_s: float = 1.0
    backoff_max_s: float = 16.0

    def __post_init__(self) -> None:
        if not isinstance(self.max_attempts, int) or isinstance(self.max_attempts, bool) or self.max_attempts < 1:
            raise ConfigError(f"S3 setting max_attempts={self.max_attempts!r} must be an integer >= 1 "
                              f"({S3_ENV['max_attempts']} / data.s3.max_attempts)")
        for name in ("connect_timeout_s", "read_timeout_s", "backoff_s", "backoff_max_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or (
                    name.endswith("timeout_s") and value == 0):
                kind = "positive" if "timeout" in name else "non-negative"
                raise ConfigError(f"S3 setting {name}={value!r} must be a {kind} number of seconds "
                                  f"({S3_ENV[name]} / data.s3.{name})")

    def backoff_cap(self, retry: int) -> float:
        return min(self.backoff_max_s, self.backoff_s * 2 ** (retry - 1))

    def worst_case_s(self) -> float:
        """Longest time one request can take to fail against an endpoint that never answers."""
        return (self.max_attempts * (self.connect_timeout_s + self.read_timeout_s)
                + sum(self.backoff_cap(i) for i in range(1, self.max_attempts)))


S3_SETTING_NAMES = tuple(f.name for f in dataclasses.fields(S3Settings))
S3_ENV = {name: f"PIXELDIT_S3_{name.upper()}" for name in S3_SETTING_NAMES}
_configured: S3Settings | None = None
_fsspec_defaults_for: S3Settings | None = None


def _coerce(name: str, value: Any, where: str) -> Any:
    kind = int if name == "max_attempts" else float
    try:
        if isinstance(value, bool):
            raise ValueError
        return kind(value) if not isinstance(value, (int, float)) or kind is float else value
    except (TypeError, ValueError):
        raise ConfigError(f"{where}={value!r}: expected {'an integer' if kind is int else 'a number'}") from None


def settings_from_env(base: S3Settings | None = None) -> S3Settings:
    """``base`` (default: the defaults) with the ``PIXELDIT_S3_*`` variables that are set applied."""
    values = {name: _coerce(name, os.environ[env], env) for name, env in S3_ENV.items() if os.environ.get(env)}
    return dataclasses.replace(base or S3Settings(), **values)


def s3_settings() -> S3Settings:
    """The settings of this process: those given to ``configure_s3``, else defaults < environment."""
    return _configured if _configured is not None else settings_from_env()


def resolve_s3_settings(overrides: dict[str, Any] | None = None) -> S3Settings:
    """defaults < ``PIXELDIT_S3_*`` < ``overrides`` (the run config's ``data.s3``), validated."""
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(S3_SETTING_NAMES))
    if unknown:
        raise ConfigError(f"unknown S3 settings {unknown} (data.s3); valid: {', '.join(S3_SETTING_NAMES)}")
    values = {k: _coerce(k, v, f"data.s3.{k}") for k, v in overrides.items()}
    return dataclasses.replace(settings_from_env(), **values)


def configure_s3(overrides: dict[str, Any] | None = None) -> S3Settings:
    """Set this process's S3 settings (``resolve_s3_settings``). They are exported to the environment, so
    child processes (DataLoader workers, img2dataset) use the same ones."""
    global _configured
    _configured = resolve_s3_settings(overrides)
    os.environ.update({S3_ENV[name]: str(getattr(_configured, name)) for name in S3_SETTING_NAMES})
    _apply_fsspec_defaults(_configured)
    return _configured


def _botocore_config(settings: S3Settings, attempts: int) -> dict[str, Any]:
    return {"connect_timeout": settings.connect_timeout_s, "read_timeout": settings.read_timeout_s,
            "retries": {"mode": "standard", "total_max_attempts": attempts}}


def _apply_fsspec_defaults(settings: S3Settings) -> None:
    """Timeouts and retries for s3fs instances that other libraries create (here and in child processes)."""
    global _fsspec_defaults_for
    if _fsspec_defaults_for == settings:
        return
    defaults = {"config_kwargs": _botocore_config(settings, settings.max_attempts)}
    fsspec.config.conf["s3"] = {**fsspec.config.conf.get("s3", {}), **defaults}
    try:
        inherited = json.loads(os.environ.get("FSSPEC_S3") or "{}")
    except ValueError:
        inherited = {}
    os.environ["FSSPEC_S3"] = json.dumps({**inherited, **defaults})
    _fsspec_defaults_for = settings


def _s3_kwargs(storage_options: dict[str, Any] | None) -> dict[str, Any]:
    settings = s3_settings()
    _apply_fsspec_defaults(settings)
    options = dict(storage_options or {})
    env_endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if env_endpoint and not options.get("endpoint_url") and not options.get("client_kwargs", {}).get("endpoint_url"):
        options["endpoint_url"] = env_endpoint  # explicit: part of the instance-cache key, named in errors
    config_kwargs = {**options.pop("config_kwargs", {}), **_botocore_config(settings, 1)}  # we retry, not botocore
    return {**options, "config_kwargs": config_kwargs}


_THROTTLE_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "TooManyRequests",
                   "RequestThrottled", "ProvisionedThroughputExceededException"}


def _causes(err: BaseException) -> Iterator[BaseException]:
    """``err`` and what it wraps: __cause__ / __context__, botocore's ``error`` keyword, aiohttp's os_error."""
    todo, seen = [err], set()
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo.extend([e.__cause__, e.__context__, getattr(e, "kwargs", {}).get("error")
                     if isinstance(getattr(e, "kwargs", None), dict) else None, getattr(e, "os_error", None)])


def retry_reason(err: BaseException) -> str | None:
    """Why a failed S3 request is worth another attempt ("throttled", "server error", "no answer",
    "connection refused", "connection error"), or None when it is final (4xx, a bug)."""
    from botocore.exceptions import ClientError, ConnectionError as BotoConnectionError, ConnectTimeoutError
    from botocore.exceptions import EndpointConnectionError, HTTPClientError, IncompleteReadError, ReadTimeoutError

    found = None
    for e in _causes(err):
        if isinstance(e, StorageError):
            return None  # already retried below
        if isinstance(e, ClientError):
            code = str(e.response.get("Error", {}).get("Code", ""))
            status = int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
            if code in _THROTTLE_CODES or status in (429, 503) or "reduce your request rate" in str(e):
                return "throttled"
            if status >= 500 or code in ("InternalError", "ServiceUnavailable", "RequestTimeout"):
                return "server error"
            return None
        if isinstance(e, ConnectionRefusedError):
            return "connection refused"
        if isinstance(e, (ReadTimeoutError, ConnectTimeoutError, socket.timeout, asyncio.TimeoutError, TimeoutError)):
            found = found or "no answer"
        elif isinstance(e, (EndpointConnectionError, BotoConnectionError, HTTPClientError, IncompleteReadError,
                            ConnectionError)):
            found = found or "connection error"
        elif type(e).__module__.startswith("aiohttp") and isinstance(e, Exception):
            found = found or "connection error"
        elif type(e).__name__ in ("FSTimeoutError", "IncompleteRead", "ResponseParserError"):
            found = found or ("no answer" if "Timeout" in type(e).__name__ else "connection error")
    return found


def backoff_delay(settings: S3Settings, retry: int) -> float:
    """Seconds to wait before retry ``retry`` (1-based): full jitter under the exponential cap."""
    return random.uniform(0.0, settings.backoff_cap(retry))


def s3_endpoint(fs: Any) -> str:
    """The endpoint an S3 filesystem talks to, for messages."""
    url = (getattr(fs, "endpoint_url", None) or (getattr(fs, "client_kwargs", None) or {}).get("endpoint_url")
           or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL"))
    return url or "AWS S3 (default endpoint)"


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())[:300] or type(err).__name__


_ADVICE = {
    "connection refused": "check the endpoint (AWS_ENDPOINT_URL or storage_options.endpoint_url) and that the "
                          "service is up",
    "no answer": "the endpoint accepts connections but did not answer within the read timeout of {read:g} s "
                 "(connect timeout {connect:g} s); check the endpoint (AWS_ENDPOINT_URL or "
                 "storage_options.endpoint_url) or raise PIXELDIT_S3_READ_TIMEOUT_S "
                 "(run config: data.s3.read_timeout_s)",
    "throttled": "S3 kept throttling (SlowDown); raise PIXELDIT_S3_MAX_ATTEMPTS / PIXELDIT_S3_BACKOFF_MAX_S "
                 "(run config: data.s3.max_attempts, data.s3.backoff_max_s) or spread the data over more prefixes",
    "server error": "the endpoint kept answering with server errors; retry later or raise PIXELDIT_S3_MAX_ATTEMPTS "
                    "(run config: data.s3.max_attempts)",
    "connection error": "connections to the endpoint kept failing; check the endpoint (AWS_ENDPOINT_URL or "
                        "storage_options.endpoint_url) and the network, or raise PIXELDIT_S3_MAX_ATTEMPTS "
                        "(run config: data.s3.max_attempts)",
}


def storage_failure(what: str, endpoint: str, reason: str, attempts: int, seconds: float,
                    err: BaseException) -> StorageError:
    """The one-line error after the last attempt: object, endpoint, what happened, which setting to change."""
    settings = s3_settings()
    advice = _ADVICE[reason].format(read=settings.read_timeout_s, connect=settings.connect_timeout_s)
    last = f"; last: {_one_line(err)}" if reason in ("server error", "connection error") else ""
    return StorageError(f"{what}: S3 endpoint {endpoint}: {reason} ({attempts} attempts in {seconds:.1f} s"
                        f"{last}); {advice}")


_S3_CLASS: type | None = None


def _retrying_s3_class() -> type:
    """s3fs's filesystem with the retries of ``S3Settings`` around every request (made on first use: importing
    s3fs takes a second)."""
    global _S3_CLASS
    if _S3_CLASS is not None:
        return _S3_CLASS
    import s3fs
    from s3fs.errors import translate_boto_error

    class RetryingS3FileSystem(s3fs.S3FileSystem):
        """One request per attempt (botocore's retries off), ``max_attempts`` attempts, backoff with jitter."""

        async def _call_s3(self, method, *akwarglist, **kwargs):
            await self.set_session()
            s3 = await self.get_s3(kwargs.get("Bucket"))
            call = getattr(s3, method)
            request = self._get_s3_method_kwargs(call, *akwarglist, **kwargs)
            settings, start = s3_settings(), time.monotonic()
            for attempt in range(1, settings.max_attempts + 1):
                try:
                    return await call(**request)
                except Exception as err:
                    reason = retry_reason(err)
                    if reason is None:
                        translated = translate_boto_error(err)
                        if translated is err:
                            raise
                        raise translated from err
                    if attempt == settings.max_attempts:
                        what = f"s3://{kwargs.get('Bucket', '')}/{kwargs.get('Key', kwargs.get('Prefix', ''))}"
                        raise storage_failure(f"{what} ({method})", s3_endpoint(self), reason, attempt,
                                              time.monotonic() - start, err) from err
                    await asyncio.sleep(backoff_delay(settings, attempt))

    RetryingS3FileSystem.__module__ = __name__  # picklable by reference through the module __getattr__ below
    RetryingS3FileSystem.__qualname__ = RetryingS3FileSystem.__name__
    _S3_CLASS = RetryingS3FileSystem
    return _S3_CLASS


def __getattr__(name: str) -> Any:
    if name == "RetryingS3FileSystem":
        return _retrying_s3_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
