"""Fixtures shared by several test files; the grouping of tests on pytest-xdist workers; SLURM cleanup."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from launch_helpers import TASK_ENV, run_config
from launchers.cli import main as submit_cli
from train_helpers import set_single_rank, write_tiny_dataset

if os.environ.get("PYTEST_XDIST_WORKER"):
    # two workers on two cores: one intra-op thread each (and in every process they start). Two threads per
    # worker bought 7% of wall time alone and cost 25% more CPU (tests/test_model.py, idle machine), which the
    # other worker then lacks.
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the marks (its own modifyitems)
def pytest_collection_modifyitems(config, items):
    """For ``-n 2 --dist loadgroup`` (the README's test command): the tests of a file run on one worker (its module
    fixtures are built once), and every test marked ``slurm`` on the same worker, one at a time (the two nodes of
    the local SLURM serve one job at a time); the SLURM group goes first, as it is the longest."""
    for item in items:
        group = "slurm" if item.get_closest_marker("slurm") else item.path.stem
        item.add_marker(pytest.mark.xdist_group(group))
    items.sort(key=lambda item: item.get_closest_marker("slurm") is None)  # stable: the rest keeps its order


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    # a failed SLURM test (an assertion, a pytest-timeout) cancels every job still queued or running: a stuck job
    # never takes the nodes from the next test
    if report.failed and item.get_closest_marker("slurm") and shutil.which("squeue"):
        try:
            jobs = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True,
                                  timeout=30).stdout.split()
            if jobs:
                subprocess.run(["scancel", *jobs], capture_output=True, timeout=30)
        except (OSError, subprocess.SubprocessError) as err:
            jobs = [f"(none: {err})"]
        if jobs:
            report.sections.append(("SLURM cleanup", f"cancelled the jobs left queued or running: {' '.join(jobs)}"))


@pytest.fixture
def single_rank(monkeypatch):
    """This process is rank 0 of a 1-rank DeepSpeed job on the CPU."""
    set_single_rank(monkeypatch)


@pytest.fixture(scope="session")
def launch_dataset(tmp_path_factory) -> Path:
    """The launcher tests' dataset: 16 samples, two aspect buckets."""
    return write_tiny_dataset(tmp_path_factory.mktemp("data"), {"1.00": 8, "0.50": 8}, per_shard=4)


@pytest.fixture(scope="session")
def local_reference(launch_dataset, tmp_path_factory) -> Path:
    """An uninterrupted 2-task run of ``launch_helpers.run_config`` submitted through the CLI (local executor):
    the numbers every launcher test (local, SLURM, two nodes, after kills and requeues) must reproduce."""
    tmp = tmp_path_factory.mktemp("local_ref")
    cfg = run_config(tmp / "run.yaml", tmp / "run", launch_dataset)
    env = [x for k, v in TASK_ENV.items() for x in ("--env", f"{k}={v}")]
    assert submit_cli(["submit", "--config", str(cfg), "--cluster", "local", "--tasks-per-node", "2", *env,
                       "--wait"]) == 0
    return tmp / "run"
