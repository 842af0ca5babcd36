"""The README's main command end to end at toy scale: synth -> img2dataset -> shards -> DeepSpeed curriculum
(local executor, 2 ranks) -> release -> sampled grid + colour check."""
from __future__ import annotations

import json

import numpy as np
from PIL import Image

from launchers.quickstart import main as quickstart


def test_quickstart_runs_end_to_end(tmp_path, capsys):
    out = tmp_path / "qs"
    quickstart(["--out", str(out), "--images", "40", "--steps-per-stage", "3", "--stage2-steps", "2", "--batch", "2",
                "--resolutions", "32", "64", "--sample-steps", "2"])
    printed = capsys.readouterr().out
    summary = json.loads(printed[printed.rindex("{"):])
    assert summary["data"] == str(out / "data") and (out / "data" / "manifest.parquet").exists()
    assert 0.0 <= summary["colour_accuracy"] <= 1.0
    losses = [json.loads(x) for x in (out / "run" / "losses.jsonl").read_text().splitlines()]
    assert [r["step"] for r in losses] == [1, 2, 3, 4, 5] and {r["stage"] for r in losses} == {0, 1}
    assert (out / "release" / "config.json").exists() and (out / "release" / "model.safetensors").exists()
    grid = np.asarray(Image.open(out / "samples" / "grid.png"))
    assert grid.shape[0] >= 64 and grid.shape[1] >= 64
    for stage in ("1/7", "3/7", "5/7", "7/7"):
        assert f"[quickstart {stage}" in printed
