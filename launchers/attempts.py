"""What happened to each attempt of a submitted job, and what comes next: finish, requeue, or fail for good.

Files next to the job's logs (the submission folder), every one written atomically
(``pixeldit.storage.write_json_atomic``); this module owns their names and fields:

    {job_id}_requeues.json           the job's history, written by the global-rank-0 task only:
                                     requeues (after a saved stop), failures (failed attempts), excluded (nodes),
                                     attempts (one decision per attempt, below), final ({state, reason} or null)
    {job_id}_attempt{A}_task{R}.json one task's report of attempt A: job_id, attempt, rank, host, outcome
                                     ("finished" | "stopped" | "failed" | "cancelled"), reason, exit_code, signal,
                                     primary, step, stack_dump, time, certain

``decide`` (a pure function, unit-tested without SLURM) turns the reports of one attempt into a ``Decision``:

- every task finished -> "finish"; a saved stop (preemption) -> "requeue" while ``requeues < max_requeues``,
  else "stop"; a cancelled task -> "cancel";
- any failed task (or one that sent no report) -> the attempt is a failure. Failures have their own budget,
  ``LaunchConfig.max_failures`` restarts; with it spent (or after a user error, exit code 2, which a restart
  would only repeat) the decision is "fail" with the reason. Otherwise "requeue" after a backoff of
  ``failure_backoff_s * 2**(n-1)`` (at most ``failure_backoff_max_s``) for the n-th failure;
- a *primary* failure is a task whose own trainer was killed by a signal or hung (see
  ``launchers.supervisor``), not a peer that merely lost it (a collective error, exit code 1). When one task's
  failure is certain (killed by a signal, or found stopped), the stalls of the others in that attempt are taken
  as its consequence and not blamed. A node with primary failures in ``EXCLUDE_AFTER`` attempts of the job joins
  the job's exclude list before the requeue.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from pixeldit.cluster import LaunchConfig
from pixeldit.errors import EXIT_USER_ERROR
from pixeldit.storage import write_json_atomic

Outcome = Literal["finished", "stopped", "failed", "cancelled"]
Action = Literal["finish", "requeue", "stop", "fail", "cancel"]
EXCLUDE_AFTER = 2  # attempts with a primary failure on one node before the node is excluded
MAX_REQUEUES_NOTE = "stopped: max requeues reached (submit the run again to continue)"


@dataclass
class TaskReport:
    """One task's account of one attempt (written by its supervisor)."""

    job_id: str
    attempt: int
    rank: int
    host: str
    outcome: Outcome
    reason: str
    exit_code: int | None = None
    signal: int | None = None
    primary: bool = False  # this task's own trainer was killed or hung (not a peer's collective error)
    step: int | None = None  # the trainer's last heartbeat step
    stack_dump: str | None = None
    time: float = field(default_factory=time.time)
    certain: bool = False  # primary beyond doubt: killed by a signal not its watchdog's, or found stopped (SIGSTOP)


@dataclass
class Decision:
    action: Action
    reason: str
    backoff_s: float = 0.0  # wait before the requeued job may start
    exclude: list[str] = field(default_factory=list)  # the job's exclude list after this decision
    primary_hosts: list[str] = field(default_factory=list)
    failure: bool = False  # the attempt failed (counts against max_failures); else a finish, stop or preemption


# ---- files -------------------------------------------------------------------------------------------------


def history_path(folder: str | Path, job_id: str) -> Path:
    return Path(folder) / f"{job_id}_requeues.json"


def report_path(folder: str | Path, job_id: str, attempt: int, rank: int) -> Path:
    return Path(folder) / f"{job_id}_attempt{attempt}_task{rank}.json"


def empty_history() -> dict[str, Any]:
    return {"requeues": 0, "failures": 0, "excluded": [], "attempts": [], "final": None}


def read_history(folder: str | Path, job_id: str) -> dict[str, Any]:
    """The job's history (an empty one before its first decision)."""
    path = history_path(folder, job_id)
    if not path.exists():
        return empty_history()
    try:
        return {**empty_history(), **json.loads(path.read_text())}
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not JSON ({err}); it is written atomically by the job's rank-0 task, so the "
                         f"file was changed by hand: delete it to restart the job's requeue and failure counts")


def write_history(folder: str | Path, job_id: str, history: dict[str, Any]) -> None:
    write_json_atomic(history_path(folder, job_id), history)


def write_report(folder: str | Path, report: TaskReport) -> Path:
    path = report_path(folder, report.job_id, report.attempt, report.rank)
    write_json_atomic(path, asdict(report))
    return path


def read_reports(folder: str | Path, job_id: str, attempt: int, world_size: int) -> dict[int, TaskReport]:
    """The reports of attempt ``attempt`` written so far, by rank."""
    out = {}
    for rank in range(world_size):
        path = report_path(folder, job_id, attempt, rank)
        if path.exists():
            out[rank] = TaskReport(**json.loads(path.read_text()))
    return out


def wait_for_reports(folder: str | Path, job_id: str, attempt: int, world_size: int, timeout_s: float,
                     poll_s: float = 0.5) -> dict[int, TaskReport]:
    """Every task's report of the attempt, or those there after ``timeout_s`` (a lost task sends none)."""
    deadline = time.monotonic() + timeout_s
    while True:
        reports = read_reports(folder, job_id, attempt, world_size)
        if len(reports) == world_size or time.monotonic() >= deadline:
            return reports
        time.sleep(poll_s)


# ---- the decision ------------------------------------------------------------------------------------------


def backoff_s(failures: int, launch: LaunchConfig) -> float:
    """The wait before the restart after the ``failures``-th failure: doubling from failure_backoff_s, capped."""
    if failures < 1:
        return 0.0
    return min(launch.failure_backoff_max_s, launch.failure_backoff_s * 2 ** (failures - 1))


def primary_counts(history: dict[str, Any], hosts: list[str]) -> dict[str, int]:
    """Attempts with a primary failure per node: the history's and ``hosts`` (this attempt's)."""
    counts: dict[str, int] = {}
    for entry in history["attempts"]:
        for host in set(entry.get("primary_hosts", [])):
            counts[host] = counts.get(host, 0) + 1
    for host in set(hosts):
        counts[host] = counts.get(host, 0) + 1
    return counts


def decide(history: dict[str, Any], reports: dict[int, TaskReport], world_size: int,
           launch: LaunchConfig, waited_s: float = 0.0) -> Decision:
    """What follows an attempt (module docstring); ``history`` is the job's before this attempt."""
    missing = [r for r in range(world_size) if r not in reports]
    cancelled = [r for r in reports.values() if r.outcome == "cancelled"]
    if cancelled:
        return Decision("cancel", "; ".join(r.reason for r in cancelled))
    failed = [r for r in reports.values() if r.outcome == "failed"]
    if failed or missing:
        primary = [r for r in failed if r.primary]
        # a cause beyond doubt (a kill, a stopped trainer) explains its peers' stalls in the same attempt: a peer
        # stuck in the collective the dead or stopped rank never joined can show frames outside torch.distributed
        # (DeepSpeed's ZeRO reduction waiting on its work), and must not be blamed for it
        primary = [r for r in primary if r.certain] or primary
        reasons = [r.reason for r in (primary or failed)]
        reasons += [f"no report from rank {r} within {waited_s:.0f} s (its task or node was lost)" for r in missing]
        reason = "; ".join(reasons)
        hosts = sorted({r.host for r in primary})
        user_errors = [r for r in failed if r.exit_code == EXIT_USER_ERROR]
        if user_errors:
            return Decision("fail", f"{reason}; a user error (exit code {EXIT_USER_ERROR}) is not retried: fix it "
                                    f"(see the task's log) and submit the run again", primary_hosts=hosts,
                            failure=True)
        failures = history["failures"] + 1
        if failures > launch.max_failures:
            return Decision("fail", f"{reason}; failure budget spent ({failures} failed attempts, max_failures="
                                    f"{launch.max_failures})", primary_hosts=hosts, failure=True)
        counts = primary_counts(history, hosts)
        exclude = sorted(set(history["excluded"]) | {h for h, n in counts.items() if n >= EXCLUDE_AFTER})
        return Decision("requeue", reason, backoff_s(failures, launch), exclude, hosts, failure=True)
    if reports[0].outcome == "finished":  # a stop asked during the run's last step changes nothing
        return Decision("finish", "finished")
    if history["requeues"] >= launch.max_requeues:
        return Decision("stop", MAX_REQUEUES_NOTE)
    return Decision("requeue", f"preempted (saved at step {reports[0].step})", exclude=list(history["excluded"]))


def record_decision(history: dict[str, Any], attempt: int, reports: dict[int, TaskReport],
                    decision: Decision) -> dict[str, Any]:
    """The history after ``decision`` (a new dict): counts, exclude list, the attempt's entry, the final state."""
    out = {**history, "attempts": list(history["attempts"])}
    out["requeues"] += int(decision.action == "requeue" and not decision.failure)
    out["failures"] += int(decision.failure)
    if decision.action == "requeue":
        out["excluded"] = list(decision.exclude)
    out["attempts"].append({
        "attempt": attempt, "action": decision.action, "reason": decision.reason, "backoff_s": decision.backoff_s,
        "primary_hosts": decision.primary_hosts, "excluded": out["excluded"], "time": time.time(),
        "tasks": [{"rank": r.rank, "host": r.host, "outcome": r.outcome, "reason": r.reason}
                  for r in sorted(reports.values(), key=lambda r: r.rank)],
    })
    final = {"finish": "finished", "stop": "stopped", "fail": "failed", "cancel": "cancelled"}.get(decision.action)
    out["final"] = {"state": final, "reason": decision.reason} if final else None
    return out


def attempt_lines(history: dict[str, Any]) -> list[str]:
    """One line per attempt (its reason and what followed), then the final state: for ``pixeldit-submit status``."""
    lines = []
    for entry in history["attempts"]:
        then = {"finish": "finished", "stop": "stopped", "fail": "failed", "cancel": "cancelled"}.get(entry["action"])
        if then is None:
            then = f"requeued after {entry['backoff_s']:.0f} s" + (
                f", excluding {','.join(entry['excluded'])}" if entry["excluded"] else "")
        lines.append(f"attempt {entry['attempt']}: {entry['reason']} -> {then}")
    final = history.get("final")
    if final:
        lines.append(f"final: {final['state']}" + ("" if final["state"] == "finished" else f" ({final['reason']})"))
    return lines
