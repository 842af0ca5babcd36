"""Helpers of the launcher tests (test_launchers, test_survive, test_eval_jobs, test_train_spikes): the debug run
config, the local SLURM's availability, bounded waits. The shared reference run is a fixture in conftest.py."""
from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from launchers.config import LaunchConfig
from launchers.submit import JobWaitTimeout, job_result

STEPS = (4, 4)
TASK_ENV = {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}


def slurm_reason() -> str | None:
    if not shutil.which("sinfo") or not shutil.which("sbatch"):
        return "SLURM not installed: start it with ../shared/slurm/start_slurm.sh (CI: .ci/slurm.sh start)"
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=10)
    except subprocess.TimeoutExpired:
        return "SLURM not running: slurmctld does not answer (sinfo timed out); start ../shared/slurm/start_slurm.sh"
    if out.returncode != 0 or not out.stdout.strip():
        return f"SLURM not running ({out.stderr.strip() or 'no nodes'}): start ../shared/slurm/start_slurm.sh"
    states = set(out.stdout.split())
    if not states & {"idle", "mixed", "allocated", "completing"}:
        return f"SLURM has no usable node (node states: {', '.join(sorted(states))}); restart it"
    return None


SLURM_REASON = slurm_reason()


def needs_slurm(test):
    """A test that submits jobs to the local SLURM: skipped without one; marked ``slurm``, so that every such test
    runs on one pytest-xdist worker, one at a time (tests/conftest.py)."""
    return pytest.mark.slurm(pytest.mark.skipif(SLURM_REASON is not None, reason=str(SLURM_REASON))(test))


def run_config(path: Path, run_dir: Path, data: Path, steps: tuple[int, ...] = STEPS) -> Path:
    """A debug-size CPU run: stage "fixed" (32 px squares), then stage "aspect" (32 px buckets) if two steps."""
    stage = {"data_path": str(data), "resolution": 32, "bucket_align": 16, "micro_batch": 2, "lr": 1e-3}
    cfg = {
        "run_dir": str(run_dir), "seed": 1, "ema_decay": 0.9,
        "model": {"size": "debug"},
        "deepspeed": {"zero": "zero2", "precision": "fp32"},
        "data": {"num_workers": 0},
        "logging": {"wandb": "disabled", "progress_bar": False},
        "checkpoint": {"every": 100, "keep": 2},
        "stages": [{"name": "fixed", "steps": steps[0], "buckets": "fixed", **stage},
                   {"name": "aspect", "steps": steps[-1], "buckets": "aspect", "shift": 2.0, **stage}][:len(steps)],
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


def launch(cluster: str, **kw) -> LaunchConfig:
    return LaunchConfig(cluster=cluster, tasks_per_node=2, cpus_per_task=1, time_min=10, env=TASK_ENV,
                        max_requeues=2, **kw)


def logged_steps(run_dir: Path) -> list[tuple[int, float]]:
    """(step, loss) of every line of losses.jsonl, in order: a restart from scratch would repeat steps."""
    return [(r["step"], r["loss"]) for r in map(json.loads, (run_dir / "losses.jsonl").read_text().splitlines())]


def wait_for(predicate, what: str, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, f"timed out after {timeout}s waiting for {what}"
        time.sleep(0.2)


def finished(job, timeout: float = 600) -> dict:
    """Rank 0's result of a submitit job, waiting at most ``timeout`` s. A job not done by then is cancelled and
    the test fails with its SLURM state and the nodes' (a stuck job never holds the rest of the suite)."""
    try:
        return job_result(job, timeout_s=timeout)
    except JobWaitTimeout as err:
        snapshot = slurm_snapshot(job.job_id) if SLURM_REASON is None else ""
        job.cancel(check=False)
        pytest.fail(f"{err}\n{snapshot}")


def slurm_snapshot(job_id: str) -> str:
    """What SLURM says about a job and the nodes (for a failure message)."""
    out = []
    for cmd in (["scontrol", "show", "job", job_id], ["sinfo", "-N", "-o", "%N %T %E"], ["squeue"]):
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
            out.append(f"$ {' '.join(cmd)}\n{done.stdout}{done.stderr}")
        except subprocess.TimeoutExpired:
            out.append(f"$ {' '.join(cmd)}: no answer within 20 s")
    return "\n".join(out)


def reached_step(run_dir: Path, step: int) -> bool:
    path = run_dir / "losses.jsonl"
    return path.exists() and any(json.loads(x)["step"] >= step for x in path.read_text().splitlines())
