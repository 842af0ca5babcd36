"""Run config (YAML + dotted overrides + validation), DeepSpeed JSON filling, LR schedule."""
from __future__ import annotations

import json
import os
import re
import signal
import typing
from importlib import resources

import pytest

from pixeldit.diffusion.samplers import SAMPLERS
from pixeldit.errors import ConfigError
from pixeldit.train.config import LoggingConfig, RunConfig, StageConfig, ZeroConfig, load_config, save_config
from pixeldit.train.ds_config import DS_CONFIGS_PACKAGE, build_ds_config, ds_config_path
from pixeldit.train.optim import LRSchedule
from pixeldit.train.preflight import preflight
from pixeldit.train.signals import StopFlag
from train_helpers import write_tiny_dataset

YAML = """
run_dir: {run_dir}
model: {{size: debug}}
deepspeed: {{zero: zero3, precision: bf16}}
stages:
  - {{name: a, steps: 10, data_path: /data/x, resolution: 64, bucket_align: 16, micro_batch: 4, lr: 1.0e-4}}
  - {{name: b, steps: 5, data_path: s3://bkt/y, resolution: 128, bucket_align: 16, buckets: aspect,
     micro_batch: 2, grad_accum: 2, lr: 5.0e-5, shift: 4.0, grad_checkpointing: true}}
"""


def test_yaml_then_overrides_then_save_roundtrip(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(YAML.format(run_dir=tmp_path / "run"))
    cfg = load_config(path, ["stages.1.lr=2e-5", "optim.betas=[0.9, 0.95]", "logging.wandb=disabled",
                             "model.overrides.num_classes=7", "stages.0.data_path=s3://b/p:q"])
    assert cfg.stages[1].lr == 2e-5 and cfg.stages[0].lr == 1e-4
    assert cfg.stages[1].grad_checkpointing and cfg.stages[1].shift == 4.0
    assert cfg.optim.betas == (0.9, 0.95) and cfg.optim.eps == 1e-8  # untouched default
    assert cfg.model.args().num_classes == 7
    assert cfg.stages[0].data_path == "s3://b/p:q"
    assert cfg.total_steps == 15
    save_config(cfg, tmp_path / "saved.yaml")
    assert load_config(tmp_path / "saved.yaml") == cfg


@pytest.mark.parametrize("override, message", [
    (["stages.0.buckets=square"], "valid values: fixed, aspect"),
    (["stages.5.lr=1"], "valid indices 0..1"),
    (["optim.lrr=1"], "unknown config keys"),
    (["stages.0.steps=1.5"], "expected an integer"),
    (["stages.0.micro_batch=0"], "stages.0 (a).micro_batch=0 must be positive"),
    (["deepspeed.zero=zero4"], "zero1, zero2, zero3, zero3_offload"),
    (["stages.0.repa=true"], "conditioning.repa_teacher is empty"),
    (["stages.0.bucket_align=24"], "multiple of the patch size 16"),
    (["model.size=XXL"], "valid sizes"),
    (["stages.0.lr"], "must look like key.path=value"),
    (["stages.0.resolution=72"], "stages.0 (a).resolution=72 must be a multiple of bucket_align=16"),
    (["objective.t_std=0"], "objective: ObjectiveConfig: t_std=0.0 must be > 0"),
    (["stages.1.shift=-1"], "stages.1 (b).shift=-1.0 must be > 0"),
    (["logging.image_sampler=ddim"], "valid values: euler, heun, flow_dpm"),
    (["model.overrides.depth_x=3"], "unknown ModelArgs field"),
    (["compile.backend=cudagraphs"], "compile.backend='cudagraphs'; valid values: inductor, aot_eager, eager"),
])
def test_invalid_configs_name_the_key(tmp_path, override, message):
    path = tmp_path / "run.yaml"
    path.write_text(YAML.format(run_dir=tmp_path / "run"))
    with pytest.raises((ValueError, TypeError), match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(path, override)


def _cfg(tmp_path, **ds):
    stage = StageConfig(name="s", data_path="/x", micro_batch=3, grad_accum=2)
    cfg = RunConfig(stages=[stage])
    if ds:
        (tmp_path / "zero2.json").write_text(json.dumps({"zero_optimization": {"stage": 2}, **ds}))
        cfg.deepspeed.config_dir = str(tmp_path)
    return cfg


def test_ds_config_filled_from_run_config(tmp_path):
    for zero in ("zero1", "zero2", "zero3", "zero3_offload"):
        cfg = _cfg(tmp_path)
        cfg.deepspeed.zero = zero
        ds = build_ds_config(cfg, cfg.stages[0], world_size=4)
        assert ds["train_micro_batch_size_per_gpu"] == 3 and ds["gradient_accumulation_steps"] == 2
        assert ds["train_batch_size"] == 24 and ds["gradient_clipping"] == 1.0
        assert ds["bf16"]["enabled"] is True and ds["fp16"]["enabled"] is False
        assert ds["zero_optimization"]["stage"] == (1 if zero == "zero1" else 2 if zero == "zero2" else 3)
    ok = _cfg(tmp_path, train_micro_batch_size_per_gpu="auto", gradient_accumulation_steps=2)
    assert build_ds_config(ok, ok.stages[0], 1)["train_micro_batch_size_per_gpu"] == 3


@pytest.mark.parametrize("ds, key", [
    ({"train_micro_batch_size_per_gpu": 8}, "train_micro_batch_size_per_gpu"),
    ({"gradient_clipping": 0.5}, "gradient_clipping"),
    ({"bf16": {"enabled": False}}, "bf16.enabled"),
    ({"optimizer": {"type": "Adam"}}, "optimizer"),
])
def test_ds_config_conflict_names_file_and_key(tmp_path, ds, key):
    cfg = _cfg(tmp_path, **ds)
    with pytest.raises(ValueError, match=f"zero2.json: .*'{key}'"):
        build_ds_config(cfg, cfg.stages[0], world_size=1)


def test_lr_schedule_warmup_constant_cosine():
    const = LRSchedule(1e-3, steps=100, warmup_steps=10)
    assert const.lr_at(0) == pytest.approx(1e-4) and const.lr_at(9) == 1e-3 and const.lr_at(99) == 1e-3
    cos = LRSchedule(1e-3, steps=110, warmup_steps=10, schedule="cosine", min_lr_ratio=0.1)
    assert cos.lr_at(10) == pytest.approx(1e-3)
    assert cos.lr_at(60) == pytest.approx(0.55e-3)
    assert cos.lr_at(110) == pytest.approx(1e-4)
    assert all(cos.lr_at(i) >= cos.lr_at(i + 1) for i in range(10, 110))
    with pytest.raises(ValueError, match="constant, cosine"):
        LRSchedule(1e-3, 10, schedule="linear")


@pytest.mark.parametrize("name", ["t2i_curriculum", "imagenet_xl"])
def test_example_configs_load_and_fill_ds_config(name):
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "pixeldit" / "train" / "configs" / f"{name}.yaml"
    cfg = load_config(path)
    for stage in cfg.stages:
        ds = build_ds_config(cfg, stage, world_size=8)
        assert ds["train_batch_size"] == stage.micro_batch * stage.grad_accum * 8
    if name == "t2i_curriculum":
        assert [s.resolution for s in cfg.stages] == [512, 512, 1024] and cfg.uses_repa
        assert [s.shift for s in cfg.stages] == [3.0, 3.0, 4.0] and cfg.stages[2].grad_checkpointing


def test_stage_shift_defaults_to_the_objective_shift(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(YAML.format(run_dir=tmp_path / "run"))
    cfg = load_config(path, ["objective.shift=2.5", "objective.repa_weight=0.25", "stages.0.repa=true",
                             "conditioning.repa_teacher=/teacher"])
    first, second = (cfg.stage_objective(s) for s in cfg.stages)
    assert (first.shift, first.repa_weight, second.shift, second.repa_weight) == (2.5, 0.25, 4.0, 0.0)
    assert first.t_std == cfg.objective.t_std == 1.0 and cfg.stages[0].shift is None


def test_choice_lists_have_one_owner():
    assert typing.get_args(typing.get_type_hints(LoggingConfig)["image_sampler"]) == tuple(SAMPLERS)
    shipped = {p.name.removesuffix(".json") for p in resources.files(DS_CONFIGS_PACKAGE).iterdir()
               if p.name.endswith(".json")}
    assert shipped == set(typing.get_args(ZeroConfig))


def test_ds_configs_are_read_from_the_package(tmp_path):
    cfg = RunConfig(stages=[StageConfig(data_path="/x")])
    path = ds_config_path(cfg)
    assert path.name == "zero2.json" and json.loads(path.read_text())["zero_optimization"]["stage"] == 2
    cfg.deepspeed.config_dir = str(tmp_path)  # another folder of JSONs replaces the shipped one
    with pytest.raises(ValueError, match=f"{tmp_path}/zero2.json not found"):
        ds_config_path(cfg)


@pytest.mark.parametrize("overrides, message", [
    ([], None),
    (["stages.0.repa=true", "conditioning.repa_teacher={tmp}/dino"], "conditioning.repa_teacher="),
    (["model.size=debug-T2I", "conditioning.text_encoder={tmp}/enc"], "conditioning.text_encoder="),
    (["model.size=debug-T2I", "conditioning.text_mode=cached"], "stages.0 (s).data_path (text_mode=cached)"),
    (["checkpoint.resume_from={tmp}/step_00000100"], "checkpoint.resume_from="),
    (["deepspeed.config_dir={tmp}/ds"], "train_micro_batch_size_per_gpu"),
    (["stages.0.data_path={tmp}/nodata"], "stages.0 (s).data_path="),
    (["stages.0.filter=aesthetic >= 6"], "stages.0 (s).filter: filter 'aesthetic >= 6': no column 'aesthetic'"),
])
def test_preflight_checks_every_file_the_run_needs(tmp_path, overrides, message):
    data = write_tiny_dataset(tmp_path / "data", {"1.00": 2}, per_shard=2)
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "zero2.json").write_text(json.dumps({"zero_optimization": {"stage": 2},
                                                             "train_micro_batch_size_per_gpu": 8}))
    base = [f"run_dir={tmp_path / 'run'}", "stages.0.name=s", f"stages.0.data_path={data}", "stages.0.micro_batch=2"]
    cfg = load_config(None, base + [o.format(tmp=tmp_path) for o in overrides])
    if message is None:
        preflight(cfg, world_size=2)
    else:
        with pytest.raises((ValueError, FileNotFoundError), match=message.replace("(", r"\(").replace(")", r"\)")):
            preflight(cfg, world_size=2)
    assert not (tmp_path / "run").exists()


def test_stop_flag_is_raised_by_the_stop_signals():
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGUSR1, signal.SIGUSR2)}
    try:
        flag = StopFlag().install([signal.SIGUSR1, signal.SIGUSR2])
        assert not flag()
        os.kill(os.getpid(), signal.SIGUSR2)
        assert flag()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def test_official_recipe_config_per_stage_clipping_and_came(tmp_path):
    """t2i_official.yaml: CAME with the official betas / eps, warm-up 2000 in every stage, clipping 0.2 then 0.1
    at 1024, the imported official architecture; each stage's DeepSpeed JSON carries its own clipping."""
    from pathlib import Path

    from pixeldit.models import get_model_args

    path = Path(__file__).resolve().parents[1] / "pixeldit" / "train" / "configs" / "t2i_official.yaml"
    cfg = load_config(path)
    assert cfg.optim.name == "came" and cfg.optim.came.betas == (0.9, 0.999, 0.9999)
    assert cfg.optim.came.eps == (1e-30, 1e-16) and cfg.optim.weight_decay == 0.0
    assert [s.warmup_steps for s in cfg.stages] == [2000] * 3 and [s.lr for s in cfg.stages] == [1e-4, 1e-4, 2e-5]
    assert [s.repa for s in cfg.stages] == [True, False, False] and [s.micro_batch for s in cfg.stages] == [8, 8, 3]
    clips = [build_ds_config(cfg, s, world_size=8)["gradient_clipping"] for s in cfg.stages]
    assert clips == [0.2, 0.2, 0.1]
    assert all(build_ds_config(cfg, s, 8)["zero_allow_untested_optimizer"] is True for s in cfg.stages)
    official = get_model_args("T2I", layer_style="official", text_padding="unmasked")  # what the import infers
    assert cfg.model.args() == official


@pytest.mark.parametrize("override, message", [
    (["optim.name=sgd"], "valid values: adamw, came"),
    (["optim.name=came", "checkpoint.load_universal=true", "checkpoint.resume_from=/x"],
     "optim.name=came with checkpoint.load_universal=true"),
    (["optim.came.betas=[0.9, 0.999]"], "expected a list of 3 values"),
    (["optim.came.eps=[0.0, 1e-16]"], "optim.came.eps=[0.0, 1e-16] must be each > 0"),
    (["optim.came.betas=[0.9, 0.999, 1.0]"], "optim.came.betas=[0.9, 0.999, 1.0] must be each in [0, 1)"),
    (["stages.1.grad_clip=-1"], "stages.1 (b).grad_clip=-1"),
    (["checkpoint.init_from=/r", "checkpoint.resume_from=/c"], "init_from and checkpoint.resume_from are both set"),
])
def test_came_and_clipping_settings_are_checked(tmp_path, override, message):
    path = tmp_path / "run.yaml"
    path.write_text(YAML.format(run_dir=tmp_path / "run"))
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(path, override)


@pytest.mark.parametrize("ds, key", [
    ({"zero_optimization": {"stage": 2, "elastic_checkpoint": True}}, "zero_optimization.elastic_checkpoint"),
    ({"zero_optimization": {"stage": 1}, "data_types": {"grad_accum_dtype": "fp32"}}, "data_types.grad_accum_dtype"),
    ({"zero_optimization": {"stage": 3, "zero_hpz_partition_size": 8}}, "zero_optimization.zero_hpz_partition_size"),
    ({"zero_allow_untested_optimizer": False}, "zero_allow_untested_optimizer"),
])
def test_came_refuses_zero_layouts_it_cannot_map(tmp_path, ds, key):
    cfg = _cfg(tmp_path, **ds)
    cfg.optim.name = "came"
    with pytest.raises(ConfigError, match=f"zero2.json: '{key}'"):
        build_ds_config(cfg, cfg.stages[0], world_size=2)
    cfg.optim.name = "adamw"
    build_ds_config(cfg, cfg.stages[0], world_size=2)  # the same JSON is fine for AdamW
