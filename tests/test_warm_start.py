"""Fine-tuning from a release (``checkpoint.init_from``, pixeldit.train.warm_start): an official-layout class
checkpoint is imported (fp32), fine-tuned one CAME step by the real trainer (2 CPU ranks, ZeRO-2, bf16), released;
the weights that did not train (class-embedding rows of classes absent from the data) come back bit-identical,
which needs the exact fp32 master weights (DeepSpeed alone would start from their bf16 rounding). The run's
checkpoints then resume without the release (it is deleted before the resume). An architecture mismatch is
one line naming the fields."""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from pixeldit.errors import ConfigError
from pixeldit.models import build_model, get_model_args
from pixeldit.release import load_release_weights
from pixeldit.release.export import export_release
from pixeldit.release.official_cli import main as official_main
from pixeldit.release.official import ours_to_official
from pixeldit.train.config import load_config
from pixeldit.train.warm_start import check_init_release, read_init_weights
from train_helpers import ROOT, torchrun, write_tiny_dataset

pytestmark = pytest.mark.slow
OVERRIDES = {"layer_style": "official"}  # the architecture the import infers for the debug-size official layout
EMBED = "y_embed.table.weight"  # (num_classes + 1, D): row k trains only when class k is in a batch


def official_release(tmp_path: Path) -> Path:
    args = get_model_args("debug", **OVERRIDES)
    g = torch.Generator().manual_seed(0)
    ours = {k: torch.randn(v.shape, generator=g) * 0.1 for k, v in build_model(args, device="meta").state_dict().items()}
    save_file(ours_to_official(ours, args), str(tmp_path / "official.safetensors"))
    assert official_main(["import", str(tmp_path / "official.safetensors"), str(tmp_path / "imported")]) == 0
    return tmp_path / "imported"


def run_config(tmp_path: Path, data: Path, release: Path, steps: int) -> Path:
    cfg = {
        "run_dir": str(tmp_path / "run"), "seed": 0, "ema_decay": 0.9999,
        "model": {"size": "debug", "overrides": OVERRIDES},
        "deepspeed": {"zero": "zero2", "precision": "bf16"},
        "optim": {"name": "came", "grad_clip": 0.2},
        "data": {"num_workers": 0},
        "logging": {"wandb": "disabled", "progress_bar": False, "image_every": 0},
        "checkpoint": {"every": 1, "keep": 2, "init_from": str(release)},
        "stages": [{"name": "ft", "steps": steps, "data_path": str(data), "resolution": 32, "bucket_align": 16,
                    "buckets": "fixed", "micro_batch": 2, "lr": 1e-3}],
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def train(config: Path, log: Path) -> None:
    cmd, env = torchrun(config)
    with open(log, "a") as out:
        rc = subprocess.run(cmd, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, timeout=300).returncode
    assert rc == 0, log.read_text()[-4000:]


def test_import_fine_tune_release_keeps_untrained_weights(tmp_path):
    release = official_release(tmp_path)
    imported = load_release_weights(release)
    assert imported[EMBED].dtype == torch.float32
    assert not torch.equal(imported[EMBED], imported[EMBED].bfloat16().float())  # not bf16-representable
    data = write_tiny_dataset(tmp_path / "data", {"1.00": 8}, per_shard=4, num_classes=2)  # labels 0 and 1 only
    config = run_config(tmp_path, data, release, steps=1)
    train(config, tmp_path / "log.txt")
    log = (tmp_path / "log.txt").read_text()
    assert f"initialised from {release}" in log

    raw = load_release_weights(export_release(tmp_path / "run", tmp_path / "raw", weights="raw", dtype="fp32"))
    ema = load_release_weights(export_release(tmp_path / "run", tmp_path / "ema", weights="ema", dtype="bf16"))
    untrained = list(range(2, 10))  # classes 2..9 never appear; 10 is the null class (condition dropout)
    assert torch.equal(raw[EMBED][untrained], imported[EMBED][untrained])
    assert torch.equal(ema[EMBED][untrained], imported[EMBED][untrained].bfloat16())
    assert not torch.equal(raw[EMBED][:2], imported[EMBED][:2])  # the classes in the data did train
    changed = [k for k in imported if not torch.equal(raw[k], imported[k])]
    assert len(changed) > len(imported) // 2  # one step moved most tensors: this was a real update
    meta = json.loads((tmp_path / "run" / "checkpoints" / "step_00000001" / "meta.json").read_text())
    assert meta["optimizer"] == "came" and meta["init_from"] == str(release)

    # the run resumes from its own checkpoint: the release is not needed (and not read) any more
    shutil.rmtree(release)
    train(run_config(tmp_path, data, release, steps=2), tmp_path / "log2.txt")
    records = [json.loads(x) for x in (tmp_path / "run" / "losses.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert "initialised from" not in (tmp_path / "log2.txt").read_text()
    resumed = load_release_weights(export_release(tmp_path / "run", tmp_path / "raw2", weights="raw", dtype="fp32"))
    assert torch.equal(resumed[EMBED][untrained], imported[EMBED][untrained])
    assert not torch.equal(resumed[EMBED][:2], raw[EMBED][:2])  # step 2 trained on from step 1's weights


def test_architecture_mismatch_is_one_line_naming_the_fields(tmp_path):
    release = official_release(tmp_path)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"model": {"size": "debug", "overrides": {"num_classes": 7}},
                                    "checkpoint": {"init_from": str(release)},
                                    "stages": [{"name": "a", "data_path": "/x", "bucket_align": 16}]}))
    cfg = load_config(path)
    with pytest.raises(ConfigError) as err:
        check_init_release(cfg)
    message = str(err.value)
    assert "\n" not in message and f"checkpoint.init_from={release}" in message
    assert "'layer_style': ('official', 'pixeldit')" in message and "'num_classes': (10, 7)" in message
    cfg.model.overrides = dict(OVERRIDES)
    assert check_init_release(cfg) is not None
    state = read_init_weights(cfg)
    assert all(v.dtype == torch.float32 for v in state.values()) and EMBED in state
