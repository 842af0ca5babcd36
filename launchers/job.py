"""What runs inside a submitted job: distributed environment from SLURM/submitit, then the trainer.

Every task of the job (one per GPU; SLURM starts them with ``srun``, the local executor with its controller)
runs ``TrainJob.__call__``:

1. set RANK / LOCAL_RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT from ``submitit.JobEnvironment``;
2. replace submitit's USR2 handler by the trainer's ``StopFlag`` (``pixeldit.train.signals``), which only
   raises a flag (submitit's own handler would pickle the callable and requeue at once, from inside the
   signal handler, in the middle of a step); SIGTERM keeps submitit's handler (there it means "cancelled");
3. ``run_training(cfg, stop_requested=flag)``: the trainer all-reduces the flag at the next step boundary,
   every rank saves the DeepSpeed checkpoint together, and it returns ``status="stopped"``;
4. after a stop, if the job was requeued fewer than ``max_requeues`` times, it is requeued (SLURM: rank 0
   runs ``scontrol requeue``; local executor: every task exits with submitit's requeue code) and every task
   leaves without a submitit result, so the job is not "done";
5. the requeued job runs the same pickled ``TrainJob``; the trainer resumes from
   ``{run_dir}/checkpoints/latest`` on disk, so no checkpoint path is frozen into the pickle.

The job id and attempt (``PIXELDIT_JOB_ID``, ``PIXELDIT_JOB_ATTEMPT``: SLURM's restart count, else the
requeues so far) go into the trainer's run-folder lock, so a requeued job takes over the lock its earlier
attempt left behind after a hard kill, on any host (``pixeldit.train.run_lock``).

The requeue count of a job lives next to its logs (``{submission folder}/{job_id}_requeues.json``): it is per
job, survives the requeue, and a new submission of the same run starts again from zero.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from submitit import JobEnvironment
from submitit.local.local import LOCAL_REQUEUE_RETURN_CODE  # a task exiting with it makes the controller rerun the job

from pixeldit.storage import write_text_atomic
from pixeldit.train.signals import StopFlag

from .config import LaunchConfig

# what SLURM sends --signal-delay-s before the limit (sbatch --signal=USR2@delay; submitit's choice, USR2
# unless SUBMITIT_PREEMPT_SIGNAL says otherwise)
PREEMPT_SIGNAL = getattr(signal, "SIG" + JobEnvironment.USR_SIG)
PORT_BASE, PORT_SPAN = 20000, 20000


class Requeued(SystemExit):
    """Leave the task without a submitit result after a saved stop (the job was requeued).

    A ``SystemExit`` on purpose: submitit's ``process_job`` pickles a result for ``Exception`` only, so the
    job stays unfinished and the requeued run writes the result.
    """


def requeue_count_path(folder: str | Path, job_id: str) -> Path:
    return Path(folder) / f"{job_id}_requeues.json"


def read_requeues(folder: str | Path, job_id: str) -> int:
    path = requeue_count_path(folder, job_id)
    return int(json.loads(path.read_text())["requeues"]) if path.exists() else 0


def write_requeues(folder: str | Path, job_id: str, count: int) -> None:
    path = requeue_count_path(folder, job_id)
    write_text_atomic(path, json.dumps({"requeues": count}))


def port_from_job_id(job_id: str | int) -> int:
    """A port every task of one job derives alike; jobs (array tasks too) have distinct numeric SLURM ids."""
    digits = "".join(ch for ch in str(job_id) if ch.isdigit()) or "0"
    return PORT_BASE + int(digits) % PORT_SPAN


def set_distributed_env(launch: LaunchConfig) -> dict[str, str]:
    """RANK/LOCAL_RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT from submitit's JobEnvironment (SLURM or local).

    MASTER_ADDR is the job's first host; MASTER_PORT is ``launch.master_port`` or derived from the raw job id
    (SLURM_JOB_ID is unique per array task, so array tasks sharing a node get different ports).
    """
    env = JobEnvironment()
    hosts = env.hostnames if env.cluster == "slurm" else []
    values = {
        "RANK": str(env.global_rank),
        "LOCAL_RANK": str(env.local_rank),
        "WORLD_SIZE": str(env.num_tasks),
        "LOCAL_WORLD_SIZE": str(env.num_tasks // max(1, env.num_nodes)),
        "MASTER_ADDR": hosts[0] if hosts else "127.0.0.1",
        "MASTER_PORT": str(launch.master_port or port_from_job_id(env.raw_job_id)),
    }
    os.environ.update(values)
    return values


@dataclass
class TrainJob:
    """The submitit callable: ``run_training`` of a run config, with launcher-managed preemption.

    ``config_path`` is the run config saved in the submission folder (overrides applied, run_dir absolute).
    """

    config_path: str
    launch: LaunchConfig
    evals: dict[str, Any] | None = None  # launchers.eval_jobs.EvalJobConfig.to_dict(): eval jobs every K checkpoints

    def __call__(self) -> dict[str, Any]:
        os.environ.update(self.launch.env)
        os.environ.setdefault("OMP_NUM_THREADS", str(self.launch.cpus_per_task))
        stop = StopFlag().install([PREEMPT_SIGNAL])
        dist_env = set_distributed_env(self.launch)
        env = JobEnvironment()
        folder = Path(os.environ["SUBMITIT_FOLDER"])  # set by submitit for every task
        requeues = read_requeues(folder, env.job_id)  # read before training: every rank decides alike
        from pixeldit.train.config import load_config
        from pixeldit.train.run_lock import JOB_ATTEMPT_VAR, JOB_ID_VAR
        from pixeldit.train.trainer import run_training

        os.environ[JOB_ID_VAR] = str(env.job_id)
        os.environ[JOB_ATTEMPT_VAR] = os.environ.get("SLURM_RESTART_COUNT") or str(requeues)
        cfg = load_config(self.config_path, [])
        print(f"[launcher] job {env.job_id} rank {dist_env['RANK']}/{dist_env['WORLD_SIZE']} master "
              f"{dist_env['MASTER_ADDR']}:{dist_env['MASTER_PORT']}, requeues so far {requeues}", flush=True)
        hook = None
        if self.evals is not None and env.global_rank == 0:
            from .eval_jobs import EvalJobConfig, EvalScheduler

            hook = EvalScheduler(cfg.run_dir, EvalJobConfig(**self.evals), cfg.checkpoint.every, cfg.total_steps)
        result = run_training(cfg, stop_requested=stop, on_checkpoint=hook)
        summary = {"status": result.status, "step": result.step, "stage": result.stage,
                   "checkpoint": result.checkpoint, "requeues": requeues, "job_id": env.job_id}
        if result.status == "stopped":
            if requeues >= self.launch.max_requeues:
                summary["status"] = "stopped: max requeues reached (submit the run again to continue)"
            else:
                self._requeue(env, folder, requeues + 1)
        return summary

    def _requeue(self, env: Any, folder: Path, count: int) -> None:
        """Requeue the job after the saved stop; every task leaves without a result."""
        if env.global_rank == 0:
            write_requeues(folder, env.job_id, count)
            print(f"[launcher] requeueing job {env.job_id} ({count}/{self.launch.max_requeues})", flush=True)
        if self.launch.cluster == "slurm":
            if env.global_rank == 0:
                # raw id: for an array task "A_T" scontrol also accepts the task's own SLURM_JOB_ID
                subprocess.check_call(["scontrol", "requeue", str(env.raw_job_id)], timeout=60)
            # exit code 0: a non-zero exit of one task could make srun (KillOnBadExit) kill rank 0 mid-requeue
            raise Requeued(0)
        raise Requeued(LOCAL_REQUEUE_RETURN_CODE)  # the local controller restarts every task
