"""Every console script turns a user's mistake into ONE line on stderr that names the culprit, and exit code 2.

Each row of ``CASES`` is one bad input: (console script, fixture, argv, culprit). The fixture builds the bad
input under a fresh folder and returns its path; ``{path}`` (that path) and ``{tmp}`` (the folder) are filled
into argv and culprit. The script runs in a subprocess exactly as its console-script wrapper would
(``sys.exit(main())`` of the entry point named in pyproject.toml), so a traceback or a second line fails the
row. Adding a row is one line; a new kind of bad input is one fixture function.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Callable, NamedTuple

import pytest
import torch

from pixeldit import run_folder
from pixeldit.models import build_model, get_model_args
from pixeldit.release import CONFIG_FILE, SINGLE_FILE, ReleaseConfig
from pixeldit.release.writer import save_release

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]


# --- fixtures: each builds one bad input under tmp and returns the path the row refers to as {path} ---------

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
    import io

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


def step_of_unknown_size(tmp: Path) -> Path:
    step_dir = run_folder.checkpoints_dir(tmp / "run") / run_folder.step_dirname(3)
    step_dir.mkdir(parents=True)
    args = {**get_model_args("debug").to_dict(), "name": "XXL/99"}
    run_folder.write_meta(step_dir, {"step": 3, "model_args": args})
    return step_dir


class Case(NamedTuple):
    script: str  # console script name (pyproject.toml [project.scripts])
    fixture: Callable[[Path], Path]
    argv: tuple[str, ...]
    culprit: str | tuple[str, ...]  # must appear in the error line (each of them)


SAMPLE_OUT = ("--out", "{tmp}/samples")
CASES = [
    Case("pixeldit-release", empty_folder, ("{path}", "{tmp}/out"), "{path}"),
    Case("pixeldit-release", run_without_checkpoint, ("{path}", "{tmp}/out"), ("{path}", "checkpoints/latest")),
    Case("pixeldit-release", run_with_dangling_latest, ("{path}", "{tmp}/out"), "{path}/checkpoints/latest"),
    Case("pixeldit-release", step_of_unknown_size, ("{path}", "{tmp}/out"), ("{path}/meta.json", "XXL/99")),
    Case("pixeldit-release", run_without_checkpoint, ("{path}", "{tmp}/out", "--dtype", "fp16"), "--dtype"),
    Case("pixeldit-release", run_without_checkpoint, ("{path}",), "release folder (out)"),
    Case("pixeldit-sample", empty_folder, ("--model", "{path}", "--class-id", "1", *SAMPLE_OUT), "{path}"),
    Case("pixeldit-sample", run_with_dangling_latest, ("--model", "{path}", "--class-id", "1", *SAMPLE_OUT),
         "{path}/checkpoints/latest"),
    Case("pixeldit-sample", release_of_unknown_size, ("--model", "{path}", "--class-id", "1", *SAMPLE_OUT),
         ("{path}/config.json", "XXL/99", "B/16")),
    Case("pixeldit-sample", release_with_weights(truncated), ("--model", "{path}", "--class-id", "1", *SAMPLE_OUT),
         ("{path}/model.safetensors", "pixeldit-release")),
    Case("pixeldit-sample", release_with_weights(empty), ("--model", "{path}", "--class-id", "1", *SAMPLE_OUT),
         ("{path}/model.safetensors", "empty")),
    Case("pixeldit-sample", release_with_weights(renamed_pickle), ("--model", "{path}", "--class-id", "1",
                                                                  *SAMPLE_OUT), ("{path}/model.safetensors", "pickle")),
    Case("pixeldit-sample", text_release_with_unknown_encoder, ("--model", "{path}", "--prompt", "a cat", *SAMPLE_OUT),
         ("acme/encoder-nobody-has", "--text-encoder")),
    Case("pixeldit-sample", release, ("--model", "{path}", "--prompt", "a cat", *SAMPLE_OUT), "--class-id"),
]


def run_script(script: str, argv: list[str], **env: str) -> subprocess.CompletedProcess:
    """The console script ``script`` as its installed wrapper runs it: ``sys.exit(main())`` of its entry point."""
    module, func = SCRIPTS[script].split(":")
    code = f"import sys; from {module} import {func}; sys.exit({func}())"
    return subprocess.run([sys.executable, "-c", code, *argv], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": "", **env})


def case_id(case: Case) -> str:
    return f"{case.script}-{case.fixture.__name__}-{'-'.join(a for a in case.argv if a.startswith('--'))}"


@pytest.mark.parametrize("case", CASES, ids=[case_id(c) for c in CASES])
def test_user_error_is_one_line_naming_the_culprit(case: Case, tmp_path: Path):
    path = case.fixture(tmp_path)
    fill = {"path": str(path), "tmp": str(tmp_path)}
    proc = run_script(case.script, [a.format(**fill) for a in case.argv], PIXELDIT_TRACEBACK="")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith(f"{case.script}: error: "), proc.stderr[-3000:]
    for culprit in (case.culprit,) if isinstance(case.culprit, str) else case.culprit:
        assert culprit.format(**fill) in lines[0]


def test_traceback_on_request(tmp_path: Path):
    """--traceback (or PIXELDIT_TRACEBACK=1) shows where a user error came from; the exit code stays 2."""
    path = release_with_weights(truncated)(tmp_path)
    argv = ["--model", str(path), "--class-id", "1", "--out", str(tmp_path / "samples")]
    for extra, env in (["--traceback"], {}), ([], {"PIXELDIT_TRACEBACK": "1"}):
        proc = run_script("pixeldit-sample", [*argv, *extra], **env)
        assert proc.returncode == 2 and "Traceback (most recent call last)" in proc.stderr
        assert proc.stderr.strip().splitlines()[-1].startswith("pixeldit-sample: error: ")
