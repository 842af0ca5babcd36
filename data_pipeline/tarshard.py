"""Write one webdataset shard (a plain tar) and publish it atomically.

Members per sample, in this order: {key}.{jpg|png|webp}, {key}.txt, {key}.json, and {key}.cls for
class-conditional data. The byte offset of each image member's data inside the tar is recorded so a
loader can fetch one image with a ranged read. Member headers are deterministic (mtime 0, uid 0), so
the same input gives byte-identical shards.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from dataclasses import dataclass

from pixeldit.storage import publish, staging_path

_BLOCK = tarfile.BLOCKSIZE  # 512


@dataclass(frozen=True)
class MemberSpan:
    offset: int  # first byte of the member's data in the tar
    size: int


class ShardWriter:
    """Tar writer for one shard: add samples, then commit() to make it visible at `url` in one step.

    The tar is built in a staging file (``pixeldit.storage.staging_path``: a temp name next to a local
    target, or a scratch file for S3) and only renamed / uploaded whole by commit(); abort() deletes the staging file.
    """

    def __init__(self, url: str, scratch_dir: str) -> None:
        self.url = url
        self.staged = staging_path(url, scratch_dir)
        self._file = open(self.staged, "wb")  # noqa: SIM115 - closed in commit()/abort()
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.USTAR_FORMAT)
        self.num_samples = 0
        self.payload_bytes = 0

    def _add(self, name: str, data: bytes) -> MemberSpan:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mtime = 0
        info.mode = 0o444
        self._tar.addfile(info, io.BytesIO(data))
        padded = -(-len(data) // _BLOCK) * _BLOCK
        return MemberSpan(self._tar.offset - padded, len(data))

    def add(self, key: str, image: bytes, ext: str, caption: str, meta: dict, label: int | None) -> MemberSpan:
        """Append one sample; returns where the image member's data lies inside the tar."""
        if "." in key or "/" in key:
            raise ValueError(f"sample key {key!r} must not contain '.' or '/' (webdataset splits keys at dots)")
        span = self._add(f"{key}.{ext}", image)
        self._add(f"{key}.txt", caption.encode("utf-8"))
        self._add(f"{key}.json", json.dumps(meta, ensure_ascii=False, sort_keys=True).encode("utf-8"))
        if label is not None:
            self._add(f"{key}.cls", str(int(label)).encode("ascii"))
        self.num_samples += 1
        self.payload_bytes += len(image)
        return span

    def commit(self) -> int:
        """Finish the tar, make it appear at `url`; returns its size in bytes."""
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        size = self._file.tell()
        self._file.close()
        publish(self.staged, self.url)
        return size

    def abort(self) -> None:
        if not self._file.closed:
            self._tar.close()
            self._file.close()
        if os.path.exists(self.staged):
            os.remove(self.staged)
