"""What runs inside a submitted job: a supervisor per task, the trainer as its child process.

Every task of the job (one per GPU; SLURM starts them with ``srun``, the local executor with its controller)
runs ``TrainJob.__call__``, the task's *supervisor*:

1. set RANK / LOCAL_RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT from ``submitit.JobEnvironment``, the job id
   and attempt (``PIXELDIT_JOB_ID``, ``PIXELDIT_JOB_ATTEMPT``: SLURM's restart count, else the attempts so far;
   the trainer's run-folder lock uses them, so a later attempt takes over the lock a killed one left behind) and
   ``PIXELDIT_HEARTBEAT``; MASTER_PORT is checked free on rank 0's host and told to the other tasks
   (``launchers.rendezvous``);
2. start the trainer as a child process (``launchers.train_child``: ``run_training`` with the ``StopFlag`` on
   the preemption signal and, on rank 0, the eval-job hook) and watch it (``launchers.supervisor``): the
   preemption signal (USR2) is forwarded to it (it saves at the next step boundary and returns "stopped"), a
   child with no heartbeat for the watchdog's limit gets its Python stacks dumped into the submission folder
   and is killed;
3. write the task's attempt report (``launchers.attempts``: reason, exit code or signal, node) into the
   submission folder. A task of global rank > 0 then leaves: its summary when its trainer finished, else exit
   code 0 without a result (a non-zero exit could make srun kill rank 0 in the middle of its decision);
4. the global-rank-0 task waits (bounded: the watchdog limit plus ``REPORT_GRACE_S``) for every report and
   decides (``attempts.decide``): finished; a saved stop -> requeue while ``requeues < max_requeues``; a
   failure (a trainer killed by a signal, crashed, or hung) -> requeue while ``failures <= max_failures``,
   after a growing backoff (SLURM: ``scontrol update StartTime=now+N`` on the requeued job; local: a sleep),
   with any node that had a primary failure in two attempts added to the job's ``ExcNodeList``; with the
   budget spent (or a user error, which a restart repeats) the job fails with the reason (``JobFailed``).
   Each decision goes into the job's history ``{job_id}_requeues.json``; ``pixeldit-submit status`` shows it;
5. a requeued job runs the same pickled ``TrainJob``; the trainer resumes from ``{run_dir}/checkpoints/latest``
   on disk, so no checkpoint path is frozen into the pickle.

What is covered and what is not: a lost child (killed, OOM-killed, hung, crashed) on any node is handled by
its own supervisor and rank 0's decision. A lost *supervisor* is not watched by anyone in the job: its child
dies with it (``PR_SET_PDEATHSIG``), the peers' trainers then fail and report, and rank 0 decides without the
lost task's report once its wait runs out (counted as a failure, its node not blamed). If the rank-0 supervisor
itself (or its node) dies, nobody decides: the job's tasks end, and SLURM's own ``--requeue`` (submitit asks
for it) requeues the job only for a node failure, outside the failure budget and without backoff or
exclusion; otherwise the job ends FAILED without a final state in its history. A requeue done by SLURM or by
hand counts in SLURM's restart count, so attempt numbers (and report files) never collide. The local executor
restarts a job at most ``LOCAL_MAX_REQUEUES`` times in all (``LaunchConfig`` checks the two budgets against it)
and has no nodes to exclude.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from submitit import JobEnvironment
from submitit.local.local import LOCAL_REQUEUE_RETURN_CODE  # a task exiting with it makes the controller rerun the job

from pixeldit.train.heartbeat import HEARTBEAT_VAR, read_heartbeat
from pixeldit.train.signals import LOG_DIR_VAR

from .attempts import (TaskReport, decide, history_path, read_history, record_decision, wait_for_reports,
                       write_history, write_report)
from .config import LaunchConfig
from .rendezvous import agree_master_port, port_from_job_id
from .supervisor import PREEMPT_SIGNAL, Supervisor, WatchdogLimits, child_paths
from .train_child import command

__all__ = ["JobFailed", "PREEMPT_SIGNAL", "Requeued", "TrainJob", "port_from_job_id", "read_requeues",
           "requeue_count_path", "set_distributed_env", "write_requeues"]
REPORT_GRACE_S = 60.0  # rank 0 waits this long beyond the watchdog limit for the other tasks' reports


class Requeued(SystemExit):
    """Leave the task without a submitit result (the job was requeued, or another task decides).

    A ``SystemExit`` on purpose: submitit's ``process_job`` pickles a result for ``Exception`` only, so the
    job stays unfinished and the requeued run writes the result.
    """


class JobFailed(RuntimeError):
    """The job failed for good (failure budget spent, or a user error): rank 0's result is this error."""


def requeue_count_path(folder: str | Path, job_id: str) -> Path:
    return history_path(folder, job_id)


def read_requeues(folder: str | Path, job_id: str) -> int:
    return int(read_history(folder, job_id)["requeues"])


def write_requeues(folder: str | Path, job_id: str, count: int) -> None:
    write_history(folder, job_id, {**read_history(folder, job_id), "requeues": count})


def _ignore_sigterm() -> None:  # in a child between fork and exec: SIG_IGN survives the exec
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _ignore_late_preemption(signum: int, frame: object) -> None:
    os.write(2, b"[launcher] preemption signal after the trainer ended: ignored (the attempt's reports decide)\n")


def node_name() -> str:
    """The node this task runs on: SLURM's name for it (several slurmd may share one host), else the host."""
    return os.environ.get("SLURMD_NODENAME") or socket.gethostname()


def set_distributed_env(launch: LaunchConfig) -> dict[str, str]:
    """RANK/LOCAL_RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT from submitit's JobEnvironment (SLURM or local).

    MASTER_ADDR is the job's first host; MASTER_PORT is ``launch.master_port`` or derived from the raw job id
    (SLURM_JOB_ID is unique per array task, so array tasks sharing a node get different ports); ``TrainJob``
    then replaces a derived one by the port rank 0 agreed (``launchers.rendezvous``).
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
    """The submitit callable: the supervisor of one task (module docstring).

    ``config_path`` is the run config saved in the submission folder (overrides applied, run_dir absolute).
    """

    config_path: str
    launch: LaunchConfig
    evals: dict[str, Any] | None = None  # launchers.eval_jobs.EvalJobConfig.to_dict(): eval jobs every K checkpoints

    def __call__(self) -> dict[str, Any]:
        os.environ.update(self.launch.env)
        os.environ.setdefault("OMP_NUM_THREADS", str(self.launch.cpus_per_task))
        # submitit's own USR2 handler would requeue from inside the handler; the supervisor forwards the signal to
        # the trainer while it runs, and after it the reports decide
        signal.signal(PREEMPT_SIGNAL, _ignore_late_preemption)
        dist_env = set_distributed_env(self.launch)
        env = JobEnvironment()
        folder = Path(os.environ["SUBMITIT_FOLDER"])  # set by submitit for every task
        history = read_history(folder, env.job_id)  # read before training: every rank sees the same counts
        restarts = os.environ.get("SLURM_RESTART_COUNT") if self.launch.cluster == "slurm" else None
        attempt = int(restarts) if restarts else len(history["attempts"])
        rank, world = env.global_rank, env.num_tasks
        from pixeldit.train.run_lock import JOB_ATTEMPT_VAR, JOB_ID_VAR

        if not self.launch.master_port:  # rank 0 checks the derived port and tells the others the one to use
            port, note = agree_master_port(folder, str(env.job_id), str(env.raw_job_id), attempt, rank,
                                           self.launch.watchdog_startup_s)
            os.environ["MASTER_PORT"] = dist_env["MASTER_PORT"] = str(port)
            if note:
                print(f"[launcher] {note}", flush=True)
        paths = child_paths(folder, str(env.job_id), rank, attempt)
        child_env = {**os.environ, JOB_ID_VAR: str(env.job_id), JOB_ATTEMPT_VAR: str(attempt),
                     HEARTBEAT_VAR: str(paths.heartbeat), LOG_DIR_VAR: str(folder)}  # collective-timeout stacks
        print(f"[launcher] job {env.job_id} rank {dist_env['RANK']}/{dist_env['WORLD_SIZE']} master "
              f"{dist_env['MASTER_ADDR']}:{dist_env['MASTER_PORT']}, attempt {attempt}, requeues so far "
              f"{history['requeues']}, failures so far {history['failures']}", flush=True)
        limits = WatchdogLimits.from_launch(self.launch)
        sup = Supervisor(command(self.config_path, str(paths.result), str(paths.stacks), self.evals), child_env,
                         paths, limits, rank, node_name())
        out = sup.run()
        report = TaskReport(str(env.job_id), attempt, rank, node_name(), out.outcome, out.reason, out.exit_code,
                            out.signal, out.primary, out.step, out.stack_dump, certain=out.certain)
        write_report(folder, report)
        print(f"[launcher] attempt {attempt} rank {rank}: {out.reason}", flush=True)
        summary = {**(out.result or {}), "requeues": history["requeues"], "failures": history["failures"],
                   "job_id": env.job_id, "attempt": attempt}
        if rank != 0:
            if out.outcome == "finished" or (out.outcome == "stopped"
                                              and history["requeues"] >= self.launch.max_requeues):
                return summary  # rank 0 finishes (or stops) alike; submitit wants every task's result
            raise Requeued(0)
        if out.outcome == "cancelled":  # SLURM/the user is ending the job: no decision to make
            waited, reports = 0.0, {0: report}
        else:
            waited = limits.limit(read_heartbeat(paths.heartbeat)) + REPORT_GRACE_S
            reports = wait_for_reports(folder, str(env.job_id), attempt, world, waited)
        decision = decide(history, reports, world, self.launch, waited)
        write_history(folder, env.job_id, record_decision(history, attempt, reports, decision))
        print(f"[launcher] attempt {attempt} of job {env.job_id}: {decision.action} ({decision.reason})", flush=True)
        if decision.action == "finish":
            return summary
        if decision.action == "stop":
            return {**summary, "status": decision.reason}
        if decision.action == "cancel":
            raise Requeued(0)
        if decision.action == "fail":
            raise JobFailed(f"job {env.job_id} failed: {decision.reason}")
        self._requeue(env, history, decision)
        raise AssertionError("unreachable: _requeue leaves the task")

    def _requeue(self, env: Any, history: dict[str, Any], decision: Any) -> None:
        """Requeue the job (after its backoff, without its excluded nodes); the task leaves without a result."""
        count = history["failures"] + 1 if decision.failure else history["requeues"] + 1
        budget = self.launch.max_failures if decision.failure else self.launch.max_requeues
        what = "failure" if decision.failure else "requeue"
        print(f"[launcher] requeueing job {env.job_id} ({what} {count}/{budget}, backoff {decision.backoff_s:.0f} s"
              + (f", excluding {','.join(decision.exclude)}" if decision.exclude else "") + ")", flush=True)
        if self.launch.cluster != "slurm":
            time.sleep(decision.backoff_s)
            raise Requeued(LOCAL_REQUEUE_RETURN_CODE)  # the local controller restarts every task
        # raw id: for an array task "A_T" scontrol also accepts the task's own SLURM_JOB_ID. The job is pending
        # only after the requeue, and SLURM kills this task KillWait seconds later: update it at once.
        job = str(env.raw_job_id)
        subprocess.check_call(["scontrol", "requeue", job], timeout=60)
        update = ([f"StartTime=now+{int(round(decision.backoff_s))}"] if decision.backoff_s >= 1 else []) + (
            [f"ExcNodeList={','.join(decision.exclude)}"] if decision.exclude else [])
        if update:
            for _ in range(3):  # SLURM is sending SIGTERM to this step's processes now: the update ignores it
                out = subprocess.run(["scontrol", "update", f"JobId={job}", *update], capture_output=True, text=True,
                                     timeout=60, preexec_fn=_ignore_sigterm)
                if out.returncode == 0:
                    break
            if out.returncode != 0:
                print(f"[launcher] warning: `scontrol update JobId={job} {' '.join(update)}` failed "
                      f"({out.stderr.strip()}): the requeued job may start at once or on an excluded node; set it "
                      f"by hand while it is pending", file=sys.stderr, flush=True)
        # exit code 0: a non-zero exit of one task could make srun (KillOnBadExit) kill rank 0 mid-requeue
        raise Requeued(0)
