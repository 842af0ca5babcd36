"""pixeldit-sample on a release folder: PNGs, grid, prompts.json; seed-reproducible."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from pixeldit.models import build_model, get_model_args
from pixeldit.release import ReleaseConfig, SamplerDefaults
from pixeldit.release.writer import save_release
from tools.sample import main as sample_main
from diffusion_fixtures import minilm_dir


def make_release(tmp_path, size: str, **overrides):
    args = get_model_args(size, **overrides)
    model = build_model(args)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    cfg = ReleaseConfig(model_args=args.to_dict(), resolution=32, step=7, dtype="fp32",
                        text_encoder=str(minilm_dir()) if args.conditioning == "text" else "",
                        sampler=SamplerDefaults(steps=3, cfg_scale=2.0, shift=1.5))
    return save_release(model.state_dict(), cfg, tmp_path / "release", max_shard_bytes=1 << 20)


def test_class_model_sampling_is_seed_reproducible(tmp_path):
    rel = make_release(tmp_path, "debug")
    assert (rel / "model.safetensors.index.json").exists()  # sharded above 1 MiB
    for out in ("a", "b"):
        sample_main(["--model", str(rel), "--class-id", "1", "3", "--num-per-prompt", "2", "--seed", "5",
                     "--out", str(tmp_path / out)])
    entries = json.loads((tmp_path / "a" / "prompts.json").read_text())
    assert [e["class_id"] for e in entries] == [1, 1, 3, 3] and [e["seed"] for e in entries] == [5, 6, 7, 8]
    for e in entries:
        a = np.asarray(Image.open(tmp_path / "a" / e["file"]))
        assert a.shape == (32, 32, 3)
        assert np.array_equal(a, np.asarray(Image.open(tmp_path / "b" / e["file"])))
    assert Image.open(tmp_path / "a" / "grid.png").size == (64, 64)
    with pytest.raises(SystemExit, match="class ids"):
        sample_main(["--model", str(rel), "--class-id", "99", "--out", str(tmp_path / "c")])


def test_text_model_sampling_with_real_text_encoder(tmp_path):
    rel = make_release(tmp_path, "debug-T2I", text_dim=384, text_len=16)
    sample_main(["--model", str(rel), "--prompt", "a red circle", "--prompt", "a blue square", "--out",
                 str(tmp_path / "s"), "--height", "32", "--width", "48", "--sampler", "heun"])
    entries = json.loads((tmp_path / "s" / "prompts.json").read_text())
    assert [e["prompt"] for e in entries] == ["a red circle", "a blue square"]
    a = np.asarray(Image.open(tmp_path / "s" / "0000.png"))
    b = np.asarray(Image.open(tmp_path / "s" / "0001.png"))
    assert a.shape == (32, 48, 3) and not np.array_equal(a, b)
