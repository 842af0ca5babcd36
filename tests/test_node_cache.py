"""The node-local cache: one download per node however many processes race for a file, LRU eviction by size,
open files surviving eviction, sizes checked, leftovers of crashed downloads removed."""
from __future__ import annotations

import multiprocessing
import os
import time

import pytest

from pixeldit.errors import DataError
from pixeldit.node_cache import NodeCache, RemoteFile
from pixeldit.storage import tmp_path


def _remote(tmp_path, name: str, size: int) -> RemoteFile:
    path = tmp_path / "remote" / name
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(bytes([len(name)]) * size)
    return RemoteFile(str(path), size)


def _race(args):
    folder, files = args
    cache = NodeCache(folder, 1 << 30)
    for f in files:
        with cache.open(f) as handle:
            assert handle.read() == open(f.url, "rb").read()
    return cache.fetched_files


def test_processes_racing_for_the_same_files_fetch_each_once(tmp_path):
    files = [_remote(tmp_path, f"s{i}.tar", 200_000) for i in range(4)]
    folder = str(tmp_path / "cache")
    with multiprocessing.get_context("fork").Pool(4) as pool:
        fetched = pool.map(_race, [(folder, files if i % 2 else files[::-1]) for i in range(4)])
    assert sum(fetched) == 4  # each file downloaded by exactly one process
    cache = NodeCache(folder, 1 << 30)
    assert len(cache.entries()) == 4 and cache.size() == 800_000


def test_least_recently_used_files_are_evicted_and_open_ones_stay_readable(tmp_path):
    a, b, c = (_remote(tmp_path, n, 1000) for n in ("a.tar", "bb.tar", "ccc.tar"))
    cache = NodeCache(str(tmp_path / "cache"), 2500)
    handle = cache.open(a)
    time.sleep(0.01)
    cache.fetch(b)
    time.sleep(0.01)
    os.utime(cache.path(a))  # a used again: b is now the oldest
    time.sleep(0.01)
    cache.fetch(c)
    assert sorted(os.path.basename(e.path).split("-", 1)[1] for e in cache.entries()) == ["a.tar", "ccc.tar"]
    cache.fetch(_remote(tmp_path, "dddd.tar", 1000))  # evicts a while it is open
    assert not os.path.exists(cache.path(a))
    assert handle.read() == b"\x05" * 1000  # POSIX: an open file survives its unlink
    handle.close()
    with cache.open(a) as again:  # fetched again
        assert again.read() == b"\x05" * 1000
    assert cache.fetched_files == 5 and cache.size() <= 2500


def test_a_size_other_than_the_manifest_s_is_an_error_and_leaves_nothing(tmp_path):
    f = _remote(tmp_path, "short.tar", 100)
    cache = NodeCache(str(tmp_path / "cache"), 1 << 20)
    with pytest.raises(DataError, match="100 bytes where 120 were expected"):
        cache.fetch(RemoteFile(f.url, 120))
    assert cache.entries() == [] and os.listdir(tmp_path / "cache") == [".locks"]


def test_stale_temp_files_of_crashed_downloads_are_removed(tmp_path):
    cache = NodeCache(str(tmp_path / "cache"), 10)
    stale, fresh = tmp_path / "cache" / "x", tmp_path / "cache" / "y"
    stale_tmp, fresh_tmp = tmp_path_of(stale), tmp_path_of(fresh)
    for p in (stale_tmp, fresh_tmp):
        open(p, "wb").write(b"partial")
    old = time.time() - 7200
    os.utime(stale_tmp, (old, old))
    cache.evict()
    assert not os.path.exists(stale_tmp) and os.path.exists(fresh_tmp)  # a live download keeps its file


def tmp_path_of(path) -> str:
    return tmp_path(str(path))
