"""pixeldit-sample on release folders: PNGs, grid, prompts.json; seed-reproducible; sampler flags.

(The same CLI on a training run folder is checked against its release in tests/test_release.py.)
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from diffusion_fixtures import minilm_dir
from pixeldit.models import build_model, get_model_args
from pixeldit.release import ReleaseConfig, SamplerDefaults
from pixeldit.release.writer import save_release
from tools.sample import main as sample_main


def make_release(tmp_path, size: str, **overrides):
    args = get_model_args(size, **overrides)
    torch.manual_seed(0)
    model = build_model(args)
    with torch.no_grad():  # the zero-initialised output layers would give constant images
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    cfg = ReleaseConfig(model_args=args.to_dict(), resolution=32, step=7, dtype="fp32",
                        text_encoder=str(minilm_dir()) if args.conditioning == "text" else "",
                        sampler=SamplerDefaults(steps=3, cfg_scale=2.0, shift=1.5))
    return save_release(model.state_dict(), cfg, tmp_path / "release", max_shard_bytes=1 << 20)


def images(folder) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(Image.open(p)) for p in sorted(folder.glob("*.png"))}


def test_class_model_sampling_is_seed_reproducible(tmp_path, capsys):
    rel = make_release(tmp_path, "debug")
    assert (rel / "model.safetensors.index.json").exists()  # sharded above 1 MiB
    common = ["--model", str(rel), "--class-id", "1", "3", "--num-per-prompt", "2", "--seed", "5"]
    sample_main([*common, "--out", str(tmp_path / "a")])
    assert "3 steps, CFG 2.0 on [0.0, 1.0], shift 1.5" in capsys.readouterr().out  # defaults from config.json
    sample_main([*common, "--out", str(tmp_path / "b"), "--batch-size", "3"])  # batching does not change images
    entries = json.loads((tmp_path / "a" / "prompts.json").read_text())
    assert [e["class_id"] for e in entries] == [1, 1, 3, 3] and [e["seed"] for e in entries] == [5, 6, 7, 8]
    a, b = images(tmp_path / "a"), images(tmp_path / "b")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert a["0000.png"].shape == (32, 32, 3) and not np.array_equal(a["0000.png"], a["0001.png"])
    assert a["grid.png"].shape == (64, 64, 3)  # 2 rows (class ids) x 2 columns (images per class)
    assert np.array_equal(a["grid.png"][32:, :32], a["0002.png"])

    sample_main([*common, "--out", str(tmp_path / "c"), "--sampler", "euler", "--steps", "2", "--cfg-scale", "1",
                 "--shift", "1"])
    assert "euler, 2 steps, CFG 1.0" in capsys.readouterr().out
    assert not np.array_equal(images(tmp_path / "c")["0000.png"], a["0000.png"])
    with pytest.raises(SystemExit, match="class ids"):
        sample_main(["--model", str(rel), "--class-id", "99", "--out", str(tmp_path / "d")])
    with pytest.raises(SystemExit, match="multiples of the patch size 16"):
        sample_main(["--model", str(rel), "--class-id", "1", "--height", "40", "--out", str(tmp_path / "d")])
    with pytest.raises(SystemExit, match="class-conditional model: pass --class-id"):
        sample_main(["--model", str(rel), "--prompt", "a cat", "--out", str(tmp_path / "d")])


def test_text_model_sampling_with_real_text_encoder(tmp_path):
    rel = make_release(tmp_path, "debug-T2I", text_dim=384, text_len=16)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a blue square\n\n")
    sample_main(["--model", str(rel), "--prompt", "a red circle", "--prompts-file", str(prompts), "--out",
                 str(tmp_path / "s"), "--height", "32", "--width", "48", "--sampler", "heun",
                 "--cfg-interval", "0.1", "0.9"])
    entries = json.loads((tmp_path / "s" / "prompts.json").read_text())
    assert [e["prompt"] for e in entries] == ["a red circle", "a blue square"]
    out = images(tmp_path / "s")
    assert out["0000.png"].shape == (32, 48, 3) and not np.array_equal(out["0000.png"], out["0001.png"])
    with pytest.raises(SystemExit, match="text-to-image model: pass --prompt"):
        sample_main(["--model", str(rel), "--class-id", "1", "--out", str(tmp_path / "x")])
