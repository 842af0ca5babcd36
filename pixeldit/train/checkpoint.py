"""Atomic, resumable checkpoints of a DeepSpeed run (the on-disk names: ``pixeldit.run_folder``).

Writing order, so that a crash at any point leaves the previous checkpoint usable:
 1. every rank writes into the staging folder ``run_folder.staging_dirname(N)`` (DeepSpeed states, its RNG,
    its EMA part);
 2. barrier; rank 0 writes ``meta.json`` and renames the staging folder to ``step_{N:08d}``;
 3. rank 0 replaces ``latest`` atomically LAST, then deletes all but the newest ``keep`` step folders and
    what an interrupted save left behind (``run_folder.is_save_leftover``), which is never read.
The file system must be shared by all ranks (as DeepSpeed checkpoints need anyway).
"""
from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from pixeldit import run_folder
from pixeldit.storage import replace_dir


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
        self.root = run_folder.checkpoints_dir(run_dir)
        self.keep, self.rank, self.world_size = keep, rank, world_size

    def latest(self) -> Path | None:
        """The newest complete step folder named by ``latest``, or None when there is none."""
        return run_folder.read_latest(self.root)

    def save(self, engine, step: int, client_state: dict[str, Any], meta: dict[str, Any], ema=None) -> Path:
        """Collective: every rank must call it. Returns the final step folder."""
        final, tmp = self.root / run_folder.step_dirname(step), self.root / run_folder.staging_dirname(step)
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
        _barrier()
        engine.save_checkpoint(str(self.root), tag=tmp.name, client_state=client_state, save_latest=False)
        torch.save(rng_state(), tmp / run_folder.RNG_FILE.format(rank=self.rank))
        if ema is not None:
            ema.save(tmp)
        _barrier()
        if self.rank == 0:
            run_folder.write_meta(tmp, {**meta, "step": step})
            replace_dir(tmp, final)  # the same step saved again (e.g. stop right after a save) replaces it
            run_folder.write_latest(self.root, final)
            self._prune()
        _barrier()
        return final

    def _prune(self) -> None:
        done = run_folder.step_dirs(self.root)
        for old in done[: max(0, len(done) - self.keep)]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in self.root.iterdir():
            if run_folder.is_save_leftover(stale.name):
                if stale.is_dir():
                    shutil.rmtree(stale, ignore_errors=True)
                else:
                    stale.unlink(missing_ok=True)

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
        rng_path = path / run_folder.RNG_FILE.format(rank=self.rank)
        if restore_rng and rng_path.exists():
            set_rng_state(torch.load(rng_path, map_location="cpu", weights_only=False))
        return client_state or {}


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
