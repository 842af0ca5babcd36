"""One error policy for every console script: a user's mistake is ONE line on stderr naming the culprit, exit 2.

``CLI_ERROR_CASES`` rows: (id, argv with argv[0] the console script of pyproject.toml and "{tmp}" a fresh
folder, setup(tmp) writing the files the row needs or None, a substring naming the culprit). Each row runs
the script's entry point in this process.
"""
from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Callable

import pytest
import torch
import torch.distributed as dist

from cli_helpers import console_scripts, debug_run_config, entry_point
from train_helpers import write_tiny_dataset
from pixeldit import run_folder
from pixeldit.models import build_model, get_model_args
from pixeldit.release import CONFIG_FILE, SINGLE_FILE, ReleaseConfig
from pixeldit.release.writer import save_release


def _run_yaml(**top) -> Callable[[Path], None]:
    """Setup: {tmp}/run.yaml, a debug run into {tmp}/run reading the (absent) dataset {tmp}/data."""
    def setup(tmp: Path) -> None:
        debug_run_config(tmp / "run.yaml", tmp / "run", tmp / "data", **top)
    return setup


# --- release / sample fixtures: each builds one bad input under tmp (the row names it through {tmp}/...) -----

def empty_folder(tmp: Path) -> Path:
    (tmp / "empty").mkdir()
    return tmp / "empty"


def release(tmp: Path, size: str = "debug", text_encoder: str = "") -> Path:
    """A valid release of a freshly initialised model (made through the writer)."""
    cfg = ReleaseConfig(model_args=get_model_args(size).to_dict(), resolution=32, dtype="fp32",
                        text_encoder=text_encoder)
    return save_release(build_model(cfg.args()).state_dict(), cfg, tmp / "release")


def release_of_unknown_size(tmp: Path) -> Path:
    folder = release(tmp)
    cfg = json.loads((folder / CONFIG_FILE).read_text())
    cfg["model_args"]["name"] = "XXL/99"
    (folder / CONFIG_FILE).write_text(json.dumps(cfg))
    return folder


def release_with_weights(data: Callable[[bytes], bytes]) -> Callable[[Path], Path]:
    """A release whose model.safetensors holds ``data(original bytes)``."""
    def build(tmp: Path) -> Path:
        folder = release(tmp)
        weights = folder / SINGLE_FILE
        weights.write_bytes(data(weights.read_bytes()))
        return folder
    build.__name__ = f"release_with_{data.__name__}_weights"
    return build


def truncated(b: bytes) -> bytes:
    return b[: len(b) // 2]


def empty(b: bytes) -> bytes:
    return b""


def renamed_pickle(b: bytes) -> bytes:
    buf = io.BytesIO()
    torch.save({"w": torch.ones(2)}, buf)  # a torch.save file renamed to model.safetensors
    return buf.getvalue()


def text_release_with_unknown_encoder(tmp: Path) -> Path:
    return release(tmp, "debug-T2I", text_encoder="acme/encoder-nobody-has")


def run_without_checkpoint(tmp: Path) -> Path:
    (tmp / "run").mkdir()
    (tmp / "run" / run_folder.RUN_CONFIG).write_text("seed: 0\n")
    return tmp / "run"


def run_with_dangling_latest(tmp: Path) -> Path:
    ckpts = run_folder.checkpoints_dir(tmp / "run")
    ckpts.mkdir(parents=True)
    run_folder.write_latest(ckpts, ckpts / run_folder.step_dirname(7))  # names a folder that is not there
    return tmp / "run"


def truncated_step(tmp: Path) -> Path:
    """A step folder whose optimizer partition lost its second half after the manifest was written."""
    step_dir = run_folder.checkpoints_dir(tmp / "run") / run_folder.step_dirname(3)
    step_dir.mkdir(parents=True)
    run_folder.write_meta(step_dir, {"step": 3, "model_args": get_model_args("debug").to_dict()})
    (step_dir / "optim_states.pt").write_bytes(bytes(1000))
    run_folder.write_manifest(step_dir, {n: run_folder.file_sha256(step_dir / n)
                                         for n in run_folder.checkpoint_files(step_dir)})
    (step_dir / "optim_states.pt").write_bytes(bytes(500))
    return step_dir


def step_of_unknown_size(tmp: Path) -> Path:
    step_dir = run_folder.checkpoints_dir(tmp / "run") / run_folder.step_dirname(3)
    step_dir.mkdir(parents=True)
    args = {**get_model_args("debug").to_dict(), "name": "XXL/99"}
    run_folder.write_meta(step_dir, {"step": 3, "model_args": args})
    return step_dir


def run_yaml_with_data(tmp: Path) -> None:
    """{tmp}/run.yaml of RUN_YAML and a dataset at {tmp}/data, so preflight gets past the data to the checkpoints."""
    RUN_YAML(tmp)
    write_tiny_dataset(tmp / "data", {"1.00": 2})


def run_yaml_with_text_release(tmp: Path) -> None:
    """run_yaml_with_data and {tmp}/release: a release of another architecture (debug-T2I) than the run's (debug)."""
    run_yaml_with_data(tmp)
    release(tmp, "debug-T2I")


RUN_YAML = _run_yaml()
SAMPLE = ["pixeldit-sample", "--out", "{tmp}/samples", "--model"]
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
    ("train-missing-init-from", [*TRAIN, "checkpoint.init_from={tmp}/norelease"], run_yaml_with_data,
     "checkpoint.init_from='{tmp}/norelease' not found"),
    ("train-init-from-other-architecture", [*TRAIN, "checkpoint.init_from={tmp}/release"], run_yaml_with_text_release,
     "checkpoint.init_from={tmp}/release: the release's architecture differs"),
    ("train-missing-config-file", ["pixeldit-train", "--config", "{tmp}/nope.yaml"], None, "nope.yaml"),
    ("train-bad-flag", ["pixeldit-train", "--frobnicate"], None, "--frobnicate"),
    ("train-bad-stage-filter", [*TRAIN, "stages.0.filter=aesthetic >>= 6"], RUN_YAML,
     ".filter: filter 'aesthetic >>= 6'"),
    ("data-bad-choice", ["pixeldit-data", "run", "{tmp}/u.parquet", "--out", "{tmp}/o", "--resize", "huge"], None,
     "huge"),
    ("data-missing-dataset", ["pixeldit-data", "stats", "{tmp}/nowhere"], None, "nowhere"),
    ("data-unknown-command", ["pixeldit-data", "frobnicate"], None, "frobnicate"),
    ("data-score-missing-dataset", ["pixeldit-data", "score", "{tmp}/nowhere", "--clip", "{tmp}/clip"], None,
     "nowhere"),
    ("data-dedupe-before-score", ["pixeldit-data", "dedupe", "{tmp}/nowhere"], None, "nowhere"),
    ("data-bad-task-count", ["pixeldit-data", "shard", "{tmp}/i", "--out", "{tmp}/o", "--tasks", "0"], None,
     "--tasks"),
    ("data-slurm-without-time-limit", ["pixeldit-data", "shard", "{tmp}/i", "--out", "{tmp}/o", "--tasks", "2",
                                       "--cluster", "slurm"], None, "time_min"),
    ("data-bad-cluster", ["pixeldit-data", "ingest", "{tmp}/u.parquet", "--out", "{tmp}/o", "--cluster", "k8s"], None,
     "k8s"),
    ("data-bad-filter", ["pixeldit-data", "ingest", "{tmp}/u.parquet", "--out", "{tmp}/o", "--filter",
                         "aesthetic >>= 5"], None, "'aesthetic >>= 5'"),
    ("data-meta-col-takes-a-pipeline-name", ["pixeldit-data", "ingest", "{tmp}/u.parquet", "--out", "{tmp}/o",
                                             "--meta-cols", "aesthetic,url"], None, "'url'"),
    ("data-status-missing-root", ["pixeldit-data", "status", "{tmp}/nowhere"], None, "{tmp}/nowhere"),
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
    ("release-empty-folder", ["pixeldit-release", "{tmp}/empty", "{tmp}/out"], empty_folder, "{tmp}/empty"),
    ("release-run-without-checkpoint", ["pixeldit-release", "{tmp}/run", "{tmp}/out"], run_without_checkpoint,
     "checkpoints/latest"),
    ("release-dangling-latest", ["pixeldit-release", "{tmp}/run", "{tmp}/out"], run_with_dangling_latest,
     "{tmp}/run/checkpoints/latest"),
    ("release-truncated-checkpoint", ["pixeldit-release", "{tmp}/run/checkpoints/step_00000003", "{tmp}/out"],
     truncated_step, "optim_states.pt has 500 bytes"),
    ("release-unknown-architecture", ["pixeldit-release", "{tmp}/run/checkpoints/step_00000003", "{tmp}/out"],
     step_of_unknown_size, "XXL/99"),
    ("release-bad-dtype", ["pixeldit-release", "{tmp}/run", "{tmp}/out", "--dtype", "fp16"], run_without_checkpoint,
     "--dtype"),
    ("release-missing-out", ["pixeldit-release", "{tmp}/run"], run_without_checkpoint, "release folder (out)"),
    ("sample-empty-folder", [*SAMPLE, "{tmp}/empty", "--class-id", "1"], empty_folder, "{tmp}/empty"),
    ("sample-dangling-latest", [*SAMPLE, "{tmp}/run", "--class-id", "1"], run_with_dangling_latest,
     "{tmp}/run/checkpoints/latest"),
    ("sample-unknown-architecture", [*SAMPLE, "{tmp}/release", "--class-id", "1"], release_of_unknown_size,
     "{tmp}/release/config.json"),
    ("sample-truncated-weights", [*SAMPLE, "{tmp}/release", "--class-id", "1"], release_with_weights(truncated),
     "{tmp}/release/model.safetensors"),
    ("sample-empty-weights", [*SAMPLE, "{tmp}/release", "--class-id", "1"], release_with_weights(empty),
     "{tmp}/release/model.safetensors"),
    ("sample-renamed-pickle-weights", [*SAMPLE, "{tmp}/release", "--class-id", "1"],
     release_with_weights(renamed_pickle), "{tmp}/release/model.safetensors"),
    ("sample-unknown-text-encoder", [*SAMPLE, "{tmp}/release", "--prompt", "a cat"],
     text_release_with_unknown_encoder, "--text-encoder"),
    ("sample-prompt-for-class-model", [*SAMPLE, "{tmp}/release", "--prompt", "a cat"], release, "--class-id"),
    ("eval-no-prompt-set", ["pixeldit-eval", "{tmp}/release", "--out", "{tmp}/e"], release, "--prompts"),
    ("eval-missing-target", ["pixeldit-eval", "{tmp}/nowhere", "--classes", "1", "--out", "{tmp}/e"], None,
     "{tmp}/nowhere"),
    ("ledger-not-a-run-folder", ["pixeldit-ledger", "{tmp}/norun", "--step", "3"], None, "{tmp}/norun"),
    ("official-missing-checkpoint", ["pixeldit-official", "import", "{tmp}/x.ckpt", "{tmp}/out"], None, "x.ckpt"),
]


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
    assert err.startswith(f"{script}: error: ") and culprit.format(tmp=tmp_path) in err, err


def test_every_console_script_has_rows():
    assert set(console_scripts()) - {c[1][0] for c in CLI_ERROR_CASES} == set()


def test_missing_data_is_found_before_anything_starts(tmp_path, capsys, monkeypatch):
    """No process group, no run folder, no wandb run: the dataset is checked first."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    code, _, err = run_case("train-missing-data-path", tmp_path, capsys, extra=("logging.wandb=offline",))
    assert code == 2 and f"{tmp_path}/data" in err and "manifest.parquet" in err
    assert not (tmp_path / "run").exists() and not dist.is_initialized()
    code, _, err = run_case("submit-missing-data-path", tmp_path, capsys)
    assert code == 2 and not (tmp_path / "run").exists()  # nothing submitted, no launcher folder


def test_warm_start_release_is_checked_before_anything_starts(tmp_path, capsys):
    """checkpoint.init_from: a missing release folder stops the run in preflight, like a missing dataset."""
    code, _, err = run_case("train-missing-init-from", tmp_path, capsys)
    assert code == 2 and f"{tmp_path}/norelease" in err
    assert not (tmp_path / "run").exists() and not dist.is_initialized()


def test_traceback_switch_shows_the_traceback(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("PIXELDIT_TRACEBACK", raising=False)
    code, _, err = run_case("train-unknown-yaml-key", tmp_path, capsys, extra=("--traceback",))
    assert code == 2 and "Traceback (most recent call last)" in err
    assert err.splitlines()[-1].startswith("pixeldit-train: error: ") and "optim.lrr" in err.splitlines()[-1]
