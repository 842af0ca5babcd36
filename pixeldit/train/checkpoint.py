"""Atomic, resumable, checksummed checkpoints of a DeepSpeed run (the on-disk names: ``pixeldit.run_folder``).

Writing order, so that a crash at any point leaves the previous checkpoint usable:
 1. every rank writes into the staging folder ``run_folder.staging_dirname(N)`` (DeepSpeed states, its RNG,
    its EMA part);
 2. barrier; rank 0 writes ``meta.json``; every rank hashes its share of the files (``hash_shares``: a file
    whose name carries a rank number goes to that rank, which has just written it and reads it from its page
    cache; the rest to rank 0); rank 0 gathers the digests, writes ``manifest.json`` (size + SHA-256 of every
    file), checks that it still holds the run-folder lock, and renames the staging folder to ``step_{N:08d}``;
 3. rank 0 replaces ``latest`` atomically LAST, then prunes: only step folders OLDER than the one just written
    are candidates (by step number), the newest ``keep - 1`` of them stay, and neither the folder just written
    nor the one ``latest`` names is ever deleted (newer folders, e.g. of an abandoned longer run, are left
    alone); what an interrupted save left behind (``run_folder.is_save_leftover``) is removed.
The file system must be shared by all ranks (as DeepSpeed checkpoints need anyway).

Resuming (``resume_point``, collective): ``run_folder.find_latest`` with the checks ``checkpoint.verify`` asks
for ("size": rank 0 stats every file; "full": every rank hashes its share); a damaged ``latest`` or folder
falls back to the newest intact one (one line says so) unless ``checkpoint.fallback`` is off.
"""
from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from pixeldit import run_folder
from pixeldit.errors import CheckpointError
from pixeldit.storage import replace_dir

from .fault_hooks import save_delay

# the rank number in a file name: DeepSpeed's zero_pp_rank_{r}_..., our ema_rank{r:05d} / rng_rank{r:05d}
_RANK_IN_NAME = re.compile(r"(?:zero_pp_rank_|_rank)(\d+)")


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


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _broadcast(obj: Any, rank: int) -> Any:
    """``obj`` of rank 0 on every rank."""
    if not _distributed():
        return obj
    box = [obj if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _outcome(outcome: tuple, failure: Exception | None) -> tuple[Path | None, str | None]:
    """("done", path, note) -> (path, note); ("error", message) -> rank 0 re-raises its own exception, the
    other ranks a ``CheckpointError`` with its message."""
    if failure is not None:
        raise failure
    if outcome[0] == "error":
        raise CheckpointError(outcome[1])
    return outcome[1], outcome[2]


def hash_shares(files: list[str], world_size: int) -> list[list[str]]:
    """Which rank hashes which file: the rank named in the file name (it wrote the file, so it reads it from
    its page cache, not across the network), every other file rank 0."""
    shares: list[list[str]] = [[] for _ in range(world_size)]
    for name in files:
        m = _RANK_IN_NAME.search(Path(name).name)
        owner = int(m.group(1)) if m else 0
        shares[owner if owner < world_size else 0].append(name)
    return shares


class CheckpointManager:
    """Saves/loads step folders under ``{run_dir}/checkpoints``; keeps the newest ``keep`` up to the last save.

    ``verify`` / ``fallback``: how ``resume_point`` checks ``latest`` and whether it falls back (module
    docstring); ``lock``: the run-folder lock (``run_lock.RunLock``) rank 0 checks before publishing a save.
    """

    def __init__(self, run_dir: str | os.PathLike, keep: int, rank: int = 0, world_size: int = 1,
                 verify: str = "size", fallback: bool = True, lock=None):
        if verify not in run_folder.VERIFY_MODES:
            raise ValueError(f"checkpoint.verify={verify!r}; valid values: {', '.join(run_folder.VERIFY_MODES)}")
        self.root = run_folder.checkpoints_dir(run_dir)
        self.keep, self.rank, self.world_size = keep, rank, world_size
        self.verify, self.fallback, self.lock = verify, fallback, lock

    def latest(self) -> Path | None:
        """The intact step folder named by ``latest`` (None without one); raises if it is damaged."""
        return run_folder.read_latest(self.root)

    def resume_point(self) -> tuple[Path | None, str | None]:
        """Collective: (step folder to resume from, one-line note when ``latest`` was damaged and another folder
        is used), the same on every rank; (None, None) for a new run. Raises ``CheckpointError`` on every rank
        when nothing usable is left (or ``fallback`` is off)."""
        if self.verify == "full" and _distributed():
            return self._resume_point_hashing()
        result: tuple = ()
        failure: Exception | None = None
        if self.rank == 0:
            try:
                result = ("done", *run_folder.find_latest(self.root, self.fallback, self.verify))
            except Exception as err:  # noqa: BLE001 (sent to every rank first: all stop together)
                failure, result = err, ("error", str(err))
        return _outcome(_broadcast(result, self.rank), failure)

    def _resume_point_hashing(self) -> tuple[Path | None, str | None]:
        """``resume_point`` with verify="full" on several ranks: rank 0 walks the candidates of ``find_latest``
        and every rank hashes its share of each candidate it is sent."""
        failure: Exception | None = None
        if self.rank == 0:
            outcome: tuple
            try:
                outcome = ("done", *run_folder.find_latest(self.root, self.fallback, check=self._check_together))
            except Exception as err:  # noqa: BLE001 (sent to every rank first: all stop together)
                failure, outcome = err, ("error", str(err))
            _broadcast(outcome, 0)
        else:
            while (outcome := _broadcast(None, self.rank))[0] == "check":
                self._check_together(Path(outcome[1]), outcome[2])
        return _outcome(outcome, failure)

    def _check_together(self, step_dir: Path, require_manifest: bool) -> str | None:
        """Collective part of ``_resume_point_hashing``: the problem of ``step_dir`` (None when intact)."""
        if self.rank == 0:
            _broadcast(("check", str(step_dir), require_manifest), 0)
            problem = run_folder.checkpoint_problem(step_dir, "size", require_manifest)
            files = run_folder.read_manifest(step_dir) if problem is None else None
        else:
            problem, files = None, None
        problem, files = _broadcast((problem, files), self.rank)
        if problem is None and files is not None:  # sizes are right: hash, each rank its share
            mine = hash_shares(sorted(files), self.world_size)[self.rank]
            found = run_folder.check_files(step_dir, {n: files[n] for n in mine}, full=True)
            gathered = [None] * self.world_size
            dist.all_gather_object(gathered, found)
            problem = next((p for p in gathered if p is not None), None)
        return problem

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
        # every rank lists the folder itself: it sees the files it wrote even where a shared file system
        # caches directory listings (NFS), and a file's share follows from its name alone
        mine = hash_shares(run_folder.checkpoint_files(tmp), self.world_size)[self.rank]
        digests = {name: run_folder.file_sha256(tmp / name) for name in mine}
        if _distributed():
            gathered = [None] * self.world_size if self.rank == 0 else None
            dist.gather_object(digests, gathered, dst=0)
        else:
            gathered = [digests]
        if self.rank == 0:
            run_folder.write_manifest(tmp, {k: v for part in gathered for k, v in part.items()})
            save_delay(step)  # a test hook (pixeldit.train.fault_hooks): a save interrupted before it is published
            if self.lock is not None:
                self.lock.check()  # another trainer took the run folder over: publish nothing
            replace_dir(tmp, final)  # the same step saved again (e.g. stop right after a save) replaces it
            run_folder.write_latest(self.root, final)
            self._prune(final)
        _barrier()
        return final

    def _prune(self, just_written: Path) -> None:
        """Delete the step folders older than ``just_written`` beyond the newest ``keep - 1`` of them (by step
        number; never ``just_written`` or the folder ``latest`` names), and the leftovers of interrupted saves."""
        try:
            named = run_folder.latest_name(self.root)
        except CheckpointError:
            named = None
        newest = run_folder.step_of(just_written)
        older = [d for d in run_folder.step_dirs(self.root) if run_folder.step_of(d) < newest and d.name != named]
        for old in older[: max(0, len(older) - (self.keep - 1))]:
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
            raise CheckpointError(f"DeepSpeed could not load the checkpoint {path}")
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
