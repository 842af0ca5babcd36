"""status / tail / cancel for the jobs of a run folder (SLURM or local).

    status(run_dir)  every job of the run: id, cluster, state, rank 0's result, requeues, folder, and below it
                     each attempt's reason (preempted, killed by signal 9 on n2, watchdog stall ...) and the
                     job's final state (launchers.attempts)
    tail(run_dir)    the last lines of every task's stdout/stderr of the newest job (or a given job)
    cancel(run_dir)  stop the run's unfinished jobs (SLURM: scancel; local: SIGINT to the job's controller)

Cancelling does not save: the run resumes from its latest checkpoint when submitted again. To stop with a
save at the next step boundary and requeue, send the preemption signal instead:
``scancel --signal=USR2 JOBID``.
"""
from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

from .registry import interrupt_local, is_active, job_row, job_state, log_files, read_jobs


def status(run_dir: str | Path) -> list[dict[str, Any]]:
    """Every job of the run with its state, oldest first."""
    return [job_row(entry) for entry in read_jobs(run_dir)]


STATUS_COLUMNS = (("job", "job_id", ">"), ("cluster", "cluster", "<"), ("state", "state", "<"),
                  ("result", "result", "<"), ("requeues", "requeues", ">"), ("submitted", "submitted", "<"))


def format_status(rows: list[dict[str, Any]]) -> str:
    """A table of ``status`` rows; every column as wide as its longest value (nothing is cut), folder last; under
    a job, its attempts' lines (``attempts``), indented."""
    cells = [[str(r[key] if r[key] not in ("", None) else "-") for _, key, _ in STATUS_COLUMNS] for r in rows]
    widths = [max([len(title), *(len(c[i]) for c in cells)]) for i, (title, _, _) in enumerate(STATUS_COLUMNS)]

    def line(values: list[str], folder: str) -> str:
        parts = [f"{v:{align}{w}}" for v, w, (_, _, align) in zip(values, widths, STATUS_COLUMNS)]
        return "  ".join([*parts, folder])

    out = [line([t for t, _, _ in STATUS_COLUMNS], "folder")]
    for c, r in zip(cells, rows):
        out += [line(c, str(r["folder"])), *(f"    {text}" for text in r.get("attempts", []))]
    return "\n".join(out)


def tail(run_dir: str | Path, lines: int = 20, job_id: str | None = None) -> str:
    """The last ``lines`` lines of each log file of the newest job (or of ``job_id``)."""
    entries = read_jobs(run_dir)
    if job_id is not None:
        picked = [e for e in entries if e["job_id"] == job_id]
        if not picked:
            raise ValueError(f"job {job_id} is not a job of run {run_dir}; its jobs: "
                             f"{', '.join(e['job_id'] for e in entries)}")
        entry = picked[-1]
    else:
        entry = entries[-1]
    chunks = []
    for path in log_files(entry):
        text = path.read_text(errors="replace").splitlines()[-lines:]
        chunks.append(f"==> {path} <==\n" + "\n".join(text))
    return "\n".join(chunks) if chunks else f"no log files yet for job {entry['job_id']} in {entry['folder']}"


def cancel(run_dir: str | Path) -> list[str]:
    """Cancel every unfinished job of the run; returns the ids of the jobs told to stop."""
    cancelled = []
    for entry in read_jobs(run_dir):
        state = job_state(entry)
        if entry["cluster"] == "slurm":
            if not (is_active(entry, state) or state == "UNKNOWN"):
                continue
            out = subprocess.run(["scancel", entry["job_id"]], capture_output=True, text=True, timeout=30)
            if out.returncode != 0:
                if state == "UNKNOWN":  # no accounting and no longer queued: nothing to cancel
                    continue
                raise RuntimeError(f"scancel {entry['job_id']} (run {run_dir}) failed: {out.stderr.strip()}")
        elif not (is_active(entry, state) and interrupt_local(entry)):
            continue
        cancelled.append(entry["job_id"])
    return cancelled
