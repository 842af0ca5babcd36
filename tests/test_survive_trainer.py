"""Runs that survive, the trainer half (issue 17): ``pixeldit-train`` under torchrun, 2 CPU ranks (gloo), debug
model, 32 px, a few steps; the faults come from the test hooks of ``pixeldit.train.fault_hooks``.

- the runtime preflight runs on a start and again on the resume; its results (both ranks, with their host)
  are in metrics.jsonl; a rank slowed by a test hook is flagged as a straggler with its host, the other never;
- a failing check (the disk threshold forced by the config) stops the run before any engine is built, with one
  error line naming host and rank, and the failed record in metrics.jsonl;
- a collective timeout: rank 1 stalls longer than ``distributed.step_timeout_s``; rank 0 fails within it, both
  ranks dump their stacks into the job's log folder ($PIXELDIT_LOG_DIR) and the error names the timeout key
  and that folder;
- SIGTERM to torchrun mid-run and again during a save (a hook holds the save before it is published): every
  trainer process is gone within ``SIGTERM_BOUND_S`` (4.5 s: the trainer's grace is 2 s, the rest is torchrun's
  forwarding and process exit on a machine loaded 10+ deep; torchrun itself within ``TORCHRUN_BOUND_S``, see
  there), ``latest`` keeps naming a complete checkpoint (the previous one after the interrupted save), and the
  run resumes from it and finishes.
"""
from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from pixeldit import run_folder
from pixeldit.train.fault_hooks import HANG_VAR, SAVE_DELAY_VAR, SLOW_RANK_VAR
from test_train_distributed import launch
from train_helpers import process_tree, write_tiny_dataset

pytestmark = pytest.mark.slow
SIGTERM_BOUND_S = 4.5  # < 5 s, the requirement; grace 2 s + torchrun's forwarding + process exit under load
# torchrun's own exit: its interpreter teardown alone (torch imported) measured 3.3-4.9 s at load 11-14 on 2 cores
# (a torchrun whose workers exit at once), which the trainer cannot shorten
TORCHRUN_BOUND_S = 15.0
HOST = socket.gethostname()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return write_tiny_dataset(tmp_path_factory.mktemp("data"), {"1.00": 16}, per_shard=4)


def write_config(path: Path, run_dir: Path, data: Path, steps: int, every: int = 2, **sections) -> Path:
    cfg = {"run_dir": str(run_dir), "seed": 1, "model": {"size": "debug"},
           "deepspeed": {"zero": "zero2", "precision": "bf16"}, "data": {"num_workers": 0},
           "logging": {"wandb": "disabled", "progress_bar": False},
           "checkpoint": {"every": every, "keep": 3}, "validation": {"every": 0},
           "node_check": {"allreduce_mb": 1.0, "read_mb": 1.0},
           "stages": [{"name": "a", "steps": steps, "data_path": str(data), "resolution": 32, "bucket_align": 16,
                       "micro_batch": 2, "lr": 1e-3}]}
    for key, values in sections.items():
        cfg.setdefault(key, {}).update(values)
    path.write_text(yaml.safe_dump(cfg))
    return path


def run(config: Path, log: Path, timeout: float = 900, **env_extra: str) -> int:
    return launch(config, log, **env_extra).wait(timeout=timeout)


def metrics(run_dir: Path, kind: str) -> list[dict]:
    return [r for r in run_folder.read_metrics(run_dir) if r["kind"] == kind]


def steps_logged(run_dir: Path) -> list[int]:
    path = run_dir / "losses.jsonl"
    return [json.loads(line)["step"] for line in path.read_text().splitlines()] if path.exists() else []


def test_preflight_on_start_and_resume_and_straggler_flag(dataset, tmp_path):
    run_dir, log = tmp_path / "run", tmp_path / "log.txt"
    straggler = {"every": 2, "windows": 2, "threshold": 0.2}
    config = write_config(tmp_path / "run.yaml", run_dir, dataset, steps=6, every=3, straggler=straggler)
    # rank 1 sleeps 2 s per step: flagged while the other rank's own step part stays under 4 s (2 ranks: the median
    # is their mean, so the slow one must be 1.5x the fast one)
    assert run(config, log, **{SLOW_RANK_VAR: "1:2.0"}) == 0, log.read_text()[-3000:]
    config = write_config(tmp_path / "run.yaml", run_dir, dataset, steps=8, every=3, straggler=straggler)
    assert run(config, log) == 0, log.read_text()[-3000:]  # resumes from step 6

    checks = metrics(run_dir, "preflight")
    assert [r["step"] for r in checks] == [0, 6] and all(r["ok"] for r in checks)
    for record in checks:
        assert [(r["rank"], r["host"]) for r in record["ranks"]] == [(0, HOST), (1, HOST)]
        for r in record["ranks"]:
            assert r["matmul_level"] == r["allreduce_level"] == r["read_level"] == "ok"
            assert r["matmul_value"] < 1e-4 and r["allreduce_value"] > 0 and r["read_value"] > 0
            assert r["disk_value"] > 0
    text = log.read_text()
    assert text.count("node check allreduce ok") == 2 and "node check read      ok   2 ranks" in text

    windows = metrics(run_dir, "straggler")
    first_run = [w for w in windows if w["step"] <= 6]
    assert [w["step"] for w in first_run] == [2, 4, 6]
    assert all(f["rank"] != 0 for w in windows for f in w["flagged"])  # the fast rank: never
    [flag] = first_run[-1]["flagged"]
    assert (flag["rank"], flag["host"]) == (1, HOST) and flag["slower_by"] > 0.2
    assert all(w["ranks"][1]["p50_s"] > w["ranks"][0]["p50_s"] + 1.5 for w in first_run)
    assert f"STRAGGLER: rank 1 on host {HOST}" in text and "STRAGGLER: rank 0" not in text
    assert all(not w["flagged"] for w in windows if w["step"] > 6)  # after the resume nobody is slowed


def test_failing_node_check_stops_the_run_with_one_line(dataset, tmp_path):
    run_dir, log = tmp_path / "run", tmp_path / "log.txt"
    config = write_config(tmp_path / "run.yaml", run_dir, dataset, steps=4,
                          node_check={"disk_warn_checkpoints": 1e12, "disk_fail_checkpoints": 1e12})
    assert run(config, log) != 0, log.read_text()[-3000:]
    # torchrun's report: the first rank to leave used the user-error code (the other may still be tearing down
    # when torchrun SIGTERMs it, after printing the same line)
    assert "exitcode  : 2" in log.read_text()
    # every rank prints the same one line (two ranks writing to one log may interleave: compare the intact ones)
    errors = re.findall(r"pixeldit-train: error: (node check (?:(?!pixeldit-train)[^\n])*?skips these checks)",
                        log.read_text())
    assert errors and len(set(errors)) == 1, errors
    assert f"node check disk failed on host {HOST} rank 0" in errors[0]
    assert "node_check.disk_fail_checkpoints=1e+12" in errors[0]
    assert "pixeldit/train" not in log.read_text()  # no trainer traceback (torchrun prints its own)
    [record] = metrics(run_dir, "preflight")
    assert record["ok"] is False and [r["disk_level"] for r in record["ranks"]] == ["fail", "fail"]
    assert not (run_dir / "checkpoints").exists() and steps_logged(run_dir) == []  # no engine was built


def test_collective_timeout_dumps_stacks_on_every_rank(dataset, tmp_path):
    run_dir, log, logs = tmp_path / "run", tmp_path / "log.txt", tmp_path / "joblogs"
    config = write_config(tmp_path / "run.yaml", run_dir, dataset, steps=5, every=100,
                          distributed={"step_timeout_s": 4})
    proc = launch(config, log, **{HANG_VAR: "1:3:90", "PIXELDIT_LOG_DIR": str(logs)})  # rank 1 stalls before step 3
    _wait_for(lambda: steps_logged(run_dir) != [], proc, log, "step 1")  # written as step 2 ends
    t0 = time.monotonic()
    code = proc.wait(timeout=600)
    text = log.read_text()
    # ended by the timeout (4 s) and torchrun's SIGTERM to the stalled rank (grace 3 s), long before the 90 s stall
    # ends; 60 s leaves room for a loaded machine
    assert code != 0 and time.monotonic() - t0 < 60, text[-3000:]
    assert "distributed.step_timeout_s=4" in text and f"Python stacks of every rank are in {logs}" in text
    rank0 = (logs / f"stacks_{HOST}_rank0.txt").read_text()
    assert "collective error after the first step (distributed.step_timeout_s=4)" in rank0
    assert "Timed out" in rank0 and "train_step" in rank0  # the failed collective's traceback
    rank1 = (logs / f"stacks_{HOST}_rank1.txt").read_text()
    assert "SIGTERM" in rank1 and "inject_step_faults" in rank1  # the stalled rank, where it stalled
    assert steps_logged(run_dir)[:1] == [1]


def _gone_within(proc: subprocess.Popen) -> tuple[float, float]:
    """SIGTERM torchrun (as SLURM or a user would); (seconds until every trainer process is gone, seconds until
    torchrun is gone too), asserted against ``SIGTERM_BOUND_S`` and ``TORCHRUN_BOUND_S``."""
    tree = process_tree(proc.pid)
    workers = [p for p in tree if p != proc.pid]
    assert len(workers) >= 2, tree
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    workers_s = None
    while _alive(proc.pid) and time.monotonic() - t0 < 60:
        if workers_s is None and not any(_alive(p) for p in workers):
            workers_s = time.monotonic() - t0
        proc.poll()  # reap torchrun itself
        time.sleep(0.02)
    total = time.monotonic() - t0
    workers_s = total if workers_s is None else workers_s
    assert workers_s < SIGTERM_BOUND_S, f"trainer processes still there {workers_s:.1f} s after SIGTERM"
    assert total < TORCHRUN_BOUND_S, f"torchrun still there {total:.1f} s after SIGTERM"
    return workers_s, total


def _alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return "\nState:\tZ" not in status  # a zombie has exited


def _wait_for(predicate, proc: subprocess.Popen, log: Path, what: str, timeout: float = 900) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, f"run ended before {what}:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"no {what} within {timeout} s"
        time.sleep(0.02)


def test_sigterm_mid_run_and_during_a_save(dataset, tmp_path):
    run_dir, log = tmp_path / "run", tmp_path / "log.txt"
    ckpts = run_dir / "checkpoints"
    config = write_config(tmp_path / "run.yaml", run_dir, dataset, steps=8, every=2,
                          distributed={"sigterm_grace_s": 2.0})
    # 1. mid-run: after step 3 is logged (checkpoint 2 is complete by then)
    proc = launch(config, log)
    _wait_for(lambda: max(steps_logged(run_dir), default=0) >= 3, proc, log, "step 3")
    _gone_within(proc)
    latest = run_folder.read_latest(ckpts)  # raises if `latest` names a damaged folder
    first = run_folder.step_of(latest)
    assert first >= 2 and run_folder.checkpoint_problem(latest, "full") is None

    # 2. during the save of the next checkpoint: held after its manifest, before it is published
    held = (first // 2 + 1) * 2
    staging = ckpts / run_folder.staging_dirname(held)
    proc = launch(config, log, **{SAVE_DELAY_VAR: f"{held}:120"})
    _wait_for(lambda: (staging / run_folder.MANIFEST).exists(), proc, log, f"the save of step {held}")
    _gone_within(proc)
    assert run_folder.read_latest(ckpts) == latest and run_folder.checkpoint_problem(latest, "full") is None
    assert not (ckpts / run_folder.step_dirname(held)).exists()

    # 3. the run resumes from it and finishes
    assert run(config, log) == 0, log.read_text()[-3000:]
    assert run_folder.step_of(run_folder.read_latest(ckpts)) == 8
    assert set(steps_logged(run_dir)) == set(range(1, 9))
    assert f"start at step {first}" in log.read_text()
