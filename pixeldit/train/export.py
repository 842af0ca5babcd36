"""Training checkpoint -> release folder, and -> DeepSpeed universal checkpoint (resume on another world size).

``export_release(checkpoint, out)`` reads a step folder of any ZeRO stage (1/2/3) and world size:
 1. the weights: the EMA (``consolidate_ema``, default) or the fp32 master weights (DeepSpeed's
    ``zero_to_fp32`` in lazy mode, one tensor at a time), through the key map
    (``pixeldit.models.key_map.training_to_release``: the TrainModule prefix stripped, the REPA projector
    dropped), checked against the architecture in meta.json, cast to bf16 or fp32;
 2. ``ReleaseConfig`` from meta.json (architecture, stage, resolution, text encoder, system prompt) and
    sampler defaults (``default_sampler`` with the stage's time shift, overridable);
 3. ``save_release`` writes config.json, model.safetensors (sharded with an index above ``max_shard_bytes``)
    and README.md atomically.
``load_training_model(path)`` gives the same (model, ReleaseConfig) pair straight from a checkpoint (EMA).

``to_universal(checkpoint)`` runs ``deepspeed.checkpoint.ds_to_universal`` into
``checkpoints/universal_step_N`` (outside the ``step_*`` names that keep-k pruning deletes), copying
meta.json (+ ``universal: true``), the EMA files and the RNG files along. Resume it on any number of ranks
in a new run folder with ``checkpoint.resume_from=... checkpoint.load_universal=true``; the trainer
re-partitions the EMA (``EMA.load``: consolidate -> full -> re-shard) and rescales the loader position.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from argparse import Namespace
from pathlib import Path
from typing import Any, Literal

import torch
import yaml

from pixeldit.models import ModelArgs, PixelDiT, build_model
from pixeldit.models.key_map import check_release_keys, training_to_release
from pixeldit.release import DTYPES, ReleaseConfig, default_sampler
from pixeldit.release.writer import DEFAULT_MAX_SHARD_BYTES, save_release

from .checkpoint import LATEST, CheckpointManager, read_meta, write_text_atomic
from .ema import EMA_FILE, consolidate_ema

Weights = Literal["ema", "raw"]
UNIVERSAL_PREFIX = "universal_"


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A step folder, or a run folder / its checkpoints folder (-> the step folder named by ``latest``)."""
    p = Path(path)
    if (p / "meta.json").exists():
        return p
    run_dir = p.parent if p.name == "checkpoints" else p
    latest = CheckpointManager(run_dir, keep=1).latest()
    if latest is None:
        raise FileNotFoundError(f"{path}: neither a checkpoint step folder (with meta.json) nor a run folder "
                                f"with checkpoints/{LATEST}")
    return latest


def stage_shift(step_dir: Path, meta: dict[str, Any]) -> float:
    """The time shift of the stage the checkpoint was trained in: meta.json, else the run's config.yaml."""
    if "shift" in meta:
        return float(meta["shift"])
    config = step_dir.parent.parent / "config.yaml"
    if config.exists():
        stages = (yaml.safe_load(config.read_text()) or {}).get("stages") or []
        index = int(meta.get("stage_index", 0))
        if index < len(stages) and "shift" in stages[index]:
            return float(stages[index]["shift"])
    return 1.0


def release_config(step_dir: Path, weights: Weights = "ema", dtype: str = "bf16",
                   sampler: dict[str, Any] | None = None) -> ReleaseConfig:
    """``ReleaseConfig`` of a step folder; ``sampler`` overrides fields of the default sampler settings."""
    meta = read_meta(step_dir)
    args = ModelArgs.from_dict(meta["model_args"])
    defaults = default_sampler(args, stage_shift(step_dir, meta))
    unknown = sorted(set(sampler or {}) - {f.name for f in dataclasses.fields(defaults)})
    if unknown:
        raise ValueError(f"unknown sampler settings {unknown}; valid: {[f.name for f in dataclasses.fields(defaults)]}")
    chosen = dataclasses.replace(defaults, **{k: v for k, v in (sampler or {}).items() if v is not None})
    return ReleaseConfig(
        model_args=meta["model_args"], resolution=int(meta.get("resolution", 256)), stage=meta.get("stage_name", ""),
        stage_index=int(meta.get("stage_index", 0)), step=int(meta["step"]), weights=weights, dtype=dtype,
        text_encoder=meta.get("text_encoder", ""), system_prompt=meta.get("system_prompt", ""), sampler=chosen)


def raw_weights(step_dir: Path, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The fp32 master weights of the model (release keys) from the ZeRO partitions of any stage/world size,
    materialised one tensor at a time (zero_to_fp32 lazy mode) and cast to ``dtype``."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    lazy = get_fp32_state_dict_from_zero_checkpoint(str(step_dir.parent), tag=step_dir.name, lazy_mode=True)
    return {k: v.contiguous().to(dtype) for k, v in training_to_release(lazy).items()}


def checkpoint_weights(step_dir: Path, weights: Weights, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Release-keyed weights of a step folder, checked against the architecture of its meta.json."""
    if weights == "ema":
        state = {k: v.to(dtype) for k, v in training_to_release(consolidate_ema(step_dir)).items()}
    elif weights == "raw":
        state = raw_weights(step_dir, dtype)
    else:
        raise ValueError(f"weights={weights!r}; valid values: ema, raw")
    with torch.device("meta"):
        expected = build_model(ModelArgs.from_dict(read_meta(step_dir)["model_args"])).state_dict()
    check_release_keys(state, {k: v.shape for k, v in expected.items()}, f"{step_dir} ({weights} weights)")
    return state


def export_release(checkpoint: str | os.PathLike, out_dir: str | os.PathLike, weights: Weights = "ema",
                   dtype: str = "bf16", max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                   sampler: dict[str, Any] | None = None) -> Path:
    """Write a release folder from a training checkpoint (step folder or run folder); returns the folder."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}; valid values: {', '.join(DTYPES)}")
    step_dir = resolve_checkpoint(checkpoint)
    cfg = release_config(step_dir, weights, dtype, sampler)
    state = checkpoint_weights(step_dir, weights, DTYPES[dtype])
    return save_release(state, cfg, out_dir, max_shard_bytes)


def load_training_model(checkpoint: str | os.PathLike, weights: Weights = "ema",
                        device: str | torch.device = "cpu") -> tuple[PixelDiT, ReleaseConfig]:
    """(model in eval mode, ReleaseConfig) straight from a training checkpoint, as ``from_pretrained`` does."""
    step_dir = resolve_checkpoint(checkpoint)
    cfg = release_config(step_dir, weights, "fp32")
    model = build_model(cfg.args())
    model.load_state_dict(checkpoint_weights(step_dir, weights, torch.float32), strict=True)
    return model.to(device).eval(), cfg


def is_universal_checkpoint(path: str | os.PathLike) -> bool:
    """True for a folder written by ``to_universal`` (DeepSpeed universal layout: a ``zero/`` folder)."""
    p = Path(path)
    return (p / "zero").is_dir() and (p / "meta.json").exists()


def to_universal(checkpoint: str | os.PathLike, out_dir: str | os.PathLike | None = None, workers: int = 1) -> Path:
    """Convert a step folder (or a run folder's latest) to DeepSpeed's universal checkpoint; returns its folder."""
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    step_dir = resolve_checkpoint(checkpoint)
    if is_universal_checkpoint(step_dir):
        raise ValueError(f"{step_dir} is already a universal checkpoint")
    out = Path(out_dir) if out_dir else step_dir.with_name(UNIVERSAL_PREFIX + step_dir.name)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    ds_to_universal(Namespace(input_folder=str(step_dir), output_folder=str(tmp), num_extract_workers=workers,
                              num_merge_workers=workers, keep_temp_folder=False, strict=True,
                              inject_missing_state=True))
    # ds_to_universal names its output in "latest_universal" beside it; we load by explicit tag instead
    pointer = tmp.parent / "latest_universal"
    if pointer.exists() and pointer.read_text().strip() == tmp.name:
        pointer.unlink()
    for f in step_dir.iterdir():  # our per-rank files: EMA (re-partitioned on load) and RNG (restored if present)
        if f.is_file() and (f.name.startswith(EMA_FILE.split("{")[0]) or f.name.startswith("rng_rank")):
            shutil.copy2(f, tmp / f.name)
    meta = read_meta(step_dir)
    meta.update(universal=True, source=str(step_dir), source_world_size=meta.get("world_size"))
    write_text_atomic(tmp / "meta.json", json.dumps(meta, indent=2, sort_keys=True))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def untie_optimizer_steps(optimizer: torch.optim.Optimizer) -> int:
    """Give every parameter state its own ``step`` tensor; returns how many were shared.

    DeepSpeed 0.19's ZeRO-3 universal load stores ONE step tensor in the state of every parameter group, and
    torch's AdamW increments each state's step in place, so with our 2 groups (decay / no decay) the step
    advanced by 2 per optimizer step (measured: 3 -> 5), skewing Adam's bias correction. Call it on
    ``engine.optimizer.optimizer`` right after loading a universal checkpoint.
    """
    seen: set[int] = set()
    shared = 0
    for state in optimizer.state.values():
        step = state.get("step")
        if isinstance(step, torch.Tensor):
            if id(step) in seen:
                state["step"] = step.clone()
                shared += 1
            else:
                seen.add(id(step))
    return shared
