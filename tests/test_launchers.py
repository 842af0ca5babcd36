"""Launchers with the real trainer: local executor (always) and a real SLURM on localhost (when running).

Each job trains the debug model on CPU with 2 tasks (gloo) for a few steps at 32 px over two stages.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from launchers.config import LaunchConfig
from launchers.manage import cancel, status, tail
from launchers.submit import job_result, read_jobs, submit, submit_array
from train_helpers import write_tiny_dataset

ROOT = Path(__file__).resolve().parents[1]
STEPS = (4, 4)
TASK_ENV = {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


def slurm_reason() -> str | None:
    if not shutil.which("sinfo") or not shutil.which("sbatch"):
        return "SLURM not installed: start it with ../shared/slurm/start_slurm.sh (CI: .ci/slurm.sh start)"
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=10)
    except subprocess.TimeoutExpired:
        return "SLURM controller does not answer (sinfo timed out)"
    if out.returncode != 0 or not out.stdout.strip():
        return f"SLURM not running (sinfo: {out.stderr.strip() or 'no nodes'}): start ../shared/slurm/start_slurm.sh"
    return None


needs_slurm = pytest.mark.skipif(slurm_reason() is not None, reason=str(slurm_reason()))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return write_tiny_dataset(tmp_path_factory.mktemp("data"), {"1.00": 8, "0.50": 8}, per_shard=4)


def run_config(path: Path, run_dir: Path, data: Path) -> Path:
    stage = {"data_path": str(data), "resolution": 32, "bucket_align": 16, "micro_batch": 2, "lr": 1e-3}
    cfg = {
        "run_dir": str(run_dir), "seed": 1, "ema_decay": 0.9,
        "model": {"size": "debug"},
        "deepspeed": {"zero": "zero2", "precision": "fp32"},
        "data": {"num_workers": 0},
        "logging": {"wandb": "disabled", "progress_bar": False},
        "checkpoint": {"every": 100, "keep": 2},
        "stages": [{"name": "fixed", "steps": STEPS[0], "buckets": "fixed", **stage},
                   {"name": "aspect", "steps": STEPS[1], "buckets": "aspect", "shift": 2.0, **stage}],
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


def launch(cluster: str, **kw) -> LaunchConfig:
    return LaunchConfig(cluster=cluster, tasks_per_node=2, cpus_per_task=1, time_min=10, env=TASK_ENV,
                        max_requeues=2, **kw)


def losses(run_dir: Path) -> dict[int, float]:
    out = {}
    for line in (run_dir / "losses.jsonl").read_text().splitlines():
        r = json.loads(line)
        out[r["step"]] = r["loss"]
    return out


def wait_for_step(run_dir: Path, step: int, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while True:
        path = run_dir / "losses.jsonl"
        if path.exists() and any(json.loads(x)["step"] >= step for x in path.read_text().splitlines()):
            return
        assert time.time() < deadline, f"run did not reach step {step} in {timeout}s"
        time.sleep(0.2)


def task_pids(controller_pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(controller_pid)], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


@pytest.fixture(scope="module")
def local_reference(dataset, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("local_ref")
    sub = submit(str(run_config(tmp / "run.yaml", tmp / "run", dataset)), launch("local"))
    result = job_result(sub.jobs[0])
    assert result["status"] == "finished" and result["step"] == sum(STEPS), result
    return tmp / "run"


def test_local_two_task_job_runs_the_whole_curriculum(local_reference):
    run = local_reference
    assert sorted(losses(run)) == list(range(1, sum(STEPS) + 1))
    (entry,) = read_jobs(run)
    assert entry["cluster"] == "local" and Path(entry["folder"]).parent == run / "slurm"
    assert status(run)[0]["state"] == "FINISHED"
    assert "Job completed successfully" in tail(run, lines=200)
    assert cancel(run) == []  # nothing left to cancel
    assert (run / "launcher" / "launch.json").exists() and (run / "launcher" / "run_config.yaml").exists()


def test_local_preemption_saves_requeues_and_resumes_identically(local_reference, dataset, tmp_path):
    run = tmp_path / "run"
    sub = submit(str(run_config(tmp_path / "run.yaml", run, dataset)), launch("local"))
    wait_for_step(run, 3)
    for pid in task_pids(sub.jobs[0]._process.pid):
        os.kill(pid, signal.SIGUSR2)  # what SLURM sends before preemption / the time limit
    result = job_result(sub.jobs[0])
    assert result["status"] == "finished" and result["requeues"] == 1
    assert json.loads((run / "launcher" / "requeues.json").read_text())["requeues"] == 1
    assert losses(run) == losses(local_reference)  # same per-step losses as the uninterrupted run


def test_launch_config_errors_name_valid_values():
    with pytest.raises(ValueError, match="valid values: local, slurm"):
        LaunchConfig(cluster="kubernetes")
    with pytest.raises(ValueError, match="nodes=1"):
        LaunchConfig(cluster="local", nodes=2)


def test_array_tasks_need_distinct_run_dirs(dataset, tmp_path):
    cfg = str(run_config(tmp_path / "run.yaml", tmp_path / "same", dataset))
    with pytest.raises(ValueError, match="share a run_dir"):
        submit_array([cfg, cfg], launch("local"))


@needs_slurm
def test_slurm_two_task_job_finishes(local_reference, dataset, tmp_path):
    run = tmp_path / "run"
    sub = submit(str(run_config(tmp_path / "run.yaml", run, dataset)), launch("slurm"))
    result = job_result(sub.jobs[0])
    assert result["status"] == "finished", tail(run, 100)
    assert losses(run) == losses(local_reference)  # the same run, same numbers, whoever launches it
    deadline = time.time() + 60  # the result pickle lands a moment before SLURM marks the job done
    while status(run)[-1]["state"] != "COMPLETED" and time.time() < deadline:
        time.sleep(1)
    assert status(run)[-1]["state"] == "COMPLETED"


@needs_slurm
def test_slurm_usr2_saves_requeues_and_resumes_identically(local_reference, dataset, tmp_path):
    run = tmp_path / "run"
    sub = submit(str(run_config(tmp_path / "run.yaml", run, dataset)), launch("slurm"))
    job_id = sub.jobs[0].job_id
    wait_for_step(run, 3)
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True)
    result = job_result(sub.jobs[0])
    assert result["status"] == "finished", tail(run, 200)
    assert result["requeues"] == 1
    assert losses(run) == losses(local_reference)
    restarts = subprocess.run(["sacct", "-n", "-X", "-P", "-D", "-j", job_id, "-o", "State"],
                              capture_output=True, text=True).stdout.split()
    assert len(restarts) >= 2, restarts  # the job ran twice: requeued, then completed


@needs_slurm
def test_slurm_job_array_runs(dataset, tmp_path):
    cfgs = [str(run_config(tmp_path / f"run{i}.yaml", tmp_path / f"run{i}", dataset)) for i in range(2)]
    subs = submit_array(cfgs, launch("slurm"), [["stages.0.steps=1", "stages.1.steps=1"]] * 2)
    results = [job_result(s.jobs[0]) for s in subs]
    assert [r["status"] for r in results] == ["finished", "finished"]
    assert all("_" in s.jobs[0].job_id for s in subs)  # array task ids: {array}_{index}
