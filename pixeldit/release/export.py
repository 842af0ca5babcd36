"""Training checkpoint -> release folder (``pixeldit-release``), or -> an in-memory model.

``export_release(checkpoint, out)`` reads a step folder of any ZeRO stage (1/2/3) and world size:
 1. the weights: the EMA (``pixeldit.run_folder.consolidate_ema``, default) or the fp32 master weights
    (``zero.raw_weights``: DeepSpeed's ``zero_to_fp32``, one tensor at a time), through the key map
    (``key_map.training_to_release``: the TrainModule prefix stripped, the REPA projector dropped), checked
    against the architecture in meta.json, cast to bf16 or fp32;
 2. ``ReleaseConfig`` from meta.json (architecture, stage, resolution, text encoder NAME, system prompt) and
    sampler defaults (``default_sampler`` with the stage's time shift, overridable);
 3. ``writer.save_release`` writes config.json, model.safetensors (sharded with an index above
    ``max_shard_bytes``) and README.md atomically.
``load_training_model(path)`` gives the same (model, ReleaseConfig) pair straight from a checkpoint (EMA).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import yaml

from pixeldit import run_folder
from pixeldit.errors import ConfigError
from pixeldit.models import PixelDiT, build_model

from .config import (DEFAULT_DTYPE, DEFAULT_WEIGHTS, DTYPES, WEIGHTS, ReleaseConfig, Weights, check_model_args,
                     default_sampler, text_encoder_name)
from .key_map import check_release_keys, training_to_release
from .writer import DEFAULT_MAX_SHARD_BYTES, save_release
from .zero import raw_weights


def stage_shift(step_dir: Path, meta: dict[str, Any]) -> float:
    """The time shift of the stage the checkpoint was trained in: meta.json, else the run's config.yaml."""
    if "shift" in meta:
        return float(meta["shift"])
    config = step_dir.parent.parent / run_folder.RUN_CONFIG
    if config.exists():
        stages = (yaml.safe_load(config.read_text()) or {}).get("stages") or []
        index = int(meta.get("stage_index", 0))
        if index < len(stages) and "shift" in stages[index]:
            return float(stages[index]["shift"])
    return 1.0


def release_config(step_dir: Path, weights: Weights = DEFAULT_WEIGHTS, dtype: str = DEFAULT_DTYPE,
                   sampler: dict[str, Any] | None = None) -> ReleaseConfig:
    """``ReleaseConfig`` of a step folder; ``sampler`` overrides fields of the default sampler settings."""
    meta = run_folder.read_meta(step_dir)
    args = check_model_args(meta.get("model_args"), str(step_dir / run_folder.META))
    chosen = default_sampler(args, stage_shift(step_dir, meta)).override(**(sampler or {}))
    return ReleaseConfig(
        model_args=meta["model_args"], resolution=int(meta.get("resolution", 256)), stage=meta.get("stage_name", ""),
        stage_index=int(meta.get("stage_index", 0)), step=int(meta["step"]), weights=weights, dtype=dtype,
        text_encoder=text_encoder_name(meta.get("text_encoder", "")), system_prompt=meta.get("system_prompt", ""),
        sampler=chosen)


def checkpoint_weights(step_dir: Path, weights: Weights, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Release-keyed weights of a step folder, checked against the architecture of its meta.json."""
    if weights == "ema":
        state = {k: v.to(dtype) for k, v in training_to_release(run_folder.consolidate_ema(step_dir)).items()}
    elif weights == "raw":
        state = raw_weights(step_dir, dtype)
    else:
        raise ConfigError(f"weights={weights!r}; valid values: {', '.join(WEIGHTS)}")
    meta_path = step_dir / run_folder.META
    args = check_model_args(run_folder.read_meta(step_dir).get("model_args"), str(meta_path))
    with torch.device("meta"):
        expected = build_model(args).state_dict()
    check_release_keys(state, {k: v.shape for k, v in expected.items()}, f"{step_dir} ({weights} weights)")
    return state


def export_release(checkpoint: str | os.PathLike, out_dir: str | os.PathLike, weights: Weights = DEFAULT_WEIGHTS,
                   dtype: str = DEFAULT_DTYPE, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                   sampler: dict[str, Any] | None = None, verify: str = "size") -> Path:
    """Write a release folder from a training checkpoint (step folder or run folder); returns the folder.
    ``verify``: the checks of the checkpoint first (``run_folder.checkpoint_problem``: "size" or "full")."""
    if dtype not in DTYPES:
        raise ConfigError(f"dtype={dtype!r}; valid values: {', '.join(DTYPES)}")
    step_dir = run_folder.resolve_checkpoint(checkpoint, verify=verify)
    cfg = release_config(step_dir, weights, dtype, sampler)
    state = checkpoint_weights(step_dir, weights, DTYPES[dtype])
    return save_release(state, cfg, out_dir, max_shard_bytes)


def load_training_model(checkpoint: str | os.PathLike, weights: Weights = DEFAULT_WEIGHTS,
                        device: str | torch.device = "cpu") -> tuple[PixelDiT, ReleaseConfig]:
    """(model in eval mode, ReleaseConfig) straight from a training checkpoint, as ``from_pretrained`` does."""
    step_dir = run_folder.resolve_checkpoint(checkpoint)
    cfg = release_config(step_dir, weights, "fp32")
    model = build_model(cfg.args())
    model.load_state_dict(checkpoint_weights(step_dir, weights, torch.float32), strict=True)
    return model.to(device).eval(), cfg
