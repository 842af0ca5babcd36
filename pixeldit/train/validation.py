"""Validation loss on the held-out split: the same number after a resume and on any number of ranks.

The set: the rows of the stage's dataset in the held-out split (``data_pipeline.holdout``, carved at shard
time; the training loader never plans them), grouped into the stage's buckets like the training loader does,
at most ``validation.max_per_bucket`` per bucket (those with the smallest key hash: the same ones every time),
cut into batches in that order: ``validation.batch_size`` images per forward (default twice the stage's
micro_batch; no gradients are kept), i.e. batch_size // 8 samples, each at its 8 timesteps in the same forward. Batch j of a bucket goes to rank j mod world size;
a rank with one batch fewer runs a copy of the bucket's first batch with weight 0, so every rank runs the same
number of forwards (ZeRO-3 gathers parameters collectively).

The value, for every held-out sample x0 (its key k) and each of ``VAL_TIMESTEPS`` = 8 fixed times
t_i = (i + 0.5) / 8, with noise drawn on the CPU from a generator seeded by (run seed, k) only::

    loss(x0, t_i) = mean over pixels of (v_theta(x_t, t_i, c) - (noise_i - x0))^2,  x_t = (1 - t_i) x0 + t_i noise_i

with the sample's true condition c (no dropout, no guidance). Sums and counts are float64 and all-reduced
(SUM); ``val_loss`` is the mean over every (sample, t_i), ``val_loss_bucket`` per bucket, ``val_loss_t`` per
t_i. Nothing depends on the rank, the world size or the training RNG: the model's weights decide the number.
"""
from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist

from data_pipeline.buckets import bucket_table
from data_pipeline.holdout import key_uniform
from pixeldit.diffusion.flow import interpolate, velocity_target

from .bucket_sampler import FIXED_BUCKET, BatchSpec
from .config import RunConfig
from .sample_reader import BatchDataset
from .sources import open_sources

VAL_TIMESTEPS = 8
# (x_t (B, 3, H, W), t (B,), cond kwargs) -> v (B, 3, H, W)
ModelFn = Callable[[torch.Tensor, torch.Tensor, dict], torch.Tensor]


def validation_times(n: int = VAL_TIMESTEPS) -> list[float]:
    """t_i = (i + 0.5) / n, i = 0..n-1 (t = 1 is noise)."""
    return [(i + 0.5) / n for i in range(n)]


def sample_noise(seed: int, key: str, shape: tuple[int, ...], n: int = VAL_TIMESTEPS) -> torch.Tensor:
    """(n, *shape) float32 Gaussian noise of one sample: drawn on the CPU from (seed, key) only."""
    words = np.frombuffer(hashlib.sha256(key.encode()).digest(), dtype=np.uint32).tolist()
    value = int(np.random.SeedSequence([seed, *words]).generate_state(1, dtype=np.uint64)[0]) & ((1 << 63) - 1)
    return torch.randn((n, *shape), generator=torch.Generator().manual_seed(value))


@dataclass
class ValidationSet:
    """The held-out batches of one stage, per bucket (the module docstring)."""

    dataset: BatchDataset
    batches: dict[str, list[BatchSpec]]  # bucket -> its batches, in order, the same on every rank

    @property
    def num_samples(self) -> int:
        return sum(len(b.rows) for specs in self.batches.values() for b in specs)


def build_validation_set(cfg: RunConfig, stage_index: int) -> ValidationSet | None:
    """The validation set of ``cfg.stages[stage_index]``; None when validation is off or the dataset has no
    held-out rows."""
    stage, v = cfg.stages[stage_index], cfg.validation
    if v.every == 0:
        return None
    # every root of the stage, its filters and skipped damaged shards applied (the loader's own view); the shards
    # were checked when the stage's loader was built
    sources, _, _ = open_sources(cfg, stage_index, problems={})
    held = sources.heldout_rows
    if len(held) == 0:
        return None
    if stage.buckets == "fixed":
        groups = {FIXED_BUCKET: held}
        sizes = {FIXED_BUCKET: (stage.resolution, stage.resolution)}
    else:
        table = bucket_table(stage.resolution, stage.bucket_align)
        groups = {k: held[sources.ratio[held] == i] for i, k in enumerate(sources.ratio_keys)}
        sizes = {k: table[k] for k in groups if k in table}
        unknown = sorted(k for k, rows in groups.items() if len(rows) and k not in table)
        if unknown:
            raise ValueError(f"{stage.data_path}: ratio keys {unknown} are not in the bucket table (valid: "
                             f"{sorted(table)})")
    size = max(1, (v.batch_size or 2 * stage.micro_batch) // VAL_TIMESTEPS)  # samples per batch
    batches: dict[str, list[BatchSpec]] = {}
    for bucket in sorted(groups):
        rows = groups[bucket]
        if len(rows) == 0:
            continue
        keys = [sources.key(int(r)) for r in rows]
        order = np.lexsort((np.asarray(keys, dtype=str), key_uniform(keys)))
        rows = rows[order][:v.max_per_bucket or None]
        h, w = sizes[bucket]
        batches[bucket] = [BatchSpec(tuple(int(r) for r in rows[i:i + size]), bucket, h, w)
                           for i in range(0, len(rows), size)]
    return ValidationSet(BatchDataset(sources, None), batches)


def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t


@torch.no_grad()
def validation_loss(model_fn: ModelFn, vset: ValidationSet, conditioner: Callable[[dict], tuple[dict, dict]],
                    seed: int, rank: int, world_size: int, device: torch.device,
                    autocast_dtype: torch.dtype | None = None) -> dict[str, Any]:
    """Collective (every rank calls it): {"val_loss", "val_samples", "val_loss_bucket": {bucket: loss},
    "val_loss_t": [loss at t_i]} (the module docstring)."""
    times = validation_times()
    n_t = len(times)
    buckets = sorted(vset.batches)
    sums = torch.zeros(len(buckets), n_t, dtype=torch.float64)
    counts = torch.zeros(len(buckets), dtype=torch.float64)
    ctx = (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None
           else contextlib.nullcontext())
    for b, bucket in enumerate(buckets):
        specs = vset.batches[bucket]
        for j in range(-(-len(specs) // world_size)):
            index = j * world_size + rank
            weight = 1.0 if index < len(specs) else 0.0  # a padding batch: computed, not counted
            batch = vset.dataset[specs[index if weight else 0]]
            x0 = batch["x0"].to(device)  # (B, 3, H, W)
            B = x0.shape[0]
            cond, _ = conditioner(batch)
            noise = torch.stack([sample_noise(seed, k, tuple(x0.shape[1:])) for k in batch["key"]])  # (B, T, 3, H, W)
            noise = noise.to(device).flatten(0, 1)  # (B * T, 3, H, W), sample-major
            x0 = x0.repeat_interleave(n_t, dim=0)  # (B * T, 3, H, W)
            t = torch.tensor(times, device=device).repeat(B)  # (B * T,)
            cond = {k: v.repeat_interleave(n_t, dim=0) for k, v in cond.items()}  # every timestep of a sample
            with ctx:
                v = model_fn(interpolate(x0, noise, t), t, cond)  # (B * T, 3, H, W): one forward per batch
            err = (v.float() - velocity_target(x0, noise).float()).square().mean(dim=(1, 2, 3))  # (B * T,)
            sums[b] += weight * err.double().view(B, n_t).sum(dim=0).cpu()
            counts[b] += weight * B
    reduced = _all_reduce(torch.cat([sums.flatten(), counts]).to(device)).cpu()
    sums, counts = reduced[:sums.numel()].view_as(sums), reduced[sums.numel():]
    total = counts.sum().item()
    return {
        "val_loss": sums.sum().item() / (total * len(times)),
        "val_samples": int(total),
        "val_loss_bucket": {k: sums[b].sum().item() / (counts[b].item() * len(times)) for b, k in enumerate(buckets)},
        "val_loss_t": [(sums[:, i].sum() / total).item() for i in range(len(times))],
    }


class Validator:
    """The trainer's handle: ``due(step)``, ``run(bundle, conditioner)`` -> the record to log."""

    def __init__(self, cfg: RunConfig, vset: ValidationSet, rank: int, world_size: int, device: torch.device):
        self.cfg, self.vset, self.rank, self.world_size, self.device = cfg, vset, rank, world_size, device

    def due(self, step: int) -> bool:
        return self.cfg.validation.every > 0 and step % self.cfg.validation.every == 0

    def run(self, model: torch.nn.Module, conditioner, autocast_dtype: torch.dtype | None) -> dict[str, Any]:
        def model_fn(x_t: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
            return model(x_t, t, **cond)

        return validation_loss(model_fn, self.vset, conditioner, self.cfg.seed, self.rank, self.world_size,
                               self.device, autocast_dtype)


def build_validator(cfg: RunConfig, stage_index: int, rank: int, world_size: int,
                    device: torch.device) -> tuple[Validator | None, str | None]:
    """(validator of the stage or None, a one-line note saying why there is none when validation is on)."""
    vset = build_validation_set(cfg, stage_index)
    if vset is None:
        note = None if cfg.validation.every == 0 else (
            f"validation: {cfg.stages[stage_index].data_path} has no held-out samples (shard it with "
            f"--holdout-fraction / --holdout-min-per-bucket); no validation loss in stage {stage_index}")
        return None, note
    return Validator(cfg, vset, rank, world_size, device), None


def validation_record(step: int, stage_index: int, result: dict[str, Any]) -> dict[str, Any]:
    """The metrics.jsonl record (kind "val") of one validation."""
    return {"step": step, "kind": "val", "stage": stage_index, **result}


def wandb_values(result: dict[str, Any]) -> dict[str, float]:
    """Flat wandb keys: val/loss, val/bucket/{bucket}, val/t{i}."""
    out = {"val/loss": result["val_loss"]}
    out.update({f"val/bucket/{k}": v for k, v in result["val_loss_bucket"].items()})
    out.update({f"val/t{i}": v for i, v in enumerate(result["val_loss_t"])})
    return out
