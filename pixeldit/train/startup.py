"""What a training run does before its first stage, on every rank: join the process group
(``init_distributed``), take the run-folder lock on rank 0 and tell every rank the outcome (``take_run_lock``),
check every shard of the remaining stages on rank 0 and stop every rank with the same error (``check_data``);
and the metadata saved beside each checkpoint (``checkpoint_meta``). Used by ``trainer.run_training``."""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from pixeldit.cluster import free_port
from pixeldit.errors import USER_ERRORS, DataError

from .conditioning import resolved_system_prompt
from .config import RunConfig
from .run_lock import RunFolderLocked, RunLock
from .sources import check_stage_data, damaged_shards_error


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    owns_group: bool  # this call created the process group (and destroys it at the end)


def init_distributed(timeout: datetime.timedelta | None = None) -> DistInfo:
    """Join the process group from RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT (single rank if unset);
    ``timeout``: of its collectives (None: DeepSpeed's default, 10 minutes)."""
    import deepspeed
    import deepspeed.comm

    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    owns = not dist.is_initialized()
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    if owns:
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo", verbose=False,
                                   **({"timeout": timeout} if timeout is not None else {}))
    elif not deepspeed.comm.is_initialized():
        deepspeed.init_distributed(dist_init_required=False, verbose=False)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, owns)


def checkpoint_meta(cfg: RunConfig, stage_index: int, world_size: int) -> dict[str, Any]:
    stage = cfg.stages[stage_index]
    return {"stage_index": stage_index, "stage_name": stage.name, "model_args": cfg.model.args().to_dict(),
            "resolution": stage.resolution, "shift": cfg.stage_objective(stage).shift, "buckets": stage.buckets,
            "bucket_align": stage.bucket_align, "text_encoder": cfg.conditioning.text_encoder,
            "system_prompt": resolved_system_prompt(cfg, cfg.model.args()), "zero": cfg.deepspeed.zero,
            "precision": cfg.deepspeed.precision, "world_size": world_size,
            "ema_decay": cfg.ema_decay, "optimizer": cfg.optim.name, "init_from": cfg.checkpoint.init_from}


def take_run_lock(run_dir: Path, rank: int) -> tuple[RunLock | None, str | None]:
    """Rank 0 takes the run-folder lock; every rank gets the outcome and raises the same error, so no rank
    starts work on a folder another trainer holds. Returns (the lock on rank 0 else None, a takeover note)."""
    lock, outcome, failure = None, [None], None
    if rank == 0:
        try:
            lock = RunLock(run_dir)
            outcome = [("ok", lock.acquire())]
        except Exception as err:  # noqa: BLE001 (sent to every rank first: all stop together)
            failure = err
            outcome = [("locked" if isinstance(err, RunFolderLocked) else "error", str(err))]
    dist.broadcast_object_list(outcome, src=0)
    if outcome[0][0] != "ok":  # every rank holds the outcome before any rank raises (and its launcher kills the rest)
        dist.barrier()
    if failure is not None:
        raise failure
    kind, text = outcome[0]
    if kind == "locked":
        raise RunFolderLocked(text)
    if kind == "error":
        raise RuntimeError(f"rank 0 could not take the run-folder lock: {text}")
    return lock, text


def check_data(cfg: RunConfig, first_stage: int, rank: int) -> dict[int, dict]:
    """{stage: {root: damaged shards}} for the stages from ``first_stage`` on: rank 0 lists every root once
    and broadcasts; every rank raises the same error (a damaged shard, an unreachable bucket) before any
    engine is built."""
    result: list[Any] = [None]
    failure: Exception | None = None
    if rank == 0:
        try:
            by_root: dict[str, Any] = {}
            out: dict[int, dict] = {}
            for i in range(first_stage, len(cfg.stages)):
                done = {r: by_root[r] for r in (s.path for s in cfg.stages[i].data_sources()) if r in by_root}
                fresh = check_stage_data(cfg, i, skip=set(done))
                by_root.update(fresh)
                out[i] = {**done, **fresh}
            result = [("ok", out)]
        except Exception as err:  # noqa: BLE001 (handed to every rank first: all stop with the same error)
            failure = err
            kind = type(err) if isinstance(err, USER_ERRORS) else RuntimeError
            message = f"{err}" if kind is not RuntimeError else f"rank 0 failed checking the data: {err}"
            result = [("error", kind, message)]
    dist.broadcast_object_list(result, src=0)
    if result[0][0] != "ok":  # as in take_run_lock: all ranks have the error before one raises it
        dist.barrier()
    if failure is not None:
        raise failure
    if result[0][0] == "error":
        raise result[0][1](result[0][2])
    problems = result[0][1]
    for i, stage_problems in problems.items():
        error = damaged_shards_error(cfg, i, stage_problems)
        if error and not cfg.data.skip_damaged_shards:
            raise DataError(error)
    return problems
