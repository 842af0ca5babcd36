"""Atomic, resumable checkpoints of a DeepSpeed run.

Layout (contracts.md)::

    {run_dir}/checkpoints/step_{N:08d}/      DeepSpeed model + optimizer states (ZeRO partitions),
                                             ema_rank{r}.pt, rng_rank{r}.pt, meta.json
    {run_dir}/checkpoints/latest             text file holding the name of the newest complete step folder

Writing order, so that a crash at any point leaves the previous checkpoint usable:
 1. every rank writes into ``step_{N}.tmp/`` (DeepSpeed states, its RNG, its EMA part);
 2. barrier; rank 0 writes ``meta.json`` and renames ``step_{N}.tmp`` -> ``step_{N}``;
 3. rank 0 replaces ``latest`` atomically (tmp file + rename) LAST, then deletes all but the newest ``keep``.
A ``*.tmp`` folder is never read and is removed by the next save. The file system must be shared by all
ranks (as DeepSpeed checkpoints need anyway).
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

LATEST = "latest"
META = "meta.json"
RNG_FILE = "rng_rank{rank:05d}.pt"
STEP_PREFIX = "step_"


def step_dirname(step: int) -> str:
    return f"{STEP_PREFIX}{step:08d}"


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


class CheckpointManager:
    """Saves/loads step folders under ``{run_dir}/checkpoints`` and keeps the newest ``keep``."""

    def __init__(self, run_dir: str | os.PathLike, keep: int, rank: int = 0, world_size: int = 1):
        self.root = Path(run_dir) / "checkpoints"
        self.keep, self.rank, self.world_size = keep, rank, world_size

    def latest(self) -> Path | None:
        """The newest complete step folder named by ``latest``, or None when there is none."""
        pointer = self.root / LATEST
        if not pointer.exists():
            return None
        name = pointer.read_text().strip()
        path = self.root / name
        if not name.startswith(STEP_PREFIX) or not (path / META).exists():
            raise FileNotFoundError(f"{pointer} names {name!r}, which is not a complete checkpoint folder "
                                    f"(no {path / META}); remove {pointer} to start over or fix it by hand")
        return path

    def save(self, engine, step: int, client_state: dict[str, Any], meta: dict[str, Any], ema=None) -> Path:
        """Collective: every rank must call it. Returns the final step folder."""
        name = step_dirname(step)
        final, tmp = self.root / name, self.root / f"{name}.tmp"
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
        _barrier()
        engine.save_checkpoint(str(self.root), tag=tmp.name, client_state=client_state, save_latest=False)
        torch.save(rng_state(), tmp / RNG_FILE.format(rank=self.rank))
        if ema is not None:
            ema.save(tmp)
        _barrier()
        if self.rank == 0:
            write_text_atomic(tmp / META, json.dumps({**meta, "step": step}, indent=2, sort_keys=True))
            if final.exists():  # the same step saved again (e.g. stop requested right after a save)
                shutil.rmtree(final)
            os.replace(tmp, final)
            write_text_atomic(self.root / LATEST, name)
            self._prune()
        _barrier()
        return final

    def _prune(self) -> None:
        done = sorted(p for p in self.root.glob(f"{STEP_PREFIX}*") if p.is_dir() and not p.name.endswith(".tmp"))
        for old in done[: max(0, len(done) - self.keep)]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in self.root.glob(f"{STEP_PREFIX}*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)

    def load(self, engine, path: Path, load_optimizer: bool = True, ema=None, restore_rng: bool = True) -> dict:
        """Load DeepSpeed states (+ EMA, + this rank's RNG) from a step folder; returns the client state."""
        load_path, client_state = engine.load_checkpoint(
            str(path.parent), tag=path.name, load_optimizer_states=load_optimizer,
            load_lr_scheduler_states=False, load_module_strict=True,
        )
        if load_path is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint {path}")
        if ema is not None:
            ema.load(path)
        rng_path = path / RNG_FILE.format(rank=self.rank)
        if restore_rng and rng_path.exists():
            set_rng_state(torch.load(rng_path, map_location="cpu", weights_only=False))
        return client_state or {}


def read_meta(checkpoint_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(checkpoint_dir) / META
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: not a complete checkpoint folder")
    return json.loads(path.read_text())


def consolidate_model(checkpoint_dir: str | os.PathLike, prefix: str = "model.") -> dict[str, torch.Tensor]:
    """Full fp32 weights of the model (keys of PixelDiT.state_dict()) from a step folder, any ZeRO stage and
    world size (DeepSpeed's zero_to_fp32 on the fp32 master partitions). ``prefix`` selects the submodule of
    the TrainModule ("model." for PixelDiT, "projector." for the REPA projector)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    path = Path(checkpoint_dir)
    read_meta(path)  # complete checkpoint only
    full = get_fp32_state_dict_from_zero_checkpoint(str(path.parent), tag=path.name)
    return {k[len(prefix):]: v for k, v in full.items() if k.startswith(prefix)}

