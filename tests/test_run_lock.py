"""One trainer per run folder (pixeldit.train.run_lock): issue 12.3.

Unit tests build holder records with ``run_lock.this_process`` and write them where ``run_folder.lock_path``
says: a live holder is refused with one line naming it; a stale one (dead pid on this host, a reused pid, no
heartbeat from another host, an earlier attempt of the same job) is taken over; an unreadable lock never is;
concurrent contenders for a stale lock leave exactly one winner; a holder whose lock was taken over finds out.
Slow tests start real trainers: two started 0.3 s apart (one runs, the other fails at once naming it), and a
2-rank trainer facing a held lock fails on every rank.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pixeldit import run_folder
from pixeldit.train.run_lock import RunFolderLocked, RunLock, RunLockLost, _process_start, this_process
from train_helpers import ROOT, torchrun, write_tiny_dataset

HOST = socket.gethostname()


def plant(run: Path, mtime_age: float = 0.0, **fields) -> dict:
    """Write a holder record (this process's, with ``fields`` changed) as the run's lock file."""
    record = {**this_process(), **fields}
    path = run_folder.lock_path(run)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record))
    if mtime_age:
        old = time.time() - mtime_age
        os.utime(path, (old, old))
    return record


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_lock_is_exclusive_and_names_its_holder(tmp_path):
    run = tmp_path / "run"
    first = RunLock(run, job_id="77")
    assert first.acquire() is None
    held = json.loads(run_folder.lock_path(run).read_text())
    assert (held["host"], held["pid"], held["job_id"]) == (HOST, os.getpid(), "77")
    with pytest.raises(RunFolderLocked) as err:
        RunLock(run).acquire()
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"run folder {run} is in use by another trainer (pid {os.getpid()} on {HOST}, job 77, ")
    first.check()  # still ours
    first.release()
    assert not run_folder.lock_path(run).exists() and sorted(run.iterdir()) == []  # no temp files left either
    with RunLock(run):
        assert run_folder.lock_path(run).exists()
    assert not run_folder.lock_path(run).exists()


@pytest.mark.parametrize("case", ["dead pid", "reused pid", "zombie"])
def test_stale_lock_on_this_host_is_taken_over_at_once(tmp_path, case):
    run = tmp_path / "run"
    if case == "dead pid":
        pid = dead_pid()
        plant(run, pid=pid, pid_start=None)
        reason = f"pid {pid} is not running"
    elif case == "reused pid":  # the pid runs, but it is another process (started at another time)
        pid = os.getpid()
        plant(run, pid_start="1")
        reason = f"pid {pid} is gone"
    else:  # killed, not yet reaped by its parent
        proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        plant(run, pid=proc.pid, pid_start=_process_start(proc.pid))
        proc.kill()
        time.sleep(0.2)  # a zombie until proc.wait()
        pid, reason = proc.pid, f"pid {proc.pid} is gone"
    lock = RunLock(run)
    note = lock.acquire()
    try:
        assert note.startswith(f"{run_folder.lock_path(run)}: took over the lock of pid {pid} on {HOST}")
        assert reason in note and json.loads(run_folder.lock_path(run).read_text())["token"] == lock.me["token"]
    finally:
        lock.release()
        if case == "zombie":
            proc.wait()


def test_another_hosts_lock_is_stale_only_without_heartbeat(tmp_path):
    run = tmp_path / "run"
    plant(run, host="node-b", pid=1)
    with pytest.raises(RunFolderLocked, match=r"\(pid 1 on node-b, since .*after 300 s without heartbeat"):
        RunLock(run).acquire()
    plant(run, mtime_age=400, host="node-b", pid=1)
    lock = RunLock(run)
    assert "no heartbeat for 4" in lock.acquire()
    lock.release()


def test_a_requeued_job_takes_over_its_earlier_attempt_on_any_host(tmp_path):
    run = tmp_path / "run"
    plant(run, host="node-b", pid=1, job_id="123", attempt=0)  # fresh heartbeat, other host
    with pytest.raises(RunFolderLocked, match="job 123"):  # the same attempt: two trainers in one job
        RunLock(run, job_id="123", attempt=0).acquire()
    with pytest.raises(RunFolderLocked, match="job 123"):  # another job
        RunLock(run, job_id="999", attempt=5).acquire()
    lock = RunLock(run, job_id="123", attempt=1)
    assert "an earlier attempt of job 123" in lock.acquire()
    lock.release()


def test_job_id_and_attempt_come_from_the_scheduler(monkeypatch):
    monkeypatch.delenv("PIXELDIT_JOB_ID", raising=False)
    monkeypatch.delenv("PIXELDIT_JOB_ATTEMPT", raising=False)
    monkeypatch.setenv("SLURM_JOB_ID", "555")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
    assert (this_process()["job_id"], this_process()["attempt"]) == ("555", 2)
    monkeypatch.setenv("PIXELDIT_JOB_ID", "555_3")  # set by launchers.job: submitit's id wins
    monkeypatch.setenv("PIXELDIT_JOB_ATTEMPT", "4")
    assert (this_process()["job_id"], this_process()["attempt"]) == ("555_3", 4)


def test_an_unreadable_lock_is_never_taken_over(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    run_folder.lock_path(run).write_bytes(b"\x00\xff half written")
    with pytest.raises(RunFolderLocked, match="in use by another trainer \\(an unreadable lock file\\)"):
        RunLock(run).acquire()


def test_heartbeat_refreshes_and_a_lost_lock_is_noticed(tmp_path):
    run = tmp_path / "run"
    lock = RunLock(run, heartbeat_s=0.05)
    lock.acquire()
    path = run_folder.lock_path(run)
    os.utime(path, (1000.0, 1000.0))
    deadline = time.time() + 10
    while path.stat().st_mtime == 1000.0:
        assert time.time() < deadline, "no heartbeat"
        time.sleep(0.05)
    other = plant(run, host="node-c", pid=9)  # another trainer took it over (it looked stale there)
    with pytest.raises(RunLockLost, match=r"lost the run-folder lock, now held by pid 9 on node-c"):
        lock.check()
    lock.release()
    assert json.loads(path.read_text())["token"] == other["token"]  # release leaves the new holder's lock alone


def _contend(run: str, start, results, done) -> None:
    start.wait()
    lock = RunLock(run)
    try:
        lock.acquire()
    except RunFolderLocked:
        results.put("refused")
        return
    results.put("won")
    done.wait(30)
    lock.release()


def test_concurrent_takeover_of_a_stale_lock_has_one_winner(tmp_path):
    run = tmp_path / "run"
    plant(run, pid=dead_pid(), pid_start=None)
    ctx = multiprocessing.get_context("fork")
    start, done, results = ctx.Barrier(6), ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_contend, args=(str(run), start, results, done)) for _ in range(6)]
    for p in procs:
        p.start()
    outcomes = sorted(results.get(timeout=60) for _ in procs)
    done.set()
    for p in procs:
        p.join(30)
    assert outcomes == ["refused"] * 5 + ["won"]
    assert sorted(p.name for p in run.iterdir()) == []  # released; no temp or moved-aside file left


# --- real trainers --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return write_tiny_dataset(tmp_path_factory.mktemp("data"), {"1.00": 16}, per_shard=4)


def write_config(path: Path, run_dir: Path, data: Path, seed: int, steps: int = 12) -> Path:
    cfg = {"run_dir": str(run_dir), "seed": seed, "model": {"size": "debug"},
           "deepspeed": {"zero": "zero2", "precision": "fp32"}, "data": {"num_workers": 0},
           "logging": {"wandb": "disabled", "progress_bar": False}, "checkpoint": {"every": 4, "keep": 2},
           "stages": [{"name": "a", "steps": steps, "data_path": str(data), "resolution": 32, "bucket_align": 16,
                       "micro_batch": 2, "lr": 1e-3}]}
    path.write_text(yaml.safe_dump(cfg))
    return path


def single_process_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", WANDB_MODE="disabled")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return env


@pytest.mark.slow
def test_two_trainers_started_together_one_runs_the_other_fails_at_once(dataset, tmp_path):
    """Issue 12.3: seeds 7 and 8 started 0.3 s apart both exited 0 and interleaved losses.jsonl."""
    run = tmp_path / "run"
    procs = {}
    for seed in (7, 8):
        cmd = [sys.executable, "-m", "pixeldit.train.cli", "--config",
               str(write_config(tmp_path / f"seed{seed}.yaml", run, dataset, seed))]
        procs[seed] = subprocess.Popen(cmd, env=single_process_env(), cwd=ROOT, stdout=subprocess.PIPE,
                                       stderr=subprocess.STDOUT, text=True)
        time.sleep(0.3)
    outs = {seed: p.communicate(timeout=300)[0] for seed, p in procs.items()}
    codes = {seed: p.returncode for seed, p in procs.items()}
    assert sorted(codes.values())[0] == 0 and sorted(codes.values())[1] != 0, (codes, outs)
    winner = next(s for s, c in codes.items() if c == 0)
    loser = next(s for s, c in codes.items() if c != 0)
    errors = [line for line in outs[loser].splitlines() if ": error: " in line]
    assert codes[loser] == 2 and len(errors) == 1, outs[loser][-3000:]  # one line, exit code 2
    assert errors[0].startswith(f"pixeldit-train: error: run folder {run} is in use by another trainer "
                                f"(pid {procs[winner].pid} on {HOST}, since "), errors
    records = [json.loads(line) for line in (run / "losses.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 13))  # one trainer's steps, once each
    assert yaml.safe_load((run / "config.yaml").read_text())["seed"] == winner
    assert (run / "checkpoints" / "latest").read_text() == "step_00000012"
    assert not run_folder.lock_path(run).exists()


@pytest.mark.slow
def test_every_rank_fails_together_on_a_held_run_folder(dataset, tmp_path):
    run = tmp_path / "run"
    with RunLock(run, job_id="1"):
        cmd, env = torchrun(write_config(tmp_path / "run.yaml", run, dataset, seed=1))
        proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert proc.returncode != 0
        line = f"pixeldit-train: error: run folder {run} is in use by another trainer (pid {os.getpid()} on {HOST}, job 1"
        # each rank: one line (both hold the outcome before either raises; torchrun may still stop rank 1 first)
        assert 1 <= sum(x.startswith(line) for x in proc.stderr.splitlines()) <= 2, proc.stderr[-3000:]
        assert sorted(p.name for p in run.iterdir()) == [run_folder.LOCK]  # nothing else was written
