"""DeepSpeed ZeRO checkpoints -> full weights, and -> DeepSpeed's universal checkpoint.

The only module of ``pixeldit.release`` that uses deepspeed, and only inside its functions, so loading a
release never imports it.

- ``zero_fp32_state``: the fp32 master weights of the whole training module (``model.*``, ``projector.*``)
  from the ZeRO partitions of any stage and world size (DeepSpeed's ``zero_to_fp32``); ``lazy`` materialises
  one tensor at a time.
- ``raw_weights``: the model part of it, in release keys, cast to a dtype; ``consolidate_model``: one
  submodule (the model, or the REPA projector) in fp32.
- ``to_universal(checkpoint)`` runs ``deepspeed.checkpoint.ds_to_universal`` into
  ``checkpoints/universal_step_N`` (outside the ``step_*`` names that keep-k pruning deletes), copying
  meta.json (+ ``universal: true``), the EMA files and the RNG files along. Resume it on any number of ranks
  in a new run folder with ``checkpoint.resume_from=... checkpoint.load_universal=true``; the trainer
  re-partitions the EMA and rescales the loader position. AdamW runs only (meta.json ``optimizer``): CAME's
  row/column statistics have no universal form.
"""
from __future__ import annotations

import os
import shutil
from argparse import Namespace
from pathlib import Path
from typing import Any

import torch

from pixeldit import run_folder
from pixeldit.errors import CheckpointError
from pixeldit.storage import replace_dir, tmp_path

from .key_map import TRAINING_PREFIX, training_only, training_to_release


def zero_fp32_state(step_dir: Path, lazy: bool = False) -> dict[str, Any]:
    """{training key: fp32 tensor} of a complete step folder (lazy: tensors materialise on ``.contiguous()``)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    run_folder.read_meta(step_dir)  # complete checkpoints only
    return get_fp32_state_dict_from_zero_checkpoint(str(step_dir.parent), tag=step_dir.name, lazy_mode=lazy)


def raw_weights(step_dir: Path, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The fp32 master weights of the model (release keys), one tensor at a time, cast to ``dtype``."""
    return {k: v.contiguous().to(dtype) for k, v in training_to_release(zero_fp32_state(step_dir, lazy=True)).items()}


def consolidate_model(step_dir: str | os.PathLike, prefix: str = TRAINING_PREFIX) -> dict[str, torch.Tensor]:
    """Full fp32 weights of one submodule of the training module from a step folder of any ZeRO stage and
    world size: ``"model."`` (keys of ``PixelDiT.state_dict()``) or ``"projector."`` (the REPA projector)."""
    return training_only(zero_fp32_state(Path(step_dir)), prefix)


def to_universal(checkpoint: str | os.PathLike, out_dir: str | os.PathLike | None = None, workers: int = 1,
                 verify: str = "size") -> Path:
    """Convert a step folder (or a run folder's latest) to DeepSpeed's universal checkpoint; returns its folder.
    ``verify``: the checks of the checkpoint first (``run_folder.checkpoint_problem``: "size" or "full")."""
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    step_dir = run_folder.resolve_checkpoint(checkpoint, verify=verify)
    if run_folder.is_universal_checkpoint(step_dir):
        raise CheckpointError(f"{step_dir} is already a universal checkpoint: resume from it directly")
    optimizer = run_folder.read_meta(step_dir).get("optimizer", "adamw")
    if optimizer != "adamw":
        raise CheckpointError(f"{step_dir} was trained with optimizer {optimizer!r}, whose factored statistics have "
                              f"no universal-checkpoint form (universal checkpoints: adamw runs only); resume it on "
                              f"the world size it was saved with, or release its weights and start a new run from "
                              f"them (checkpoint.init_from)")
    out = Path(out_dir) if out_dir else step_dir.with_name(run_folder.universal_dirname(step_dir))
    tmp = Path(tmp_path(out))
    try:
        ds_to_universal(Namespace(input_folder=str(step_dir), output_folder=str(tmp), num_extract_workers=workers,
                                  num_merge_workers=workers, keep_temp_folder=False, strict=True,
                                  inject_missing_state=True))
        # ds_to_universal names its output in "latest_universal" beside it; we load by explicit tag instead
        pointer = tmp.parent / "latest_universal"
        if pointer.exists() and pointer.read_text().strip() == tmp.name:
            pointer.unlink()
        for f in run_folder.rank_files(step_dir):  # EMA (re-partitioned on load) and RNG (restored if present)
            shutil.copy2(f, tmp / f.name)
        meta = run_folder.read_meta(step_dir)
        meta.update(universal=True, source=str(step_dir), source_world_size=meta.get("world_size"))
        run_folder.write_meta(tmp, meta)
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
