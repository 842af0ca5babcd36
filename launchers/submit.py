"""Submit training runs through submitit (SLURM or the local executor) and keep a per-run job registry.

Per run folder::

    {run_dir}/launcher/run_config.yaml     the run config as submitted (the job reads it; overrides applied)
    {run_dir}/launcher/launch.json         the LaunchConfig
    {run_dir}/launcher/jobs.jsonl          one line per submitted job: job_id, cluster, folder, time
    {run_dir}/launcher/requeues.json       requeues done so far (bounded by max_requeues)
    {run_dir}/slurm/{submission}/          submitit's pickles and logs of ONE submission

Each submission gets its own folder (time stamp + random suffix), so a rerun never reads a stale
result pickle of an earlier job that happened to get the same job id.
"""
from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import LaunchConfig, executor_parameters
from .job import TrainJob


@dataclass
class Submission:
    run_dir: Path
    folder: Path
    jobs: list[Any]  # submitit.Job


def run_job(job: TrainJob) -> dict[str, Any]:
    """Array task entry point (picklable)."""
    return job()


def _submission_folder(run_dir: Path) -> Path:
    folder = run_dir / "slurm" / f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
    folder.mkdir(parents=True, exist_ok=False)
    return folder


def make_executor(launch: LaunchConfig, folder: Path):
    import submitit

    # AutoExecutor picks SLURM whenever srun is on PATH: always say which cluster we mean
    executor = submitit.AutoExecutor(folder=str(folder), cluster=launch.cluster)
    executor.update_parameters(**executor_parameters(launch))
    return executor


def record_jobs(run_dir: Path, jobs: list[Any], launch: LaunchConfig, folder: Path) -> None:
    path = run_dir / "launcher" / "jobs.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        for job in jobs:
            f.write(json.dumps({"job_id": str(job.job_id), "cluster": launch.cluster, "folder": str(folder),
                                "submitted": time.strftime("%Y-%m-%dT%H:%M:%S")}) + "\n")


def job_result(job: Any) -> dict[str, Any]:
    """Wait for a job and return rank 0's summary (every task returns one; multi-task jobs need results())."""
    return job.results()[0]


def read_jobs(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "launcher" / "jobs.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: no job was submitted for run folder {run_dir}")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def prepare_run(config_path: str | None, overrides: list[str], launch: LaunchConfig) -> tuple[Path, Path]:
    """Validate the run config (fail before submitting), save it and the launch config into the run folder."""
    from pixeldit.train.config import load_config, save_config

    cfg = load_config(config_path, overrides)
    run_dir = Path(cfg.run_dir).resolve()
    (run_dir / "launcher").mkdir(parents=True, exist_ok=True)
    cfg.run_dir = str(run_dir)
    saved = run_dir / "launcher" / "run_config.yaml"
    save_config(cfg, saved)
    launch.save(run_dir / "launcher" / "launch.json")
    return run_dir, saved


def submit(config_path: str | None, launch: LaunchConfig, overrides: list[str] | None = None) -> Submission:
    """Submit one run (all of its curriculum stages in one job, requeued on preemption)."""
    run_dir, saved = prepare_run(config_path, list(overrides or []), launch)
    folder = _submission_folder(run_dir)
    job = make_executor(launch, folder).submit(TrainJob(str(saved), launch))
    record_jobs(run_dir, [job], launch, folder)
    return Submission(run_dir, folder, [job])


def submit_array(config_paths: list[str | None], launch: LaunchConfig,
                 overrides_per_job: list[list[str]] | None = None) -> list[Submission]:
    """A job array: one array task per (config, overrides), e.g. seeds or sizes of a sweep.

    Every task must have its own run_dir (set in its config or overrides).
    """
    overrides_per_job = overrides_per_job or [[] for _ in config_paths]
    if len(overrides_per_job) != len(config_paths):
        raise ValueError(f"{len(config_paths)} configs but {len(overrides_per_job)} override lists")
    prepared = [prepare_run(c, o, launch) for c, o in zip(config_paths, overrides_per_job)]
    run_dirs = [r for r, _ in prepared]
    if len(set(run_dirs)) != len(run_dirs):
        raise ValueError(f"array tasks share a run_dir ({[str(r) for r in run_dirs]}); give each its own run_dir")
    folder = _submission_folder(run_dirs[0])
    executor = make_executor(launch, folder)
    jobs = executor.map_array(run_job, [TrainJob(str(saved), launch) for _, saved in prepared])
    out = []
    for (run_dir, _), job in zip(prepared, jobs):
        record_jobs(run_dir, [job], launch, folder)
        out.append(Submission(run_dir, folder, [job]))
    return out
