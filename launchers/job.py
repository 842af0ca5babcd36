"""What runs inside a submitted job: distributed environment from SLURM/submitit, then the trainer.

Preemption / time limit (SLURM sends USR2 ``signal_delay_s`` before the end, or ``scancel --signal=USR2``):

1. the USR2 handler only raises a flag (submitit's own handler, which would checkpoint the pickle and
   requeue at once from inside the signal handler, is replaced);
2. ``run_training`` all-reduces the flag at the next step boundary, every rank saves the DeepSpeed
   checkpoint together, and it returns ``status="stopped"``;
3. if fewer than ``max_requeues`` requeues happened, the job is requeued (SLURM: rank 0 runs
   ``scontrol requeue``; local executor: every task exits with submitit's requeue code) and every task
   exits without writing a submitit result, so the job is not "done";
4. the requeued job runs the same pickled ``TrainJob``, which reads the run's config and resumes from
   ``{run_dir}/checkpoints/latest`` on disk: no checkpoint path is frozen into the pickle.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from submitit.local.local import LOCAL_REQUEUE_RETURN_CODE  # a task exiting with it makes the controller rerun the job

from .config import LaunchConfig

PREEMPT_SIGNAL = signal.SIGUSR2


def requeue_state_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / "launcher" / "requeues.json"


def read_requeues(run_dir: str | Path) -> int:
    path = requeue_state_path(run_dir)
    return json.loads(path.read_text())["requeues"] if path.exists() else 0


def write_requeues(run_dir: str | Path, count: int) -> None:
    path = requeue_state_path(run_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"requeues": count}))
    tmp.replace(path)


def port_from_job_id(job_id: str) -> int:
    """A port every task of one job derives alike (array jobs: '123_4' -> from both parts)."""
    digits = "".join(ch for ch in str(job_id) if ch.isdigit()) or "0"
    return 20000 + int(digits) % 20000


def set_distributed_env(launch: LaunchConfig) -> dict[str, str]:
    """RANK/LOCAL_RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT from submitit's JobEnvironment (SLURM or local)."""
    import submitit

    env = submitit.JobEnvironment()
    values = {
        "RANK": str(env.global_rank),
        "LOCAL_RANK": str(env.local_rank),
        "WORLD_SIZE": str(env.num_tasks),
        "LOCAL_WORLD_SIZE": str(env.num_tasks // max(1, env.num_nodes)),
        "MASTER_ADDR": env.hostnames[0] if env.hostnames else "127.0.0.1",
        "MASTER_PORT": str(launch.master_port or port_from_job_id(env.job_id)),
    }
    os.environ.update(values)
    return values


@dataclass
class TrainJob:
    """The submitit callable: ``run_training`` of a run config with launcher-managed preemption."""

    config_path: str  # the run config YAML saved in the run folder at submission
    launch: LaunchConfig
    overrides: list[str] = field(default_factory=list)

    def __call__(self) -> dict[str, Any]:
        os.environ.update(self.launch.env)
        stop = threading.Event()
        signal.signal(PREEMPT_SIGNAL, lambda signum, frame: stop.set())  # only raise a flag
        set_distributed_env(self.launch)
        from pixeldit.train.config import load_config
        from pixeldit.train.trainer import run_training

        cfg = load_config(self.config_path, self.overrides)
        requeues_before = read_requeues(cfg.run_dir)  # read before training: every rank decides alike
        result = run_training(cfg, stop_requested=stop.is_set)
        summary = {"status": result.status, "step": result.step, "stage": result.stage,
                   "checkpoint": str(result.checkpoint) if result.checkpoint else None,
                   "requeues": requeues_before}
        if result.status == "stopped":
            if requeues_before >= self.launch.max_requeues:
                summary["status"] = "stopped: max requeues reached"  # submitting again resumes the run
            else:
                self._requeue(cfg.run_dir, requeues_before + 1)
        return summary

    def _requeue(self, run_dir: str, count: int) -> None:
        """Requeue the job after the saved stop and exit without a submitit result (the job is not done)."""
        import submitit

        env = submitit.JobEnvironment()
        if env.global_rank == 0:
            write_requeues(run_dir, count)
            print(f"[pixeldit] requeueing job {env.job_id} ({count}/{self.launch.max_requeues})", flush=True)
        if self.launch.cluster == "slurm":
            if env.global_rank == 0:
                subprocess.check_call(["scontrol", "requeue", str(env.job_id)], timeout=60)
            sys.exit(-1)  # SystemExit is not caught by submitit: no result pickle
        sys.exit(LOCAL_REQUEUE_RETURN_CODE)  # the local controller restarts every task
