"""The README's main command end to end at toy scale: synth -> img2dataset -> shards -> DeepSpeed curriculum
(local executor, 2 ranks, progress in the terminal) -> release -> samples of the trained and a random-init model,
colour and shape checks, side-by-side grid."""
from __future__ import annotations

import json

import numpy as np
from PIL import Image

from launchers.quickstart import main as quickstart


def test_quickstart_runs_end_to_end(tmp_path, capsys):
    out = tmp_path / "qs"
    quickstart(["--out", str(out), "--images", "40", "--steps-per-stage", "3", "--stage2-steps", "2", "--batch", "2",
                "--resolutions", "16", "32", "--sample-steps", "2"])
    printed = capsys.readouterr().out
    summary = json.loads(printed[printed.rindex("\n{") + 1:])
    assert summary["data"] == str(out / "data") and (out / "data" / "manifest.parquet").exists()
    for key in ("colour_accuracy", "shape_accuracy"):
        assert 0.0 <= summary[key] <= 1.0
    assert set(summary["random_init"]) == {"colour", "shape"}
    losses = [json.loads(x) for x in (out / "run" / "losses.jsonl").read_text().splitlines()]
    assert [r["step"] for r in losses] == [1, 2, 3, 4, 5] and {r["stage"] for r in losses} == {0, 1}
    assert (out / "release" / "config.json").exists() and (out / "release" / "model.safetensors").exists()
    assert json.loads((out / "release" / "config.json").read_text())["model_args"]["patch_size"] == 4
    grid = np.asarray(Image.open(out / "samples" / "grid.png"))
    assert grid.shape[0] >= 32 and grid.shape[1] >= 32
    pair = Image.open(summary["side_by_side"])
    assert pair.width > 2 * 2 * 32 and pair.height >= 6 * 32  # two halves of 2 images per prompt, 6 prompts
    assert "[quickstart 5/7: train] step 5/5 (stage 1)  loss " in printed  # the live progress line
    for stage in ("1/7", "3/7", "5/7", "7/7"):
        assert f"[quickstart {stage}" in printed
