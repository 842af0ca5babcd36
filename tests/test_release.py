"""Release round trip: ZeRO-1/2/3 checkpoints (2 ranks, CPU) -> release folder -> from_pretrained -> samples."""
from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from pixeldit.diffusion import generate
from pixeldit.models import build_model, get_model_args
from pixeldit.release import ReleaseConfig, UnsafeCheckpointError, from_pretrained, safe_load
from pixeldit.train.checkpoint import consolidate_model
from pixeldit.train.ema import consolidate_ema
from pixeldit.release.writer import shard_state
from pixeldit.train.export import export_release, resolve_checkpoint
from train_helpers import free_port, write_tiny_dataset

ROOT = Path(__file__).resolve().parents[1]


def train(tmp: Path, data: Path, zero: str, steps: int = 3) -> Path:
    run_dir = tmp / f"run_{zero}"
    stage = {"name": "s", "steps": steps, "data_path": str(data), "resolution": 32, "bucket_align": 16,
             "buckets": "aspect", "micro_batch": 2, "lr": 2e-3, "shift": 2.0}
    cfg = {"run_dir": str(run_dir), "seed": 0, "ema_decay": 0.5, "model": {"size": "debug"},
           "deepspeed": {"zero": zero, "precision": "fp32"}, "data": {"num_workers": 0},
           "logging": {"wandb": "disabled", "progress_bar": False}, "checkpoint": {"every": 100, "keep": 1},
           "stages": [stage]}
    path = tmp / f"{zero}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", WANDB_MODE="disabled")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "-m", "pixeldit.train.cli", "--config", str(path)]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return run_dir


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_tiny_dataset(tmp_path_factory.mktemp("data"), {"1.00": 8, "0.50": 4}, per_shard=4)


@pytest.mark.parametrize("zero", ["zero1", "zero2", "zero3"])
def test_release_roundtrip(zero, data, tmp_path):
    run_dir = train(tmp_path, data, zero)
    step_dir = resolve_checkpoint(run_dir)
    ema = consolidate_ema(step_dir)
    raw = consolidate_model(step_dir)
    assert any(not torch.equal(ema[k], raw[k]) for k in ema)  # EMA differs from the raw weights

    out = export_release(run_dir, tmp_path / "release", weights="ema", dtype="fp32")
    model, cfg = from_pretrained(out)  # strict load, safetensors only
    assert cfg.step == 3 and cfg.weights == "ema" and cfg.resolution == 32
    assert all(torch.equal(model.state_dict()[k], ema[k]) for k in ema)

    # the same samples as the training-time EMA model for the same seed
    ref = build_model(get_model_args("debug"))
    ref.load_state_dict(ema)
    noise = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    kw = dict(null_cond=ref.null_condition(2), steps=4, cfg_scale=2.0, shift=cfg.sampler.shift)
    y = {"y": torch.tensor([1, 2])}
    assert torch.equal(generate(model, noise, y, **kw), generate(ref.eval(), noise, y, **kw))

    # bf16 release of the raw weights
    out16 = export_release(step_dir, tmp_path / "release_raw", weights="raw", dtype="bf16")
    m16, c16 = from_pretrained(out16)
    assert c16.weights == "raw" and c16.dtype == "bf16"
    assert all(torch.equal(m16.state_dict()[k], raw[k].to(torch.bfloat16).float()) for k in raw)
    assert "from_pretrained" in (out / "README.md").read_text()


def test_sharded_release_and_index(tmp_path):
    args = get_model_args("debug")
    state = build_model(args).state_dict()
    shards = shard_state(state, max_bytes=1 << 20)
    assert len(shards) > 1 and sum(len(s) for s in shards) == len(state)


def test_pickles_are_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    bad = tmp_path / "model.pt"
    with open(bad, "wb") as f:
        pickle.dump({"w": Evil()}, f)
    with pytest.raises(UnsafeCheckpointError, match="refusing to load"):
        safe_load(bad)
    good = tmp_path / "ok.pt"
    torch.save({"w": torch.ones(2)}, good)
    assert torch.equal(safe_load(good)["w"], torch.ones(2))
    st = tmp_path / "w.safetensors"
    save_file({"w": torch.zeros(3)}, str(st))
    assert safe_load(st)["w"].shape == (3,)


def test_not_a_release_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a PixelDiT release folder"):
        ReleaseConfig.load(tmp_path)
