"""Release format, safe loading, key map and the export of EMA checkpoints (fast, no DeepSpeed run)."""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from pixeldit import run_folder
from pixeldit.errors import CheckpointError
from pixeldit.models import build_model, get_model_args
from pixeldit.release import (ReleaseConfig, SamplerDefaults, UnsafeCheckpointError, default_sampler,
                              from_pretrained, load_release_weights, safe_load)
from pixeldit.release.cli import parse_size
from pixeldit.release.cli import run as release_cli
from pixeldit.release.config import text_encoder_name
from pixeldit.release.export import export_release, load_training_model
from pixeldit.release.key_map import check_release_keys, release_to_training, training_only, training_to_release
from pixeldit.release.writer import save_release, shard_state
from pixeldit.storage import is_tmp
from pixeldit.train.checkpoint import untie_optimizer_steps


def random_state(size: str = "debug", seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return {k: torch.randn_like(v) for k, v in build_model(get_model_args(size)).state_dict().items()}


def write_ema_checkpoint(step_dir: Path, state: dict[str, torch.Tensor], world_size: int, size: str = "debug",
                         **meta) -> Path:
    """A step folder holding only what the EMA export reads: ZeRO-3 EMA partitions of ``world_size`` ranks + meta."""
    step_dir.mkdir(parents=True)
    shapes = {k: list(v.shape) for k, v in state.items()}
    for rank in range(world_size):
        shadow = run_folder.partition_state(state, world_size, rank)
        run_folder.save_ema_file(step_dir, {"layout": "zero3", "decay": 0.99, "world_size": world_size, "rank": rank,
                                            "shapes": shapes, "shadow": shadow})
    run_folder.write_meta(step_dir, {
        "step": 12, "stage_index": 1, "stage_name": "s512", "model_args": get_model_args(size).to_dict(),
        "resolution": 64, "shift": 3.0, "text_encoder": "", "system_prompt": "", "world_size": world_size, **meta})
    return step_dir


def test_key_map_roundtrip_and_checks():
    model_state = random_state()
    training = {**release_to_training(model_state), "projector.net.0.weight": torch.ones(2, 2)}
    assert training_to_release(training).keys() == model_state.keys()
    assert training_only(training) == {"net.0.weight": training["projector.net.0.weight"]}
    expected = {k: v.shape for k, v in model_state.items()}
    check_release_keys(model_state, expected, "ok")
    bad = dict(model_state)
    first = next(iter(bad))
    bad[first] = torch.zeros(1)
    bad["extra"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match=r"ckpt X: .*unexpected: \['extra'\].*wrong shape"):
        check_release_keys(bad, expected, "ckpt X")


def test_shards_cover_all_keys_and_load_back(tmp_path):
    state = random_state()
    shards = shard_state(state, max_bytes=200 << 10)
    assert len(shards) > 2 and sorted(k for s in shards for k in s) == sorted(state)
    cfg = ReleaseConfig(model_args=get_model_args("debug").to_dict(), dtype="fp32")
    out = save_release(state, cfg, tmp_path / "rel", max_shard_bytes=200 << 10)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(v.numel() * 4 for v in state.values())
    assert sorted(set(index["weight_map"].values())) == sorted(p.name for p in out.glob("model-*.safetensors"))
    model, _ = from_pretrained(out)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    assert [p.name for p in tmp_path.iterdir()] == ["rel"]  # no staging folder left behind
    save_release(state, cfg, out)  # over an existing release: replaced whole, nothing left beside it
    assert [p.name for p in tmp_path.iterdir()] == ["rel"] and (out / "model.safetensors").exists()
    assert not (out / "model.safetensors.index.json").exists() and not any(is_tmp(p.name) for p in out.iterdir())


def test_safe_load_refuses_pickles(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    bad = tmp_path / "model.pt"
    torch.save({"w": torch.ones(1), "x": Evil()}, bad)
    with pytest.raises(UnsafeCheckpointError, match=f"refusing to load {bad}.*safetensors"):
        safe_load(bad)
    raw_pickle = tmp_path / "legacy.bin"
    raw_pickle.write_bytes(pickle.dumps({"w": Evil()}))
    with pytest.raises(UnsafeCheckpointError, match="refusing to load"):
        safe_load(raw_pickle)
    nested = tmp_path / "nested.pt"
    torch.save({"state_dict": {"w": torch.ones(2)}}, nested)
    with pytest.raises(UnsafeCheckpointError, match="not a flat"):
        safe_load(nested)
    good = tmp_path / "ok.pt"
    torch.save({"w": torch.ones(2)}, good)
    assert torch.equal(safe_load(good)["w"], torch.ones(2))
    st = tmp_path / "w.safetensors"
    save_file({"w": torch.zeros(3)}, str(st))
    assert safe_load(st)["w"].shape == (3,)


def test_shard_index_cannot_point_outside_the_folder(tmp_path):
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "../evil.pt"}}))
    with pytest.raises(UnsafeCheckpointError, match="inside the release folder"):
        load_release_weights(tmp_path)


def test_release_config_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not a PixelDiT release folder"):
        ReleaseConfig.load(tmp_path)
    cfg = ReleaseConfig(model_args=get_model_args("debug").to_dict())
    (tmp_path / "config.json").write_text(json.dumps({**json.loads(cfg.to_json()), "colour": 1}))
    with pytest.raises(ValueError, match=r"config.json: unknown keys \['colour'\]"):
        ReleaseConfig.load(tmp_path)
    with pytest.raises(ValueError, match="valid samplers: euler, heun, flow_dpm"):
        SamplerDefaults(sampler="ddim")
    with pytest.raises(ValueError, match="valid values: bf16, fp32"):
        ReleaseConfig(model_args=get_model_args("debug").to_dict(), dtype="fp16")
    assert default_sampler(get_model_args("debug-T2I"), 3.0).steps == 25


def test_release_from_before_rope_positions_keeps_integer_positions(tmp_path):
    """A format-1 config.json has no rope_positions: it loads with the integer positions it was trained with;
    a newer format than the code is refused by name."""
    state = random_state("debug")
    old_args = {k: v for k, v in get_model_args("debug").to_dict().items()
                if k not in ("rope_positions", "post_modulation", "layer_style", "text_padding")}
    out = save_release(state, ReleaseConfig(model_args=old_args, dtype="fp32", format_version=1), tmp_path / "old")
    model, cfg = from_pretrained(out)
    assert model.args.rope_positions == "integer" and cfg.format_version == 1
    new, _ = from_pretrained(save_release(state, ReleaseConfig(model_args=get_model_args("debug").to_dict(),
                                                               dtype="fp32"), tmp_path / "new"))
    assert new.args.rope_positions == "normalized"
    d = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**d, "format_version": 99}))
    with pytest.raises(ValueError, match="release format 99 is newer than this code"):
        ReleaseConfig.load(out)


def test_mismatched_weights_name_the_folder(tmp_path):
    state = random_state("debug")
    cfg = ReleaseConfig(model_args=get_model_args("debug").to_dict(), dtype="fp32")
    out = save_release({k: v for k, v in state.items() if k != next(iter(state))}, cfg, tmp_path / "rel")
    with pytest.raises(CheckpointError, match="rel: the weights do not match"):
        from_pretrained(out)


def test_export_ema_from_zero3_partitions(tmp_path):
    """3 ranks' EMA partitions -> release with exactly those weights; sampler overrides; stage shift."""
    state = random_state()
    step_dir = write_ema_checkpoint(tmp_path / "run" / "checkpoints" / "step_00000012", state, world_size=3)
    run_folder.write_latest(step_dir.parent, step_dir)
    release_cli([str(tmp_path / "run"), str(tmp_path / "rel"), "--dtype", "fp32", "--max-shard-size", "300KiB",
                  "--steps", "7", "--cfg-interval", "0.2", "0.9"])
    model, cfg = from_pretrained(tmp_path / "rel")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    assert (cfg.step, cfg.stage, cfg.stage_index, cfg.resolution) == (12, "s512", 1, 64)
    s = cfg.sampler
    assert (s.sampler, s.steps, s.cfg_scale, s.cfg_interval, s.shift) == ("flow_dpm", 7, 3.25, (0.2, 0.9), 3.0)
    assert (tmp_path / "rel" / "model.safetensors.index.json").exists()
    loaded, cfg2 = load_training_model(tmp_path / "run")
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in state.items()) and cfg2.weights == "ema"

    out = export_release(step_dir, tmp_path / "rel16")  # defaults: EMA, bf16, one file
    m16, c16 = from_pretrained(out)
    assert c16.dtype == "bf16" and (out / "model.safetensors").exists()
    assert all(torch.equal(m16.state_dict()[k], v.to(torch.bfloat16).float()) for k, v in state.items())


@pytest.mark.parametrize("recorded,name", [
    ("/home/alice/models/gemma-2-2b-it", "gemma-2-2b-it"),
    ("/scratch/hf/hub/models--google--gemma-2-2b-it/snapshots/0123abcd", "google/gemma-2-2b-it"),
    ("./encoders/minilm/", "minilm"),
    ("google/gemma-2-2b-it", "google/gemma-2-2b-it"),
    ("", ""),
])
def test_release_records_the_text_encoder_by_name(tmp_path, recorded, name):
    assert text_encoder_name(recorded) == name
    state = random_state("debug-T2I")
    step_dir = write_ema_checkpoint(tmp_path / "step_00000012", state, 1, size="debug-T2I", text_encoder=recorded)
    out = export_release(step_dir, tmp_path / "rel")
    assert json.loads((out / "config.json").read_text())["text_encoder"] == name
    with pytest.raises(ValueError, match="records the text encoder by name"):
        save_release(state, ReleaseConfig(model_args=get_model_args("debug-T2I").to_dict(), text_encoder="/abs/enc"),
                     tmp_path / "rel2")


def test_unknown_architecture_is_refused(tmp_path):
    cfg = json.loads(ReleaseConfig(model_args=get_model_args("debug").to_dict()).to_json())
    cfg["model_args"]["name"] = "XXL/99"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"config.json: model_args.name='XXL/99' .*valid names: B/16, L/16, XL/16"):
        ReleaseConfig.load(tmp_path)
    step_dir = write_ema_checkpoint(tmp_path / "step_00000012", random_state(), 1)
    meta = run_folder.read_meta(step_dir)
    run_folder.write_meta(step_dir, {**meta, "model_args": cfg["model_args"]})
    with pytest.raises(ValueError, match=r"step_00000012/meta.json: model_args.name='XXL/99'"):
        export_release(step_dir, tmp_path / "rel")


def test_export_checks_the_architecture(tmp_path):
    step_dir = write_ema_checkpoint(tmp_path / "step_00000012", random_state("debug"), 1, size="debug-T2I")
    with pytest.raises(CheckpointError, match="step_00000012 \\(ema weights\\): weights do not match"):
        export_release(step_dir, tmp_path / "rel")


def test_untie_optimizer_steps():
    params = [torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(3))]
    opt = torch.optim.AdamW([{"params": [params[0]]}, {"params": [params[1]], "weight_decay": 0.0}])
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    shared = opt.state[params[0]]["step"]
    opt.state[params[1]]["step"] = shared  # what DeepSpeed's ZeRO-3 universal load leaves behind
    opt.step()
    assert float(shared) == 3.0  # one optimizer step advanced the shared counter twice (1 -> 3)
    assert untie_optimizer_steps(opt) == 1
    opt.step()
    assert [float(opt.state[p]["step"]) for p in params] == [4.0, 4.0]


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("300KiB") == 300 * 1024 and parse_size("17") == 17
    with pytest.raises(Exception, match="use a number"):
        parse_size("5 parsecs")


def guided_times(interval: tuple[float, float], steps: int = 100) -> list[float]:
    """Times (ours, t = 1 noise) at which ``generate`` runs the guided (doubled) batch: a stand-in model
    records the batch size of every call."""
    from pixeldit.diffusion import generate

    calls = []

    def model(x, t, y):
        calls.append((float(t[0]), x.shape[0]))
        return torch.zeros_like(x)

    generate(model, {"y": torch.tensor([3])}, {"y": torch.tensor([10])}, height=8, width=8, steps=steps,
             sampler="euler", cfg_scale=3.25, cfg_interval=interval, seed=0)
    return [round(t, 6) for t, batch in calls if batch == 2]  # the samplers pass float32 times


def official_guided_times(steps: int = 100) -> list[float]:
    """The official class sampler's rule for the published [0.1, 1.0] (c2i/src/diffusion.py,
    FlowDPMSolverSampler: its time runs from noise at 0 to data at 1; guidance iff 0.1 < t_official < 1.0),
    on our grid: t_official = 1 - t."""
    from pixeldit.diffusion.flow import time_grid

    return [round(float(t), 6) for t in time_grid(steps)[:-1] if 0.1 < 1.0 - float(t) < 1.0]


def test_class_cfg_interval_default_follows_the_official_time_convention():
    """Our default guides the steps the official sampler guides (off over the first 10% from noise, on to the
    end), plus at most the boundary step t = 0.9 (our interval is closed, theirs open); the pre-fix default
    (0.10, 1.00), the official numbers read in our time, guided the opposite end."""
    from pixeldit.models import get_model_args
    from pixeldit.release.config import CLASS_CFG_INTERVAL, default_sampler

    sampler = default_sampler(get_model_args("debug"))
    assert sampler.cfg_interval == CLASS_CFG_INTERVAL == (0.0, 0.9) and sampler.cfg_scale == 3.25
    ours, official = set(guided_times(sampler.cfg_interval)), set(official_guided_times())
    assert official <= ours and ours - official == {0.9}
    assert max(ours) == 0.9 and min(ours) == pytest.approx(0.01)  # near data guided, near noise not
    reversed_default = set(guided_times((0.10, 1.00)))
    assert len(reversed_default ^ official) == 20 and 1.0 in reversed_default
