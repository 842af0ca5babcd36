"""S3 timeouts and retries of the project, and the one-line errors when they run out.

Settings (``S3Settings``; defaults < ``PIXELDIT_S3_*`` environment variables < the run config's
``data.s3``, applied with ``configure_s3``):
  * every request has a connect timeout and a read timeout (per socket read);
  * every S3 filesystem made by ``s3_filesystem`` (``pixeldit.storage.fs_and_path``) sends each request once per attempt (botocore's own retries
    are off) and retries throttling (503 SlowDown, 429), 5xx answers, timeouts and connection errors up to
    ``max_attempts`` attempts with exponential backoff and full jitter; a body cut off mid-transfer is
    retried by s3fs up to the same number of attempts; 4xx answers (missing object, denied) fail at once;
  * after the last attempt a ``pixeldit.errors.StorageError`` says in one line what failed, at which
    endpoint, and which setting to change; a silent endpoint fails within ``S3Settings.worst_case_s()``
    (max_attempts x (connect + read timeout) + the backoff caps: 127 s with the defaults);
  * other s3fs users in the process (img2dataset, webdataset) and in child processes get the same timeouts
    and botocore's standard retry mode with the same number of attempts (fsspec configuration + ``FSSPEC_S3``).

``pixeldit.storage`` opens every ``s3://`` URL through ``s3_filesystem``; nothing else here touches files.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import random
import socket
import time
from dataclasses import dataclass
from typing import Any, Iterator

import fsspec

from pixeldit.errors import ConfigError, StorageError


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


def s3_kwargs(storage_options: dict[str, Any] | None) -> dict[str, Any]:
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


def one_line(err: BaseException) -> str:
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
    last = f"; last: {one_line(err)}" if reason in ("server error", "connection error") else ""
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



def s3_filesystem(url: str, storage_options: dict[str, Any] | None = None) -> tuple[Any, str]:
    """(retrying S3 filesystem with the timeouts of ``s3_settings()``, path inside it) of an ``s3://`` URL."""
    cls = _retrying_s3_class()
    fs = cls(**s3_kwargs(storage_options))
    fs.retries = s3_settings().max_attempts  # s3fs's own attempts: only for bodies cut off mid-transfer
    return fs, cls._strip_protocol(url).rstrip("/") or "/"


def cut_off_error(url: str, fs: Any, start: int, end: int, reason: str, err: BaseException) -> StorageError:
    """The one-line error for a ranged read whose body was cut off after s3fs's own retries."""
    return StorageError(f"{url}: S3 endpoint {s3_endpoint(fs)}: bytes {start}..{end} cut off mid-transfer "
                        f"{s3_settings().max_attempts} times ({reason}: {one_line(err)}); check the network or raise "
                        f"{S3_ENV['max_attempts']} (run config: data.s3.max_attempts)")


def __getattr__(name: str) -> Any:
    if name == "RetryingS3FileSystem":
        return _retrying_s3_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
