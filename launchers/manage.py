"""status / tail / cancel for the jobs of a run folder (SLURM or local).

    status(run_dir)  every job of the run: id, cluster, state, rank 0's result, requeues, folder, and below it
                     each attempt's reason (preempted, killed by signal 9 on n2, watchdog stall ...) and the
                     job's final state (launchers.attempts)
    eval_status(run_dir)  every eval job of the run (launchers.eval_jobs): id, the checkpoint step it
                     evaluates, state, its metrics or its error, folder
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

from .eval_jobs import eval_results, metrics_text, submitted_evals
from .registry import interrupt_local, is_active, job_row, job_state, log_files, read_jobs, read_result


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


# eval jobs (launchers.eval_jobs): one row per checkpoint step that got an eval job


def eval_status(run_dir: str | Path) -> list[dict[str, Any]]:
    """Every eval job of the run, by step: job_id, step (the checkpoint it evaluates), cluster, state, result
    (its metrics from metrics.jsonl, ``error: <the exception line>`` when it failed, else empty), folder."""
    results = eval_results(run_dir)
    rows = []
    for entry in submitted_evals(run_dir):
        record, outcome = results.get(entry["step"]), read_result(entry)
        if record is not None:
            result = metrics_text(record)
        elif outcome is not None and outcome[0] == "error":
            lines = [ln for ln in str(outcome[1]).splitlines() if ln.strip()]
            result = "error: " + (lines[-1].strip() if lines else "(no traceback)")
        else:
            result = ""
        rows.append({"kind": "eval", "job_id": entry["job_id"], "step": entry["step"], "cluster": entry["cluster"],
                     "state": job_state(entry), "result": result, "folder": entry["folder"]})
    return rows


EVAL_COLUMNS = (("eval job", "job_id", ">"), ("step", "step", ">"), ("cluster", "cluster", "<"),
                ("state", "state", "<"), ("result", "result", "<"))


def format_eval_status(rows: list[dict[str, Any]]) -> str:
    """A table of ``eval_status`` rows (nothing cut, folder last); "no eval job" when there are none."""
    if not rows:
        return "no eval job"
    cells = [[str(r[key]) if r[key] not in ("", None) else "-" for _, key, _ in EVAL_COLUMNS] for r in rows]
    widths = [max([len(title), *(len(c[i]) for c in cells)]) for i, (title, _, _) in enumerate(EVAL_COLUMNS)]
    return "\n".join("  ".join([*(f"{v:{a}{w}}" for v, w, (_, _, a) in zip(values, widths, EVAL_COLUMNS)), folder])
                     for values, folder in [([t for t, _, _ in EVAL_COLUMNS], "folder"),
                                            *((c, str(r["folder"])) for c, r in zip(cells, rows))])


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
