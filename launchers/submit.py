"""Submit training runs through submitit (SLURM or the local executor), one job or a job array.

Per run folder::

    {run_dir}/launcher/run_config.yaml   the run config of the newest submission (overrides applied)
    {run_dir}/launcher/launch.json       the LaunchConfig of the newest submission
    {run_dir}/launcher/jobs.jsonl        one line per submitted job: job_id, cluster, folder, time
    {run_dir}/slurm/{submission}/        ONE submission: run_config.yaml (what its job reads), submitit's
                                         pickles, logs ({job_id}_{task}_log.out/err), {job_id}_requeues.json

Each submission gets its own folder (time stamp + random suffix), so a rerun never reads a stale result
pickle of an earlier job that got the same job id (SLURM restarted, a reused pid on the local executor), and a
requeued job reads the config it was submitted with even when the run is submitted again meanwhile. A job
array shares one submission folder, under the common parent of its runs.
"""
from __future__ import annotations

import itertools
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pixeldit.cluster import make_executor
from pixeldit.errors import ConfigError, UserError
from pixeldit.storage import write_json_atomic
from pixeldit.storage import credential_keys

from .config import LaunchConfig
from .job import TrainJob
from .registry import is_active, job_state, read_jobs, read_result, record_jobs


class RunBusyError(UserError, RuntimeError):
    """A job of the run is still pending or running; a second one would write the same checkpoints."""


@dataclass
class Submission:
    run_dir: Path
    folder: Path  # this submission's folder (pickles, logs)
    jobs: list[Any]  # submitit.Job


def run_job(job: TrainJob) -> dict[str, Any]:
    """Array task entry point (picklable module-level function)."""
    return job()


class JobWaitTimeout(TimeoutError):
    """A job was not done within the time given to ``job_result``."""


def job_result(job: Any, timeout_s: float | None = None, poll_s: float = 1.0) -> dict[str, Any]:
    """Wait for a job; rank 0's summary (status, step, stage, checkpoint, requeues, job_id).
    ``timeout_s``: wait at most this long (``JobWaitTimeout`` naming the job and its state; the job is left
    as it is), None: as long as it takes."""
    if timeout_s is not None:
        deadline = time.monotonic() + timeout_s
        while not job.done():
            if time.monotonic() > deadline:
                raise JobWaitTimeout(f"job {job.job_id} not done after {timeout_s:.0f} s (state {job.state}); "
                                     f"`pixeldit-submit status RUN_DIR` shows its attempts")
            time.sleep(poll_s)
    return job.results()[0]


def new_submission_folder(parent: Path) -> Path:
    folder = parent / "slurm" / f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(4)}"
    folder.mkdir(parents=True, exist_ok=False)
    return folder


def check_not_busy(run_dir: Path) -> None:
    """Refuse a second concurrent job on one run folder."""
    if not (run_dir / "launcher" / "jobs.jsonl").exists():
        return
    busy = [(e["job_id"], s) for e in read_jobs(run_dir) if is_active(e, s := job_state(e))]
    if busy:
        listed = ", ".join(f"{j} ({s})" for j, s in busy)
        raise RunBusyError(f"run {run_dir} still has unfinished jobs: {listed}. Wait for them, or stop them with "
                           f"`pixeldit-submit cancel {run_dir}` (then resubmit: the run resumes from its latest "
                           f"checkpoint), or pass force=True / --force")


def prepare_run(config_path: str | None, overrides: list[str], launch: LaunchConfig) -> tuple[Path, Any]:
    """Load the run config and check it and its files for this world size (fail here, not in the queue);
    the run_dir made absolute."""
    from pixeldit.train.config import load_config
    from pixeldit.train.preflight import preflight

    cfg = load_config(config_path, overrides)
    secrets_found = credential_keys(cfg.data.storage_options)
    if secrets_found:
        raise ConfigError(f"run config {config_path or '(defaults)'}: data.storage_options.{secrets_found[0]} holds a "
                          f"credential; a submission saves the run config and pickles the job, so credentials never "
                          f"travel with it: export AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN (or "
                          f"AWS_PROFILE) in the submitting shell, the job inherits the environment")
    preflight(cfg, launch.world_size)
    if not cfg.run_dir:
        raise ValueError(f"run config {config_path or '(defaults)'}: run_dir is empty; set it in the file or "
                         f"pass run_dir=PATH")
    cfg.run_dir = str(Path(cfg.run_dir).resolve())
    return Path(cfg.run_dir), cfg


def save_run_files(cfg: Any, launch: LaunchConfig, folder: Path, name: str = "run_config.yaml") -> Path:
    """The run config into the submission folder (the job reads this copy) and the run's launcher folder."""
    from pixeldit.train.config import save_config

    run_dir = Path(cfg.run_dir)
    saved = folder / name
    save_config(cfg, saved)
    save_config(cfg, run_dir / "launcher" / "run_config.yaml")
    launch.save(run_dir / "launcher" / "launch.json")
    return saved


def submit(config_path: str | None, launch: LaunchConfig, overrides: list[str] | None = None,
           force: bool = False, evals: Any = None) -> Submission:
    """Submit one run: all of its curriculum stages in one job, requeued after a saved stop (USR2).
    ``evals``: a ``launchers.eval_jobs.EvalJobConfig``: an eval job of its own every K checkpoints."""
    if evals is not None and evals.launch.cluster != launch.cluster:
        raise ConfigError(f"eval jobs on cluster={evals.launch.cluster!r} but training on {launch.cluster!r}: set "
                          f"launch.cluster (and the eval job's resources) in the eval config")
    run_dir, cfg = prepare_run(config_path, list(overrides or []), launch)
    if not force:
        check_not_busy(run_dir)
    folder = new_submission_folder(run_dir)
    saved = save_run_files(cfg, launch, folder)
    if evals is not None:
        write_json_atomic(run_dir / "launcher" / "eval.json", evals.to_dict())
    job = make_executor(launch, folder).submit(TrainJob(str(saved), launch,
                                                        evals.to_dict() if evals is not None else None))
    record_jobs(run_dir, [job.job_id], launch.cluster, folder)
    return Submission(run_dir, folder, [job])


def sweep_overrides(run_dir: str | Path, axes: list[tuple[str, list[str]]]) -> list[list[str]]:
    """One override list per point of the cartesian product of ``axes`` (e.g. [("seed", ["1", "2"])]),
    each with its own run_dir: ``{run_dir}/seed-1``, ``{run_dir}/seed-2`` (several axes joined by "_")."""
    keys = [k for k, _ in axes]
    for key, values in axes:
        if not values:
            raise ValueError(f"array axis {key!r} has no values; write KEY=V1,V2,...")
    out = []
    for point in itertools.product(*(v for _, v in axes)):
        name = "_".join(f"{k.replace('.', '-')}-{v}" for k, v in zip(keys, point))
        out.append([f"{k}={v}" for k, v in zip(keys, point)] + [f"run_dir={Path(run_dir) / name}"])
    return out


def submit_array(config_paths: list[str | None], launch: LaunchConfig,
                 overrides_per_task: list[list[str]] | None = None, force: bool = False) -> list[Submission]:
    """A SLURM/local job array: one array task per (config, overrides), e.g. several configs or seeds.

    Every task needs its own run_dir (set in its config or overrides; ``sweep_overrides`` makes them).
    """
    overrides_per_task = overrides_per_task or [[] for _ in config_paths]
    if len(overrides_per_task) != len(config_paths):
        raise ValueError(f"{len(config_paths)} configs but {len(overrides_per_task)} override lists")
    prepared = [prepare_run(c, o, launch) for c, o in zip(config_paths, overrides_per_task)]
    run_dirs = [r for r, _ in prepared]
    if len(set(run_dirs)) != len(run_dirs):
        raise ValueError(f"array tasks share a run_dir ({[str(r) for r in run_dirs]}); give each its own run_dir "
                         f"(e.g. --array seed=1,2 puts each seed in {{run_dir}}/seed-N)")
    if not force:
        for run_dir in run_dirs:
            check_not_busy(run_dir)
    folder = new_submission_folder(Path(os.path.commonpath(run_dirs)) if len(run_dirs) > 1 else run_dirs[0])
    tasks = [TrainJob(str(save_run_files(cfg, launch, folder, f"run_config_{i}.yaml")), launch)
             for i, (_, cfg) in enumerate(prepared)]
    jobs = make_executor(launch, folder).map_array(run_job, tasks)
    out = []
    for run_dir, job in zip(run_dirs, jobs):
        record_jobs(run_dir, [job.job_id], launch.cluster, folder)
        out.append(Submission(run_dir, folder, [job]))
    return out


def last_result(run_dir: str | Path) -> dict[str, Any] | None:
    """Rank 0's summary of the run's newest job, None while it has no result (raises on a job error)."""
    entry = read_jobs(run_dir)[-1]
    result = read_result(entry)
    if result is None:
        return None
    if result[0] != "success":
        raise RuntimeError(f"job {entry['job_id']} of run {run_dir} failed:\n{result[1]}")
    return result[1]
