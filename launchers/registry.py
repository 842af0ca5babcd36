"""The per-run job registry and the state of each job (SLURM or local), read from outside the job.

``{run_dir}/launcher/jobs.jsonl`` holds one line per submitted job: job_id, cluster, folder (the submission
folder with submitit's pickles and logs), submitted (time). A job's state comes from SLURM (``sacct``, or
``squeue`` without accounting) or, for the local executor, from its result pickle and its controller process.
"""
from __future__ import annotations

import json
import os
import pickle
import signal
import time
from pathlib import Path
from typing import Any

from pixeldit.cluster import LOCAL_ACTIVE, SLURM_ACTIVE, local_job_alive, slurm_state
from pixeldit.storage import write_text_atomic

from .attempts import attempt_lines, read_history

def jobs_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / "launcher" / "jobs.jsonl"


def read_jobs(run_dir: str | Path) -> list[dict[str, Any]]:
    """Every job submitted for the run, oldest first."""
    path = jobs_path(run_dir)
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: no job was submitted for run folder {run_dir} "
                                f"(submit one with `pixeldit-submit submit --config ...`)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def record_jobs(run_dir: Path, job_ids: list[str], cluster: str, folder: Path) -> None:
    """Append jobs to the run's registry (rewritten atomically: ``pixeldit.storage.write_text_atomic``)."""
    path = jobs_path(run_dir)
    old = path.read_text() if path.exists() else ""
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
    new = "".join(json.dumps({"job_id": str(j), "cluster": cluster, "folder": str(folder), "submitted": stamp})
                  + "\n" for j in job_ids)
    write_text_atomic(path, old + new)


def result_path(entry: dict[str, Any]) -> Path:
    return Path(entry["folder"]) / f"{entry['job_id']}_0_result.pkl"  # rank 0's result


def read_result(entry: dict[str, Any]) -> tuple[str, Any] | None:
    """("success", rank 0's summary dict) or ("error", traceback text); None while the job has no result.

    The result pickle is written by this launcher's own job into the run's own submission folder.
    """
    path = result_path(entry)
    if not path.exists():
        return None
    with open(path, "rb") as f:
        return pickle.load(f)


def local_state(entry: dict[str, Any]) -> str:
    result = read_result(entry)
    if result is not None:
        return "FINISHED" if result[0] == "success" else "FAILED"
    return "RUNNING" if local_job_alive(entry['job_id'], entry['folder']) else "INTERRUPTED"  # gone without a result: cancelled/killed


def job_state(entry: dict[str, Any]) -> str:
    return slurm_state(entry["job_id"]) if entry["cluster"] == "slurm" else local_state(entry)


def is_active(entry: dict[str, Any], state: str | None = None) -> bool:
    state = state or job_state(entry)
    return state in (SLURM_ACTIVE if entry["cluster"] == "slurm" else LOCAL_ACTIVE)


def job_row(entry: dict[str, Any]) -> dict[str, Any]:
    """The entry with its state, rank 0's result status, the requeues done so far, one line per decided attempt
    (its reason and what followed) and the final state ({state, reason}; None while the job may still run)."""
    result = read_result(entry)
    outcome = "" if result is None else (result[1]["status"] if result[0] == "success" else "error")
    history = read_history(entry["folder"], entry["job_id"])
    return {**entry, "state": job_state(entry), "result": outcome, "requeues": history["requeues"],
            "failures": history["failures"], "attempts": attempt_lines(history), "final": history["final"]}


def log_files(entry: dict[str, Any]) -> list[Path]:
    """stdout/stderr logs of every task of the job (submitit: {job_id}_{task}_log.{out,err})."""
    folder = Path(entry["folder"])
    return sorted(folder.glob(f"{entry['job_id']}_*_log.out")) + sorted(folder.glob(f"{entry['job_id']}_*_log.err"))


def interrupt_local(entry: dict[str, Any]) -> bool:
    """Stop a local job: SIGINT to its controller, which interrupts, then kills, every task."""
    if not local_job_alive(entry['job_id'], entry['folder']):
        return False
    try:
        os.kill(int(entry["job_id"]), signal.SIGINT)
    except ProcessLookupError:
        return False
    return True
