"""One error policy for every console script: a user's mistake is ONE line on stderr naming the culprit, exit 2.

``CLI_ERROR_CASES`` rows: (id, argv with argv[0] the console script of pyproject.toml and "{tmp}" a fresh
folder, setup(tmp) writing the files the row needs or None, a substring naming the culprit). Each row runs
the script's entry point in this process.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest
import torch.distributed as dist

from cli_helpers import console_scripts, debug_run_config, entry_point


def _run_yaml(**top) -> Callable[[Path], None]:
    """Setup: {tmp}/run.yaml, a debug run into {tmp}/run reading the (absent) dataset {tmp}/data."""
    def setup(tmp: Path) -> None:
        debug_run_config(tmp / "run.yaml", tmp / "run", tmp / "data", **top)
    return setup


RUN_YAML = _run_yaml()
TRAIN = ["pixeldit-train", "--config", "{tmp}/run.yaml"]
SUBMIT = ["pixeldit-submit", "submit", "--config", "{tmp}/run.yaml"]

CLI_ERROR_CASES: list[tuple[str, list[str], Callable[[Path], None] | None, str]] = [
    ("train-unknown-yaml-key", TRAIN, _run_yaml(optim={"lrr": 1}), "optim.lrr"),
    ("train-negative-batch", [*TRAIN, "stages.0.micro_batch=-4"], RUN_YAML, "micro_batch=-4"),
    ("train-resolution-not-multiple-of-16", [*TRAIN, "stages.0.resolution=72"], RUN_YAML, "resolution=72"),
    ("train-bucket-align-not-multiple-of-16", [*TRAIN, "stages.0.bucket_align=24", "stages.0.resolution=48"],
     RUN_YAML, "bucket_align=24"),
    ("train-missing-data-path", TRAIN, RUN_YAML, "data_path"),
    ("train-bad-override-syntax", [*TRAIN, "stages.0.lr"], RUN_YAML, "stages.0.lr"),
    ("train-unknown-override-key", [*TRAIN, "optim.lrr=1"], RUN_YAML, "optim.lrr"),
    ("train-unknown-model-size", [*TRAIN, "model.size=XXL"], RUN_YAML, "XXL"),
    ("train-wrong-value-type", [*TRAIN, "stages.0.steps=many"], RUN_YAML, "stages.0.steps"),
    ("train-missing-config-file", ["pixeldit-train", "--config", "{tmp}/nope.yaml"], None, "nope.yaml"),
    ("train-bad-flag", ["pixeldit-train", "--frobnicate"], None, "--frobnicate"),
    ("data-bad-choice", ["pixeldit-data", "run", "{tmp}/u.parquet", "--out", "{tmp}/o", "--resize", "huge"], None,
     "huge"),
    ("data-missing-dataset", ["pixeldit-data", "stats", "{tmp}/nowhere"], None, "nowhere"),
    ("data-unknown-command", ["pixeldit-data", "frobnicate"], None, "frobnicate"),
    ("submit-bad-number", ["pixeldit-submit", "submit", "--nodes", "two"], None, "two"),
    ("submit-slurm-without-time-limit", ["pixeldit-submit", "submit", "--cluster", "slurm"], None, "time_min"),
    ("submit-unknown-run", ["pixeldit-submit", "status", "{tmp}/norun"], None, "norun"),
    ("submit-unknown-yaml-key", SUBMIT, _run_yaml(optim={"lrr": 1}), "optim.lrr"),
    ("submit-missing-data-path", SUBMIT, RUN_YAML, "data_path"),
    ("flops-unknown-size", ["pixeldit-flops", "--size", "XXL"], None, "XXL"),
    ("flops-resolution-not-multiple-of-16", ["pixeldit-flops", "--size", "debug", "--res", "100"], None, "100x100"),
    ("flops-bad-resolution", ["pixeldit-flops", "--size", "debug", "--res", "3y"], None, "3y"),
    ("quickstart-bad-choice", ["pixeldit-quickstart", "--cluster", "k8s"], None, "k8s"),
    ("quickstart-bad-number", ["pixeldit-quickstart", "--steps-per-stage", "many"], None, "many"),
]
# the release package's scripts (issue 11 part B) bring their own rows; empty this set when they are merged
ROWS_ELSEWHERE = {"pixeldit-release", "pixeldit-sample"}


def run_case(case_id: str, tmp: Path, capsys, extra: tuple[str, ...] = ()) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of the row ``case_id`` run in ``tmp``."""
    _, argv, setup, _ = next(c for c in CLI_ERROR_CASES if c[0] == case_id)
    if setup is not None:
        setup(tmp)
    main = entry_point(argv[0])  # imported before capturing
    capsys.readouterr()
    code = main([a.format(tmp=tmp) for a in argv[1:]] + list(extra))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("case_id, culprit", [(c[0], c[3]) for c in CLI_ERROR_CASES], ids=[c[0] for c in CLI_ERROR_CASES])
def test_user_error_is_one_line_naming_the_culprit(case_id, culprit, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("PIXELDIT_TRACEBACK", raising=False)
    script = next(c[1][0] for c in CLI_ERROR_CASES if c[0] == case_id)
    code, out, err = run_case(case_id, tmp_path, capsys)
    assert code == 2, (out, err)
    assert out == "" and len(err.splitlines()) == 1, err
    assert err.startswith(f"{script}: error: ") and culprit in err, err


def test_every_console_script_has_rows():
    assert set(console_scripts()) - {c[1][0] for c in CLI_ERROR_CASES} == ROWS_ELSEWHERE


def test_missing_data_is_found_before_anything_starts(tmp_path, capsys, monkeypatch):
    """No process group, no run folder, no wandb run: the dataset is checked first."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    code, _, err = run_case("train-missing-data-path", tmp_path, capsys, extra=("logging.wandb=offline",))
    assert code == 2 and f"{tmp_path}/data" in err and "manifest.parquet" in err
    assert not (tmp_path / "run").exists() and not dist.is_initialized()
    code, _, err = run_case("submit-missing-data-path", tmp_path, capsys)
    assert code == 2 and not (tmp_path / "run").exists()  # nothing submitted, no launcher folder


def test_traceback_switch_shows_the_traceback(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("PIXELDIT_TRACEBACK", raising=False)
    code, _, err = run_case("train-unknown-yaml-key", tmp_path, capsys, extra=("--traceback",))
    assert code == 2 and "Traceback (most recent call last)" in err
    assert err.splitlines()[-1].startswith("pixeldit-train: error: ") and "optim.lrr" in err.splitlines()[-1]
