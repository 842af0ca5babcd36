"""Reading and decoding inside the DataLoader workers (stage 4 of ``pixeldit.train.loader``): image bytes by
offset from a shard (the node cache's copy, a local root's own file, or one ranged GET), decode, resize to cover
the bucket, center crop; ``BatchDataset`` builds whole micro-batches and replaces an undecodable sample by another
of its micro-batch, counted."""
from __future__ import annotations

import collections
import io
import math
import os
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from data_pipeline.dataset_format import SAMPLES
from pixeldit.errors import DataError, UserError
from pixeldit.node_cache import NodeCache
from pixeldit.storage import read_range

from .bucket_sampler import BatchSpec
from .sources import SourceSet

OPEN_SHARDS = 16  # open shard files per reader (process)


def decode_to_bucket(data: bytes, height: int, width: int) -> torch.Tensor:
    """Encoded image bytes -> (3, height, width) uint8 RGB: resized to cover the bucket, center crop.

    Only the centred box that survives the crop is resized (antialiased bicubic on uint8, the algorithm of
    PIL's resize), and a JPEG far larger than the bucket is decoded at 1/2, 1/4 or 1/8 size by the decoder."""
    with Image.open(io.BytesIO(data)) as im:
        scale = max(height / im.height, width / im.width)
        if scale < 0.5:  # JPEG draft: the decoder downscales by a power of two, staying >= the cover size
            im.draft("RGB", (math.ceil(im.width * scale), math.ceil(im.height * scale)))
        if im.mode == "RGB":  # the pipeline stores RGB: skip convert's copy
            im.load()
            img = im
        else:
            img = im.convert("RGB")
    src_w, src_h = img.size
    scale = max(height / src_h, width / src_w)
    box_w, box_h = min(src_w, max(1, round(width / scale))), min(src_h, max(1, round(height / scale)))
    left, top = (src_w - box_w) // 2, (src_h - box_h) // 2
    with warnings.catch_warnings():  # PIL's buffer is read-only; nothing below writes to it
        warnings.simplefilter("ignore", UserWarning)
        arr = torch.from_numpy(np.asarray(img))[top:top + box_h, left:left + box_w]  # (h', w', 3)
    x = arr.permute(2, 0, 1)  # (3, h', w')
    if (box_h, box_w) != (height, width):
        x = torch.nn.functional.interpolate(x[None], size=(height, width), mode="bicubic", antialias=True)[0]
    return x.contiguous()  # (3, H, W)


def to_unit_range(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> float32 in [-1, 1] (x / 127.5 - 1), any shape."""
    return pixels.float().div_(127.5).sub_(1.0)  # (faster than one mixed-dtype op on CPU)


def decode_and_crop(data: bytes, height: int, width: int) -> torch.Tensor:
    """Encoded image bytes -> (3, height, width) float32 in [-1, 1] (``decode_to_bucket``, then scaled)."""
    return to_unit_range(decode_to_bucket(data, height, width))


class SampleReader:
    """Image bytes of a row: from the node cache's copy of its shard, a local shard file, or (no cache) one
    ranged GET. One per process: open files and s3fs are not shared across fork."""

    def __init__(self, sources: SourceSet, cache: NodeCache | None):
        self.sources, self.cache = sources, cache
        self._files: collections.OrderedDict[int, Any] = collections.OrderedDict()
        self.bytes_read = 0

    def read(self, row: int) -> bytes:
        src = self.sources
        shard, start, size = int(src.shard[row]), int(src.image_offset[row]), int(src.image_size[row])
        if src.remote[int(src.shard_source[shard])] and self.cache is None:
            data = read_range(src.shard_url(shard), start, start + size, src.storage_options)
        else:
            data = os.pread(self._file(shard).fileno(), size, start)
        if len(data) != size:
            raise ValueError(f"short read: {len(data)} of {size} bytes at offset {start} of {src.shard_url(shard)}; "
                             f"the shard does not match {SAMPLES}")
        self.bytes_read += size
        return data

    def _file(self, shard: int):
        if shard in self._files:
            self._files.move_to_end(shard)
            return self._files[shard]
        src = self.sources
        if src.remote[int(src.shard_source[shard])]:
            handle = self.cache.open(src.shard_file(shard))
        else:
            handle = open(src.shard_url(shard), "rb")
        self._files[shard] = handle
        while len(self._files) > OPEN_SHARDS:
            self._files.popitem(last=False)[1].close()
        return handle

    def close(self) -> None:
        while self._files:
            self._files.popitem()[1].close()


@dataclass
class WorkerError:
    """A user-facing error raised inside a worker, carried to the main process as a value (a raised one
    would come back wrapped in the worker's traceback text)."""

    kind: type
    message: str


class BatchDataset(torch.utils.data.Dataset):
    """Map-style dataset indexed by BatchSpec: returns a whole micro-batch (module docstring, step 5)."""

    def __init__(self, sources: SourceSet, cache: NodeCache | None):
        self.sources, self.cache = sources, cache
        self._reader: SampleReader | None = None
        self._pid = -1

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_reader": None, "_pid": -1}

    @property
    def reader(self) -> SampleReader:
        if self._reader is None or self._pid != os.getpid():
            self._reader, self._pid = SampleReader(self.sources, self.cache), os.getpid()
        return self._reader

    def __getitem__(self, spec: BatchSpec) -> dict[str, Any] | WorkerError:
        try:
            return self._batch(spec)
        except UserError as err:
            return WorkerError(type(err), str(err))

    def _batch(self, spec: BatchSpec) -> dict[str, Any]:
        src, rows = self.sources, list(spec.rows)
        caps = list(spec.captions) or [0] * len(rows)
        images: list[torch.Tensor | None] = []
        bad = []
        for row in rows:
            try:
                images.append(decode_to_bucket(self.reader.read(row), spec.height, spec.width))
            except UserError:  # storage unreachable, a shard changed since the check: not a bad sample
                raise
            except (OSError, ValueError, Image.DecompressionBombError, SyntaxError) as e:  # PIL raises all three
                images.append(None)
                bad.append(f"{src.key(row)} ({src.shard_url(int(src.shard[row]))}: {' '.join(str(e).split())[:200]})")
        if bad:
            good = [i for i, im in enumerate(images) if im is not None]
            if not good:
                raise DataError(f"every sample of a micro-batch is undecodable: {'; '.join(bad)}")
            for i, im in enumerate(images):
                if im is None:  # the donor's image, caption, label: a consistent sample
                    rows[i], caps[i] = rows[good[0]], caps[good[0]]
                    images[i] = images[good[0]]
        r = np.asarray(rows, dtype=np.int64)
        shards = src.shard[r]
        return {
            "x0": to_unit_range(torch.stack(images)),  # (B, 3, H, W) float32
            "caption": [src.caption(x, c) for x, c in zip(rows, caps)],
            "caption_index": torch.tensor(caps, dtype=torch.int64),  # (B,)
            "label": torch.from_numpy(src.label[r]),  # (B,)
            "source": src.shard_source[shards].tolist(),
            "shard": [src.shard_rel[g] for g in shards],
            "sample_index": torch.from_numpy(src.sample_index[r]),  # (B,)
            "key": [src.key(x) for x in rows],
            "bucket": spec.bucket,
            "bad": bad,
        }

    def __len__(self) -> int:  # not used by the sampler; the number of samples
        return len(self.sources)
