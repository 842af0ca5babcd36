"""Reference statistics of a data set: computed once per (dataset root, extractor, resolution, count), cached.

A reference is a dataset root written by ``data_pipeline`` (``samples.parquet``, local or S3) or a local
folder of images (png / jpg / jpeg / webp, searched recursively). At most ``max_images`` images are used:
all of them, or a subset drawn by a permutation seeded 0, in stored order. Each image is resized to cover
the evaluation resolution and centre-cropped (the training loader's ``decode_and_crop``), then quantised
to uint8 exactly as generated images are before they reach an extractor.

The cache file is ``{cache}/{extractor}-{resolution}px-n{count}-{key}.npz`` (``FeatureStats``: mu, sigma,
n, extractor fingerprint), ``cache`` = ``{root}/eval_stats`` unless given, ``key`` a hash of the
extractor fingerprint, the data identity (the manifest's bytes, or the folder's file names and sizes),
the resolution and the count: new weights, re-sharded data or another subset never reuse old numbers.
Written atomically (``pixeldit.storage``: local rename or one S3 PUT).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

from data_pipeline.dataset_format import MANIFEST, SAMPLES, read_sample_index
from pixeldit.diffusion import to_uint8
from pixeldit.storage import exists, join, read_bytes, write_bytes_atomic
from pixeldit.train.sample_reader import BatchDataset, decode_and_crop
from pixeldit.train.sources import SourceSet

from .frechet import FeatureStats, StatsAccumulator

STATS_DIR = "eval_stats"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def _subset(n: int, max_images: int) -> np.ndarray:
    if n <= max_images:
        return np.arange(n)
    return np.sort(np.random.default_rng(0).permutation(n)[:max_images])


class _Images(torch.utils.data.Dataset):
    """Item i -> (resolution, resolution, 3) uint8 of the i-th selected reference image."""

    def __init__(self, ref: "ReferenceSet", resolution: int):
        self.ref, self.resolution = ref, resolution
        self._data = None  # the training loader's reader (one per worker): a local shard's file or a ranged GET
        if ref.index is not None:
            self._data = BatchDataset(SourceSet([ref.root], [1.0], [ref.index], {}), None)

    def __len__(self) -> int:
        return len(self.ref.rows)

    def __getitem__(self, i: int) -> np.ndarray:
        row = int(self.ref.rows[i])
        if self._data is not None:
            data, name = self._data.reader.read(row), f"sample {self.ref.index.keys[row].as_py()}"
        else:
            data, name = self.ref.files[row].read_bytes(), str(self.ref.files[row])
        try:
            return to_uint8(decode_and_crop(data, self.resolution, self.resolution)[None])[0]
        except (OSError, ValueError) as err:
            raise ValueError(f"reference {self.ref.root}: cannot decode {name}: {err}") from None


@dataclass
class ReferenceSet:
    """The selected reference images of one root."""

    root: str
    rows: np.ndarray  # selected row (dataset) or file (folder) indices
    digest: str  # identity of the data
    index: object | None = None  # data_pipeline.dataset_format.SampleIndex for a dataset root
    files: list[Path] | None = None  # for an image folder

    @classmethod
    def open(cls, root: str, max_images: int) -> "ReferenceSet":
        if exists(join(root, SAMPLES)):
            index = read_sample_index(root)
            digest = hashlib.sha256(read_bytes(join(root, MANIFEST))).hexdigest()
            return cls(root, _subset(len(index), max_images), digest, index=index)
        folder = Path(root)
        if not folder.is_dir():
            raise FileNotFoundError(f"reference {root!r}: neither a dataset root ({SAMPLES}) nor a folder of images")
        files = sorted(f for f in folder.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file()
                       and STATS_DIR not in f.relative_to(folder).parts)
        if len(files) < 2:
            raise ValueError(f"reference {root!r}: {len(files)} images ({', '.join(IMAGE_SUFFIXES)}); need at least 2")
        h = hashlib.sha256()
        for f in files:
            h.update(f"{f.relative_to(folder)}\0{f.stat().st_size}\n".encode())
        return cls(root, _subset(len(files), max_images), h.hexdigest(), files=files)

    def batches(self, resolution: int, batch_size: int, workers: int = 0) -> Iterator[np.ndarray]:
        """(B, resolution, resolution, 3) uint8 batches, in order."""
        loader = torch.utils.data.DataLoader(_Images(self, resolution), batch_size=batch_size, num_workers=workers,
                                             collate_fn=np.stack)
        yield from loader


def cache_path(ref: ReferenceSet, extractor, resolution: int, cache_dir: str = "") -> str:
    key = hashlib.sha256(f"{extractor.fingerprint}|{ref.digest}|{resolution}|{len(ref.rows)}".encode()).hexdigest()
    name = f"{extractor.name}-{resolution}px-n{len(ref.rows)}-{key[:16]}.npz"
    return join(cache_dir or join(ref.root, STATS_DIR), name)


def reference_stats(ref: ReferenceSet, extractor, resolution: int, cache_dir: str = "", batch_size: int = 32,
                    workers: int = 0, progress: bool = False) -> tuple[FeatureStats, str, bool]:
    """(statistics, cache file, whether they came from the cache)."""
    path = cache_path(ref, extractor, resolution, cache_dir)
    if exists(path):
        stats = FeatureStats.from_bytes(read_bytes(path), where=path)
        if stats.fingerprint == extractor.fingerprint and stats.n == len(ref.rows):
            return stats, path, True
    acc = StatsAccumulator(extractor.fingerprint)
    for batch in tqdm(ref.batches(resolution, batch_size, workers), total=-(-len(ref.rows) // batch_size),
                      desc=f"reference {extractor.name}", disable=not progress, leave=False):
        acc.add(extractor.features(batch))
    stats = acc.stats()
    write_bytes_atomic(path, stats.to_bytes())
    return stats, path, False
