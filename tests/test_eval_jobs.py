"""Eval jobs tied to the scheduler (launchers.eval_jobs) and ``pixeldit-release --best``.

A 1-task debug run that checkpoints every 2 steps (keep 1: the step-2 folder is pruned at step 4, while its
eval job may still wait) is submitted with an eval config (every checkpoint; FID of 4 generated images
against the dataset with a tiny random-weight Inception in clean-fid's file format). With no manual step,
metrics.jsonl gets an eval record at steps 2 and 4, each eval folder its results.json, and the pinned weights
are gone afterwards. ``pixeldit-submit status RUN`` lists the eval jobs below the training job: job id, the
checkpoint step, state, metrics; an eval job that fails (its reference set is missing) shows its error line.
Local executor always; the real SLURM on this machine when it runs.
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import yaml

from eval_fixtures import save_tiny_inception
from launchers.cli import main as submit_cli
from launchers.config import LaunchConfig
from launchers.eval_jobs import JOB_FILE, PINNED, EvalJobConfig, due, eval_results, submit_eval
from launchers.submit import submit
from pixeldit import run_folder
from launch_helpers import TASK_ENV, finished, launch, needs_slurm, run_config, wait_for
from train_helpers import write_tiny_dataset


def test_due_steps_and_config_errors(tmp_path, capsys):
    assert [s for s in range(1, 12) if due(s, 2, 2, 11)] == [4, 8, 11]
    bad = tmp_path / "eval.yaml"
    bad.write_text(yaml.safe_dump({"every": 1, "protocol": {"prompts": "classes", "source": "0-1",
                                                            "metrics": ["fid"], "reference": "/x"}}))
    with pytest.raises(ValueError, match=r"eval config .*eval.yaml: metric fid needs --inception FILE"):
        EvalJobConfig.load(bad)
    bad.write_text(yaml.safe_dump({"every": 1, "protocol": {"prompts": "classes", "source": "0-1", "colour": 1}}))
    with pytest.raises(ValueError, match=r"unknown protocol keys \['colour'\]"):
        EvalJobConfig.load(bad)
    assert submit_cli(["submit", "--eval", str(bad), f"run_dir={tmp_path / 'run'}"]) == 2  # the CLI: one line
    err = capsys.readouterr().err.strip()
    assert err.startswith("pixeldit-submit: error: eval config") and "colour" in err and "\n" not in err
    local = EvalJobConfig(protocol={"prompts": "classes", "source": "0-1"})
    with pytest.raises(ValueError, match="eval jobs on cluster='local' but training on 'slurm'"):
        submit(None, LaunchConfig(cluster="slurm", time_min=5), [f"run_dir={tmp_path / 'run'}"], evals=local)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return write_tiny_dataset(tmp_path_factory.mktemp("data"), {"1.00": 8}, per_shard=4)


def eval_config(tmp_path: Path, data: Path, cluster: str) -> EvalJobConfig:
    inception = save_tiny_inception(tmp_path / "weights")
    extra = {"partition": "debug"} if cluster == "slurm" else {}
    return EvalJobConfig(
        every=1, launch=dataclasses.replace(launch(cluster, **extra), tasks_per_node=1),
        protocol={"prompts": "classes", "source": "0-1", "images_per_prompt": 2, "sampler": "euler", "steps": 2,
                  "metrics": ["fid"], "reference": str(data), "reference_images": 8},
        resources={"inception": str(inception), "device": "cpu", "batch_size": 4, "workers": 0,
                   "save_images": False, "stats_cache": str(tmp_path / "stats")})


def submit_with_evals(tmp_path: Path, data: Path, cluster: str) -> Path:
    run = tmp_path / "run"
    cfg = run_config(tmp_path / "run.yaml", run, data, steps=(4,))
    text = yaml.safe_load(cfg.read_text())
    text["checkpoint"] = {"every": 2, "keep": 1}
    text["validation"] = {"every": 0}
    cfg.write_text(yaml.safe_dump(text))
    evals = eval_config(tmp_path, data, cluster)
    extra = {"partition": "debug"} if cluster == "slurm" else {}
    sub = submit(str(cfg), dataclasses.replace(launch(cluster, **extra), tasks_per_node=1), evals=evals)
    assert finished(sub.jobs[0])["status"] == "finished"
    return run


def status_output(run: Path, capsys, *flags: str) -> str:
    capsys.readouterr()
    assert submit_cli(["status", str(run), *flags]) == 0
    return capsys.readouterr().out


def eval_table(run: Path, capsys) -> dict[int, list[str]]:
    """{step: [job id, step, cluster, state, result...]} of the eval table of ``pixeldit-submit status``."""
    out = status_output(run, capsys)
    assert "\neval jobs:\n" in out, out
    lines = out.split("\neval jobs:\n")[1].splitlines()
    assert lines[0].split() == ["eval", "job", "step", "cluster", "state", "result", "folder"], out
    return {int(line.split()[1]): line.split() for line in lines[1:]}


def check_eval_results(run: Path, cluster: str, capsys) -> None:
    wait_for(lambda: sorted(eval_results(run)) == [2, 4], "eval records at steps 2 and 4", timeout=600)
    for step, record in eval_results(run).items():
        assert math.isfinite(record["fid"]) and record["images"] == 4
        folder = run_folder.eval_dir(run, step)
        assert json.loads((folder / "results.json").read_text())["model"]["step"] == step
        wait_for(lambda: not (folder / PINNED).exists(), "the pinned weights removed", timeout=60)
    assert [p.name for p in run_folder.step_dirs(run / "checkpoints")] == ["step_00000004"]  # keep 1

    # pixeldit-submit status: the eval jobs below the training job, with their step, state and metrics
    done = "COMPLETED" if cluster == "slurm" else "FINISHED"
    wait_for(lambda: [r[3] for r in eval_table(run, capsys).values()] == [done, done], "eval jobs ended",
             timeout=120)
    table = eval_table(run, capsys)
    assert sorted(table) == [2, 4]
    for step, row in table.items():
        submitted = json.loads((run_folder.eval_dir(run, step) / JOB_FILE).read_text())
        assert row[0] == submitted["job_id"] and row[2] == cluster
        assert row[4] == f"fid={eval_results(run)[step]['fid']:.4g}" and row[-1] == submitted["folder"]
    rows = [json.loads(line) for line in status_output(run, capsys, "--json").splitlines()]
    assert [(r.get("kind"), r.get("step")) for r in rows[1:]] == [("eval", 2), ("eval", 4)]


@pytest.mark.slow
def test_local_run_gets_eval_results_at_its_checkpoints(dataset, tmp_path, monkeypatch, capsys):
    for key, value in TASK_ENV.items():
        monkeypatch.setenv(key, value)
    run = submit_with_evals(tmp_path, dataset, "local")
    check_eval_results(run, "local", capsys)

    # a failing eval job (its reference set is gone): status shows its state and the error's last line
    evals = eval_config(tmp_path, dataset, "local")
    missing = tmp_path / "no_such_set"
    broken = dataclasses.replace(evals, protocol={**evals.protocol, "reference": str(missing)})
    job = submit_eval(run, 3, run / "checkpoints" / "step_00000004", broken)
    with pytest.raises(Exception):
        job.result()
    row = eval_table(run, capsys)[3]
    assert row[:4] == [job.job_id, "3", "local", "FAILED"], row
    assert f"error: FileNotFoundError: reference '{missing}'" in " ".join(row), row


@pytest.mark.slurm
@needs_slurm
def test_slurm_run_gets_eval_results_at_its_checkpoints(dataset, tmp_path, monkeypatch, capsys):
    for key, value in TASK_ENV.items():
        monkeypatch.setenv(key, value)
    check_eval_results(submit_with_evals(tmp_path, dataset, "slurm"), "slurm", capsys)
