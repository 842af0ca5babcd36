"""The training loader: bucketed shards (local folder or S3) -> rank-aligned micro-batches of pixels.

Stages of the stream (what it holds at each point):
 1. ``read_sample_index`` (``data_pipeline.dataset_format``, which owns the dataset layout): the root's
    samples table -> one row per sample: shard, ratio key, byte offset/size of the image member inside its
    tar, caption, label. No tar is scanned. Rows of the held-out split are left out here (the validation loss,
    ``validation.py``, reads only them).
 2. ``EpochPlan`` (bucket_sampler.py): per epoch, seeded by (seed, stage, epoch), the list of this rank's
    micro-batches, each from one bucket, the same bucket on every rank at every position.
 3. ``PlanSampler`` -> torch DataLoader (``batch_size=None``, ``num_workers`` workers, each worker builds
    whole micro-batches): ranged read of every image (``fs.cat_file(path, start, end)``, fsspec; the
    filesystem, e.g. s3fs, is created lazily inside each worker), PIL decode to RGB, resize so the image
    covers the bucket, center crop to the bucket's (height, width).
 4. batch dict: ``x0`` (B, 3, H, W) float32 in [-1, 1], ``caption`` list[str], ``label`` (B,) int64
    (-1 when none), ``shard`` list[str] + ``sample_index`` (B,) int64 (to look up cached text embeddings),
    ``key`` list[str], ``bucket`` str.
``TrainLoader`` keeps (epoch, position) as its state: the position is the number of micro-batches of the
epoch already handed to the trainer, so a checkpoint restores the stream exactly mid-epoch.
Class-conditional data (image + class id in the ``label`` column) goes through the same loader.
"""
from __future__ import annotations

import io
import os
from typing import Any

import numpy as np
import torch
from PIL import Image

from data_pipeline.buckets import bucket_table
from data_pipeline.dataset_format import SAMPLES, SampleIndex, read_sample_index
from pixeldit.storage import fs_and_path, join

from .bucket_sampler import BatchSpec, EpochPlan, PlanSampler, stable_salt
from .config import RunConfig

FIXED_BUCKET = "fixed"


def decode_and_crop(data: bytes, height: int, width: int) -> torch.Tensor:
    """Encoded image bytes -> (3, height, width) float32 in [-1, 1]: RGB, resize to cover, center crop."""
    with Image.open(io.BytesIO(data)) as im:
        img = im.convert("RGB")
    scale = max(height / img.height, width / img.width)
    new_w, new_h = max(width, round(img.width * scale)), max(height, round(img.height * scale))
    if (new_w, new_h) != img.size:
        img = img.resize((new_w, new_h), Image.BICUBIC)
    left, top = (new_w - width) // 2, (new_h - height) // 2
    img = img.crop((left, top, left + width, top + height))
    arr = torch.from_numpy(np.array(img, dtype=np.uint8))  # (H, W, 3)
    return arr.permute(2, 0, 1).float().div_(127.5).sub_(1.0)  # (3, H, W)


class BucketBatchDataset(torch.utils.data.Dataset):
    """Map-style dataset indexed by BatchSpec: returns a whole micro-batch (see module docstring, step 4)."""

    def __init__(self, index: SampleIndex, storage_options: dict[str, Any] | None = None):
        self.index = index
        self.storage_options = dict(storage_options or {})
        self._fs = None
        self._pid = -1

    @property
    def fs(self):
        if self._fs is None or self._pid != os.getpid():  # s3fs is not fork-safe: one per process/worker
            self._fs, self._base = fs_and_path(self.index.root, self.storage_options)
            self._pid = os.getpid()
        return self._fs

    def read_image_bytes(self, row: int) -> bytes:
        ix = self.index
        fs = self.fs
        path = f"{self._base}/{ix.shards[ix.shard_id[row]]}"
        start, size = int(ix.image_offset[row]), int(ix.image_size[row])
        data = fs.cat_file(path, start=start, end=start + size)
        if len(data) != size:
            raise IOError(f"{path}: short read for sample {ix.keys[row].as_py()} ({len(data)} of {size} bytes at "
                          f"offset {start}); the shard does not match {SAMPLES}")
        return data

    def __getitem__(self, spec: BatchSpec) -> dict[str, Any]:
        ix = self.index
        images = []
        for row in spec.rows:
            try:
                images.append(decode_and_crop(self.read_image_bytes(row), spec.height, spec.width))
            except (OSError, ValueError) as e:
                raise IOError(f"cannot load sample {ix.keys[row].as_py()} from shard {ix.shards[ix.shard_id[row]]} "
                              f"of {ix.root}: {e}") from e
        rows = np.asarray(spec.rows, dtype=np.int64)
        return {
            "x0": torch.stack(images),  # (B, 3, H, W)
            "caption": [ix.captions[r].as_py() for r in spec.rows],
            "label": torch.from_numpy(ix.label[rows]),  # (B,)
            "shard": [ix.shards[ix.shard_id[r]] for r in spec.rows],
            "sample_index": torch.from_numpy(ix.sample_index[rows]),  # (B,)
            "key": [ix.keys[r].as_py() for r in spec.rows],
            "bucket": spec.bucket,
        }

    def __len__(self) -> int:  # not used by the sampler; the number of samples
        return len(self.index)


def _identity(batch):
    return batch


class TrainLoader:
    """Stateful loader of one stage: ``next()`` returns this rank's next micro-batch, epochs roll over."""

    def __init__(self, dataset: BucketBatchDataset, groups: dict[str, np.ndarray], sizes: dict[str, tuple[int, int]],
                 *, seed: int, salt: int, rank: int, world_size: int, micro_batch: int, num_workers: int = 0,
                 prefetch_factor: int = 2):
        self.dataset, self.groups, self.sizes = dataset, groups, sizes
        self.seed, self.salt, self.rank, self.world_size = seed, salt, rank, world_size
        self.micro_batch, self.num_workers, self.prefetch_factor = micro_batch, num_workers, prefetch_factor
        self.epoch, self.position = 0, 0
        self._plan: EpochPlan | None = None
        self._iter = None

    def plan(self, epoch: int) -> EpochPlan:
        ix = self.dataset.index
        plan = EpochPlan(self.groups, ix.shard_id, ix.sample_index, self.sizes, seed=self.seed, salt=self.salt,
                         epoch=epoch, world_size=self.world_size, rank=self.rank, micro_batch=self.micro_batch)
        if len(plan) == 0:
            counts = {b: len(r) for b, r in self.groups.items()}
            raise ValueError(f"{ix.root}: no bucket has {self.world_size} ranks x {self.micro_batch} samples "
                             f"(samples per bucket: {counts}); use a smaller micro_batch or more data")
        return plan

    def __len__(self) -> int:
        """Micro-batches per epoch on every rank."""
        if self._plan is None:
            self._plan = self.plan(self.epoch)
        return len(self._plan)

    def _start(self) -> None:
        if self._plan is None:
            self._plan = self.plan(self.epoch)
        kwargs = {"prefetch_factor": self.prefetch_factor} if self.num_workers > 0 else {}
        dl = torch.utils.data.DataLoader(self.dataset, sampler=PlanSampler(self._plan, self.position),
                                         batch_size=None, collate_fn=_identity, num_workers=self.num_workers, **kwargs)
        self._iter = iter(dl)

    def next(self) -> dict[str, Any]:
        if self._iter is None:
            self._start()
        try:
            batch = next(self._iter)
        except StopIteration:
            self.epoch, self.position, self._plan = self.epoch + 1, 0, None
            self._start()
            batch = next(self._iter)
        self.position += 1
        return batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.close()
        self.epoch, self.position, self._plan = int(state["epoch"]), int(state["position"]), None

    def close(self) -> None:
        self._iter = None  # lets the DataLoader shut its workers down


def build_loader(cfg: RunConfig, stage_index: int, rank: int, world_size: int,
                 num_classes: int | None = None) -> TrainLoader:
    """Loader of ``cfg.stages[stage_index]``; ``num_classes`` set for class-conditional models (labels checked)."""
    stage = cfg.stages[stage_index]
    index = read_sample_index(stage.data_path, cfg.data.storage_options)
    if num_classes is not None:
        bad = (index.label < 0) | (index.label >= num_classes)
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise ValueError(f"{join(stage.data_path, SAMPLES)}: sample {index.keys[row].as_py()} has label "
                             f"{index.label[row]} outside 0..{num_classes - 1} ({int(bad.sum())} such rows); "
                             f"a class-conditional model needs a class id for every sample")
    rows = np.flatnonzero(~index.heldout).astype(np.int64)  # the held-out split is never trained on
    if stage.buckets == "fixed":
        groups = {FIXED_BUCKET: rows}
        sizes = {FIXED_BUCKET: (stage.resolution, stage.resolution)}
    else:
        table = bucket_table(stage.resolution, stage.bucket_align)
        unknown = [k for k in index.ratio_keys if k not in table]
        if unknown:
            raise ValueError(f"{stage.data_path}: ratio keys {unknown} are not in the bucket table "
                             f"(valid: {sorted(table)})")
        groups = {k: rows[index.ratio_id[rows] == i] for i, k in enumerate(index.ratio_keys)}
        sizes = {k: table[k] for k in index.ratio_keys}
    return TrainLoader(BucketBatchDataset(index, cfg.data.storage_options), groups, sizes, seed=cfg.seed,
                       salt=stable_salt(f"{stage_index}:{stage.name}"), rank=rank, world_size=world_size,
                       micro_batch=stage.micro_batch, num_workers=cfg.data.num_workers,
                       prefetch_factor=cfg.data.prefetch_factor)
