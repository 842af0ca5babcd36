"""Launchers with the real trainer: the local executor (always) and a real SLURM on localhost (when running).

Every job trains the debug model on CPU with 2 tasks (DeepSpeed, gloo) for a few steps at 32 px through a
two-stage curriculum. SLURM: CI starts it with `.ci/slurm.sh start` (../shared/slurm/start_slurm.sh).
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
from pathlib import Path

import pytest

from launch_helpers import (STEPS, TASK_ENV, finished, launch, logged_steps, needs_slurm, reached_step,
                            run_config, wait_for)
from launchers.cli import main as submit_cli
from launchers.manage import cancel, status, tail
from launchers.registry import read_jobs
from launchers.submit import RunBusyError, last_result, submit


@pytest.fixture(scope="module")
def dataset(launch_dataset) -> Path:
    return launch_dataset


def assert_resumed_once(run: Path, reference: Path, result: dict) -> None:
    assert result["status"] == "finished" and result["requeues"] == 1, (result, tail(run, 200))
    assert logged_steps(run) == logged_steps(reference)  # every step once, same losses as without the stop
    log = tail(run, 10_000)
    assert "[launcher] requeueing job" in log and "requeues so far 1" in log
    assert status(run)[-1]["requeues"] == 1


def test_local_two_task_job_runs_the_whole_curriculum(local_reference, capsys):
    run = local_reference
    assert [s for s, _ in logged_steps(run)] == list(range(1, sum(STEPS) + 1))
    result = last_result(run)
    assert (result["status"], result["step"], result["stage"]) == ("finished", 8, 1)
    assert result["checkpoint"].endswith("step_00000008")
    (entry,) = read_jobs(run)
    assert entry["cluster"] == "local" and Path(entry["folder"]).parent == run / "slurm"
    assert (status(run)[0]["state"], status(run)[0]["result"]) == ("FINISHED", "finished")
    log = tail(run, lines=200)
    assert "Job completed successfully" in log and "rank 1/2 master 127.0.0.1:" in log
    assert cancel(run) == []  # nothing left to cancel
    assert (run / "launcher" / "launch.json").exists() and (run / "launcher" / "run_config.yaml").exists()
    capsys.readouterr()
    submit_cli(["status", str(run)])
    assert re.search(rf"{entry['job_id']}\s+local\s+FINISHED\s+finished\s+0", capsys.readouterr().out)


def test_local_preemption_saves_requeues_and_resumes_identically(local_reference, dataset, tmp_path):
    run = tmp_path / "run"
    sub = submit(str(run_config(tmp_path / "run.yaml", run, dataset)), launch("local"))
    wait_for(lambda: reached_step(run, 3), "step 3")
    controller = sub.jobs[0]._process.pid
    tasks = [int(p) for p in subprocess.run(["pgrep", "-P", str(controller)], capture_output=True,
                                            text=True).stdout.split()]
    assert len(tasks) == 2
    for pid in tasks:
        os.kill(pid, signal.SIGUSR2)  # what SLURM sends before preemption / the time limit
    assert_resumed_once(run, local_reference, finished(sub.jobs[0]))


def test_local_cancel_busy_guard_and_a_clean_resubmission(dataset, tmp_path):
    run = tmp_path / "run"
    cfg = str(run_config(tmp_path / "run.yaml", run, dataset, steps=(500,)))
    first = submit(cfg, launch("local"))
    wait_for(lambda: reached_step(run, 1), "step 1")
    with pytest.raises(RunBusyError, match=f"unfinished jobs: {first.jobs[0].job_id} \\(RUNNING\\)"):
        submit(cfg, launch("local"))
    assert cancel(run) == [first.jobs[0].job_id]
    wait_for(lambda: status(run)[-1]["state"] == "INTERRUPTED", "the cancelled job to end", timeout=30)
    # submitted again (shorter): a new submission folder, its own result, the old job's files untouched
    second = submit(cfg, launch("local"), ["stages.0.steps=1"])
    assert finished(second.jobs[0])["status"] == "finished"
    rows = status(run)
    assert [r["state"] for r in rows] == ["INTERRUPTED", "FINISHED"]
    assert rows[0]["folder"] != rows[1]["folder"] and second.folder.parent == run / "slurm"


@needs_slurm
def test_slurm_two_task_job_finishes(local_reference, dataset, tmp_path):
    run = tmp_path / "run"
    sub = submit(str(run_config(tmp_path / "run.yaml", run, dataset)),
                 launch("slurm", partition="debug", extra_sbatch={"comment": "pixeldit-launcher-test"}))
    result = finished(sub.jobs[0])
    assert result["status"] == "finished", tail(run, 100)
    assert logged_steps(run) == logged_steps(local_reference)  # the same run, same numbers, whoever launches it
    job = subprocess.run(["scontrol", "show", "job", sub.jobs[0].job_id], capture_output=True, text=True).stdout
    nodes = re.search(r"\sNodeList=(\S+)", job).group(1)  # this machine's name, or n1/n2 on a two-node SLURM
    host = subprocess.run(["scontrol", "show", "hostnames", nodes], capture_output=True, text=True).stdout.split()[0]
    assert f"rank 1/2 master {host}:" in tail(run, 1000)  # MASTER_ADDR from SLURM's node list
    assert "Comment=pixeldit-launcher-test" in job and "Partition=debug" in job  # extra sbatch flags arrive
    # the result pickle lands a moment before SLURM marks the job done
    wait_for(lambda: status(run)[-1]["state"] == "COMPLETED", "COMPLETED", timeout=60)


@needs_slurm
def test_slurm_usr2_saves_requeues_and_resumes_identically(local_reference, dataset, tmp_path):
    run = tmp_path / "run"
    sub = submit(str(run_config(tmp_path / "run.yaml", run, dataset)), launch("slurm"))
    job_id = sub.jobs[0].job_id
    wait_for(lambda: reached_step(run, 3), "step 3")
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True)  # as SLURM does before preemption/limit
    assert_resumed_once(run, local_reference, finished(sub.jobs[0]))
    runs = subprocess.run(["sacct", "-n", "-X", "-P", "-D", "-j", job_id, "-o", "State"],
                          capture_output=True, text=True).stdout.split()
    assert len(runs) >= 2 and "REQUEUED" in runs, runs  # the same job id ran twice: requeued, then completed


@needs_slurm
def test_slurm_job_array_runs(dataset, tmp_path):
    base = tmp_path / "sweep"
    cfg = str(run_config(tmp_path / "run.yaml", base, dataset, steps=(1, 1)))
    env = [x for k, v in TASK_ENV.items() for x in ("--env", f"{k}={v}")]
    assert submit_cli(["submit", "--config", cfg, "--cluster", "slurm", "--tasks-per-node", "2", "--time-min", "10",
                       *env, "--array", "seed=1,2", "--wait"]) == 0
    runs = [base / "seed-1", base / "seed-2"]
    (first,), (second,) = (read_jobs(r) for r in runs)
    array_id = first["job_id"].split("_")[0]
    assert (first["job_id"], second["job_id"]) == (f"{array_id}_0", f"{array_id}_1")  # one array, two tasks
    assert first["folder"] == second["folder"] and Path(first["folder"]).parent == base / "slurm"
    assert [last_result(r)["status"] for r in runs] == ["finished", "finished"]
    assert logged_steps(runs[0]) != logged_steps(runs[1])  # each task trained its own seed
    wait_for(lambda: [status(r)[0]["state"] for r in runs] == ["COMPLETED"] * 2, "COMPLETED", 60)


@needs_slurm
def test_slurm_cancel(dataset, tmp_path):
    run = tmp_path / "run"
    sub = submit(str(run_config(tmp_path / "run.yaml", run, dataset, steps=(500,))), launch("slurm"))
    wait_for(lambda: status(run)[0]["state"] == "RUNNING", "RUNNING", timeout=60)
    assert cancel(run) == [sub.jobs[0].job_id]
    wait_for(lambda: status(run)[0]["state"] == "CANCELLED", "CANCELLED", timeout=60)
    assert cancel(run) == []
