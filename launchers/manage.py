"""status / tail / cancel for the jobs of a run folder (SLURM or local)."""
from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path
from typing import Any

from .submit import read_jobs


def _job_handle(entry: dict[str, Any]):
    import submitit

    if entry["cluster"] == "slurm":
        return submitit.SlurmJob(folder=entry["folder"], job_id=entry["job_id"])
    return submitit.LocalJob(folder=entry["folder"], job_id=entry["job_id"])


def job_state(entry: dict[str, Any]) -> str:
    if entry["cluster"] == "slurm":
        out = subprocess.run(["sacct", "-n", "-X", "-P", "-j", entry["job_id"], "-o", "State"],
                             capture_output=True, text=True, timeout=30)
        state = out.stdout.strip().splitlines()
        if state:
            return state[-1].split()[0]
        out = subprocess.run(["squeue", "-h", "-j", entry["job_id"], "-o", "%T"], capture_output=True, text=True, timeout=30)
        return out.stdout.strip() or "UNKNOWN"
    return _job_handle(entry).state


def log_files(entry: dict[str, Any]) -> list[Path]:
    """stdout/stderr logs of every task of the job (submitit names them {job_id}_{task}_log.{out,err})."""
    folder = Path(entry["folder"])
    return sorted(folder.glob(f"{entry['job_id']}_*_log.out")) + sorted(folder.glob(f"{entry['job_id']}_*_log.err"))


def status(run_dir: str | Path) -> list[dict[str, Any]]:
    """Every job of the run with its state, newest last."""
    rows = []
    for entry in read_jobs(run_dir):
        rows.append({**entry, "state": job_state(entry)})
    return rows


def tail(run_dir: str | Path, lines: int = 20) -> str:
    """The last lines of each log file of the newest job."""
    entry = read_jobs(run_dir)[-1]
    chunks = []
    for path in log_files(entry):
        text = path.read_text(errors="replace").splitlines()[-lines:]
        chunks.append(f"==> {path} <==\n" + "\n".join(text))
    return "\n".join(chunks) if chunks else f"no log files yet for job {entry['job_id']} in {entry['folder']}"


def cancel(run_dir: str | Path) -> list[str]:
    """Cancel every job of the run that is not finished; returns the cancelled job ids."""
    cancelled = []
    for entry in read_jobs(run_dir):
        state = job_state(entry)
        if state.upper() in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "FINISHED", "DONE", "INTERRUPTED"):
            continue
        if entry["cluster"] == "slurm":
            subprocess.run(["scancel", entry["job_id"]], check=True, timeout=30)
        else:
            try:
                os.kill(int(entry["job_id"]), signal.SIGTERM)
            except ProcessLookupError:
                continue
        cancelled.append(entry["job_id"])
    return cancelled
