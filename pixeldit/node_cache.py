"""Node-local cache of remote files (dataset shards, caption-embedding files), shared by every process of a node.

Layout of the cache folder (it must be on a node-local disk: flock is unreliable on network filesystems)::

    {folder}/{digest}-{name}     a complete copy of one remote file; digest of (url, size, version)
    {folder}/.locks/{n:04d}      lock stripes: a stripe is flock'ed while one of its files is being fetched
    {folder}/.evict.lock         flock'ed by the one process that evicts at a time

Protocol (no coordinator; safe between the ranks and DataLoader workers of one node):
 * a file under its final name is always complete: it is downloaded to a temp name next to it
   (``pixeldit.storage.atomic_local_file``) and renamed into place;
 * ``open``: open the final name and touch its mtime (the LRU clock); if it is missing, take its stripe's
   exclusive flock, look again (another process may have fetched it meanwhile), fetch it if still missing,
   release. Each file is downloaded once per node however many processes ask for it at the same time;
 * after a fetch, when the folder holds more than ``max_bytes``, the least recently used files are deleted
   (never the one just fetched). A process that already opened a file keeps reading it (POSIX unlink); one
   that finds it gone fetches it again;
 * temp files of crashed fetches are removed by the eviction pass once they are an hour old.
Downloads go through ``pixeldit.storage.fetch_to_file``: ranged GETs of 32 MB, each with the S3 timeouts
and retries of ``pixeldit.s3.S3Settings``; the size from the dataset manifest is checked.
``ShardPrefetcher``: the thread of one training rank that keeps the cache ahead of its loader.
"""
from __future__ import annotations

import collections
import contextlib
import fcntl
import hashlib
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, BinaryIO, Iterator

from pixeldit.errors import StorageError
from pixeldit.storage import atomic_local_file, fetch_to_file, is_tmp

LOCK_STRIPES = 1024
LOCKS_DIR = ".locks"
EVICT_LOCK = ".evict.lock"
STALE_TMP_S = 3600.0


@dataclass(frozen=True)
class RemoteFile:
    """A remote file to cache: ``size`` (bytes, e.g. from the manifest) is checked when known; ``version``
    is anything that changes when the remote content may change (e.g. an encoder fingerprint)."""

    url: str
    size: int | None = None
    version: str = ""


class NodeCache:
    """The cache folder of this node (see the module docstring). ``lock_timeout_s`` bounds the wait for
    another process's fetch of the same stripe."""

    def __init__(self, folder: str, max_bytes: int, storage_options: dict[str, Any] | None = None,
                 lock_timeout_s: float = 600.0):
        if max_bytes <= 0:
            raise ValueError(f"node cache {folder}: max_bytes={max_bytes} must be positive")
        self.folder = os.path.abspath(folder)
        self.max_bytes, self.lock_timeout_s = int(max_bytes), float(lock_timeout_s)
        self.storage_options = dict(storage_options or {})
        os.makedirs(os.path.join(self.folder, LOCKS_DIR), exist_ok=True)
        self.fetched_files = self.fetched_bytes = self.hits = 0  # this process only

    def __getstate__(self) -> dict[str, Any]:  # DataLoader workers: counters start again in each process
        return {**self.__dict__, "fetched_files": 0, "fetched_bytes": 0, "hits": 0}

    def path(self, f: RemoteFile) -> str:
        digest = hashlib.sha256(f"{f.url}\0{f.size}\0{f.version}".encode()).hexdigest()[:24]
        return os.path.join(self.folder, f"{digest}-{os.path.basename(f.url.rstrip('/'))}")

    def open(self, f: RemoteFile) -> BinaryIO:
        """An open binary file with the content of ``f`` (fetched first if this node has no copy)."""
        for _ in range(3):  # evicted between fetch and open: fetch again
            path = self.fetch(f)
            with contextlib.suppress(FileNotFoundError):
                handle = open(path, "rb")
                with contextlib.suppress(OSError):
                    os.utime(path)
                return handle
        raise StorageError(f"node cache {self.folder}: {f.url} was evicted three times before it could be opened; "
                           f"raise data.cache_max_gb above the working set of the run")

    def fetch(self, f: RemoteFile) -> str:
        """Make sure this node holds ``f``; returns its path."""
        path = self.path(f)
        if os.path.exists(path):
            self.hits += 1
            return path
        with self._stripe_lock(path, f.url):
            if os.path.exists(path):
                self.hits += 1
                return path
            with atomic_local_file(path) as tmp:
                size = fetch_to_file(f.url, tmp, f.size, self.storage_options)
            self.fetched_files += 1
            self.fetched_bytes += size
        self.evict(keep=path)
        return path

    @contextlib.contextmanager
    def _stripe_lock(self, path: str, url: str) -> Iterator[None]:
        stripe = int(hashlib.sha256(path.encode()).hexdigest()[:8], 16) % LOCK_STRIPES
        lock_path = os.path.join(self.folder, LOCKS_DIR, f"{stripe:04d}")
        deadline = time.monotonic() + self.lock_timeout_s
        with open(lock_path, "a+b") as lock:
            while True:
                try:
                    fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise StorageError(
                            f"node cache {self.folder}: waited {self.lock_timeout_s:.0f} s for another process of "
                            f"this node to fetch {url} (lock {lock_path}); that process is stuck or the transfer is "
                            f"too slow (raise data.worker_timeout_s)") from None
                    time.sleep(0.02)
            try:
                yield
            finally:
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)

    def entries(self) -> list[os.DirEntry]:
        with os.scandir(self.folder) as it:
            return [e for e in it if e.is_file(follow_symlinks=False) and not e.name.startswith(".")]

    def size(self) -> int:
        total = 0
        for e in self.entries():
            with contextlib.suppress(FileNotFoundError):  # evicted by another process meanwhile
                total += e.stat().st_size
        return total

    def evict(self, keep: str | None = None) -> int:
        """Delete least recently used files until the folder holds at most ``max_bytes`` (and stale temp
        files); returns the bytes freed. Another process evicting already: nothing to do here."""
        with open(os.path.join(self.folder, EVICT_LOCK), "a+b") as lock:
            try:
                fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return 0
            try:
                return self._evict_locked(keep)
            finally:
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)

    def _evict_locked(self, keep: str | None) -> int:
        now, freed = time.time(), 0
        with os.scandir(self.folder) as it:
            for e in it:
                # another process's fetch may rename its temp file between the listing and the stat
                with contextlib.suppress(FileNotFoundError):
                    if is_tmp(e.name) and e.is_file() and now - e.stat().st_mtime > STALE_TMP_S:
                        os.remove(e.path)
        files = []
        for e in self.entries():
            with contextlib.suppress(FileNotFoundError):
                st = e.stat()
                files.append((st.st_mtime, st.st_size, e.path))
        total = sum(size for _, size, _ in files)
        for _, size, path in sorted(files):
            if total <= self.max_bytes:
                break
            if path == keep:
                continue
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
                freed += size
            total -= size
        return freed


class ShardPrefetcher:
    """A thread that keeps the node cache ``horizon`` global batches ahead of this rank's consumption.

    ``batches``: this rank's upcoming global batches, each as the remote files it reads, starting at the
    batch the loader is at; ``consumed()`` is called once per finished global batch."""

    def __init__(self, cache: NodeCache, batches: Iterator[list[RemoteFile]], horizon: int, threads: int):
        self.cache, self.batches, self.horizon = cache, batches, horizon
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="shard-fetch")
        self.error: BaseException | None = None
        self._scheduled = self._consumed = 0
        self._stop = False
        self._cond = threading.Condition()
        self._recent: collections.OrderedDict[RemoteFile, Future] = collections.OrderedDict()
        self._thread = threading.Thread(target=self._run, name="shard-prefetch", daemon=True)
        self._thread.start()

    def consumed(self) -> None:
        with self._cond:
            self._consumed += 1
            self._cond.notify()

    def _run(self) -> None:
        try:
            for files in self.batches:
                with self._cond:
                    while not self._stop and self._scheduled - self._consumed >= self.horizon:
                        self._cond.wait()
                    if self._stop:
                        return
                    self._scheduled += 1
                for f in files:
                    if f not in self._recent:
                        future = self.pool.submit(self.cache.fetch, f)
                        future.add_done_callback(self._check)
                        self._recent[f] = future
                        while len(self._recent) > 4 * self.horizon + 64:
                            self._recent.popitem(last=False)
        except BaseException as err:  # noqa: BLE001 (handed to the training thread, which raises it)
            self.error = self.error or err

    def _check(self, future: Future) -> None:
        if not future.cancelled() and future.exception() is not None and self.error is None:
            self.error = future.exception()

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify()
        self.pool.shutdown(wait=False, cancel_futures=True)
