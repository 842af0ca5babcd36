"""Training checkpoint -> release folder, and DeepSpeed universal checkpoints for a new world size.

``export_release`` reads a step folder of any ZeRO stage and world size: the EMA weights
(``consolidate_ema``, default) or the raw fp32 master weights (``consolidate_model``), casts them to bf16 or
fp32, and writes the release folder atomically (a temporary folder renamed at the end): config.json,
model.safetensors (sharded with an index above ``max_shard_bytes``) and README.md.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Literal

import torch

from pixeldit.models.key_map import training_to_release
from pixeldit.release import ReleaseConfig, SamplerDefaults
from pixeldit.release.writer import save_release

from .checkpoint import CheckpointManager, consolidate_model, read_meta
from .ema import consolidate_ema

Weights = Literal["ema", "raw"]
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A step folder, or a run folder / checkpoints folder (-> its ``latest``)."""
    p = Path(path)
    if (p / "meta.json").exists():
        return p
    run_dir = p.parent if p.name == "checkpoints" else p
    latest = CheckpointManager(run_dir, keep=1).latest()
    if latest is None:
        raise FileNotFoundError(f"{path}: neither a checkpoint step folder nor a run folder with checkpoints/latest")
    return latest


def export_release(checkpoint: str | os.PathLike, out_dir: str | os.PathLike, weights: Weights = "ema",
                   dtype: str = "bf16", max_shard_bytes: int = 5 * 2**30,
                   sampler: SamplerDefaults | None = None) -> Path:
    """Write a release folder from a training checkpoint; returns the folder."""
    if weights not in ("ema", "raw"):
        raise ValueError(f"weights={weights!r}; valid values: ema, raw")
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}; valid values: {', '.join(DTYPES)}")
    step_dir = resolve_checkpoint(checkpoint)
    meta = read_meta(step_dir)
    full = consolidate_ema(step_dir) if weights == "ema" else consolidate_model(step_dir)
    state = {k: v.to(DTYPES[dtype]).contiguous() for k, v in training_to_release(full).items()}
    sampler = sampler or SamplerDefaults(shift=None)
    if sampler.shift is None:  # the time shift of the stage the checkpoint was trained in
        sampler.shift = float(meta.get("shift", 1.0))
    cfg = ReleaseConfig(
        model_args=meta["model_args"], resolution=meta.get("resolution", 256), stage=meta.get("stage_name", ""),
        step=meta["step"], weights=weights, dtype=dtype, text_encoder=meta.get("text_encoder", ""),
        system_prompt=meta.get("system_prompt", ""), sampler=sampler,
    )
    return save_release(state, cfg, out_dir, max_shard_bytes)


def to_universal(checkpoint: str | os.PathLike, out_dir: str | os.PathLike | None = None, workers: int = 1) -> Path:
    """Convert a step folder to DeepSpeed's universal checkpoint (loadable on any world size).

    The result ``{step}_universal`` sits beside the step folder, with our files (meta.json, EMA, no RNG:
    the rank layout changes) copied along, so the trainer can resume from it with ``load_universal``.
    """
    from argparse import Namespace

    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    step_dir = resolve_checkpoint(checkpoint)
    out = Path(out_dir) if out_dir else step_dir.with_name(step_dir.name + "_universal")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    ds_to_universal(Namespace(input_folder=str(step_dir), output_folder=str(tmp), num_extract_workers=workers,
                              num_merge_workers=workers, keep_temp_folder=False, strict=True,
                              inject_missing_state=True))
    for f in step_dir.iterdir():
        if f.is_file() and (f.name == "meta.json" or f.name.startswith("ema_rank")):
            shutil.copy2(f, tmp / f.name)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out
