"""pixeldit-sample on release folders: PNGs, grid, prompts.json; seed-reproducible; sampler flags; the text
encoder found by name (--text-encoder, an old release's absolute path, the Hugging Face cache).

(The same CLI on a training run folder is checked against its release in tests/test_release.py; its one-line
errors in tests/test_cli_errors.py.)
"""
from __future__ import annotations

import json

import huggingface_hub.constants
import numpy as np
import pytest
import torch
from PIL import Image

from diffusion_fixtures import minilm_dir
from pixeldit.errors import ConfigError
from pixeldit.models import build_model, get_model_args
from pixeldit.release import CONFIG_FILE, ReleaseConfig, SamplerDefaults
from pixeldit.release.config import text_encoder_name
from pixeldit.release.sample import run as sample_main
from pixeldit.release.writer import save_release

MINILM = "sentence-transformers/all-MiniLM-L6-v2"


def make_release(tmp_path, size: str, text_encoder: str = MINILM, **overrides):
    args = get_model_args(size, **overrides)
    torch.manual_seed(0)
    model = build_model(args)
    with torch.no_grad():  # the zero-initialised output layers would give constant images
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    cfg = ReleaseConfig(model_args=args.to_dict(), resolution=32, step=7, dtype="fp32",
                        text_encoder=text_encoder if args.conditioning == "text" else "",
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
    with pytest.raises(ConfigError, match="--class-id"):
        sample_main(["--model", str(rel), "--class-id", "99", "--out", str(tmp_path / "d")])
    with pytest.raises(ConfigError, match="multiples of the patch size 16"):
        sample_main(["--model", str(rel), "--class-id", "1", "--height", "40", "--out", str(tmp_path / "d")])
    with pytest.raises(ConfigError, match="class-conditional model: pass --class-id"):
        sample_main(["--model", str(rel), "--prompt", "a cat", "--out", str(tmp_path / "d")])


def test_text_model_sampling_with_real_text_encoder(tmp_path):
    rel = make_release(tmp_path, "debug-T2I", text_dim=384, text_len=16)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a blue square\n\n")
    common = ["--model", str(rel), "--prompt", "a red circle", "--prompts-file", str(prompts), "--height", "32",
              "--width", "48", "--sampler", "heun", "--cfg-interval", "0.1", "0.9"]
    with pytest.raises(ConfigError, match=f"text encoder '{MINILM}' .*pass --text-encoder PATH"):
        sample_main([*common, "--out", str(tmp_path / "s")])  # not in the (empty) Hugging Face cache
    sample_main([*common, "--out", str(tmp_path / "s"), "--text-encoder", str(minilm_dir())])
    entries = json.loads((tmp_path / "s" / "prompts.json").read_text())
    assert [e["prompt"] for e in entries] == ["a red circle", "a blue square"]
    out = images(tmp_path / "s")
    assert out["0000.png"].shape == (32, 48, 3) and not np.array_equal(out["0000.png"], out["0001.png"])
    with pytest.raises(ConfigError, match="text-to-image model: pass --prompt"):
        sample_main(["--model", str(rel), "--class-id", "1", "--out", str(tmp_path / "x")])


def hub_cache_with_minilm(cache):
    """A Hugging Face hub cache holding MiniLM as ``sentence-transformers/all-MiniLM-L6-v2`` (files linked)."""
    repo = cache / f"models--{MINILM.replace('/', '--')}"
    snapshot = repo / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    for f in minilm_dir().iterdir():
        (snapshot / f.name).symlink_to(f)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    return snapshot


def test_text_encoder_found_by_name_in_the_hub_cache_or_at_an_old_absolute_path(tmp_path, monkeypatch):
    snapshot = hub_cache_with_minilm(tmp_path / "hub")
    assert text_encoder_name(str(snapshot)) == MINILM  # what a release made from that folder records
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    rel = make_release(tmp_path, "debug-T2I", text_dim=384, text_len=16)
    args = ["--model", str(rel), "--prompt", "a red circle", "--seed", "2"]
    sample_main([*args, "--out", str(tmp_path / "by_name")])
    sample_main([*args, "--out", str(tmp_path / "by_path"), "--text-encoder", str(minilm_dir())])
    # a release written before names were recorded holds the absolute path of the training machine
    cfg = json.loads((rel / CONFIG_FILE).read_text())
    (rel / CONFIG_FILE).write_text(json.dumps({**cfg, "text_encoder": str(minilm_dir())}))
    sample_main([*args, "--out", str(tmp_path / "old_release")])
    a, b, c = (images(tmp_path / d) for d in ("by_name", "by_path", "old_release"))
    assert all(np.array_equal(a[k], b[k]) and np.array_equal(a[k], c[k]) for k in a)
