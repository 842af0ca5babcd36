"""Official checkpoint interop: key/shape maps against the committed fixture of every official key, exact round
trips, the import/export command, and import -> train one step -> export -> import.

``tests/data/official_keys.json`` lists every key and shape of the full-size official models (class-conditional
XL/16 and text-to-image 1.3B, with and without PiT post-modulation); it was generated once from the official
module definitions with ``python -m tools.parity_official fixture`` (numerical parity: tools/BENCHMARKS.md).
"""
from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from pixeldit.models import build_model, get_model_args
from pixeldit.models.layers import apply_rope, rope_text
from pixeldit.release import ReleaseConfig, UnsafeCheckpointError, from_pretrained
from pixeldit.release.writer import save_release
from pixeldit.release.official import (check_official_args, infer_official_args, official_shapes, official_to_ours,
                                       ours_to_official, rope_channel_order)
from pixeldit.release.official_cli import main, read_official

FIXTURE = json.loads((Path(__file__).parent / "data" / "official_keys.json").read_text())["variants"]
EXPECTED = {"c2i-xl": ("XL/16", False), "c2i-xl-postmod": ("XL/16", True), "t2i": ("T2I", False),
            "t2i-postmod": ("T2I", True)}
PRUNED = ("attn.q_norm_y.", "attn.proj_y.", "norm_y2.", "mlp_y.")  # the last block's text outputs


def small_args(conditioning: str, post_modulation: bool):
    """A reduced official-style architecture (depth 2, one PiT block) of the given kind."""
    size = "debug" if conditioning == "class" else "debug-T2I"
    extra = {"text_padding": "unmasked"} if conditioning == "text" else {}
    return get_model_args(size, layer_style="official", post_modulation=post_modulation, **extra)


def random_state(args, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) for k, v in build_model(args, device="meta").state_dict().items()}


def pattern(keys) -> set[str]:
    return {re.sub(r"blocks\.\d+\.", "blocks.N.", k) for k in keys}


@pytest.mark.parametrize("variant", list(FIXTURE))
def test_every_official_key_maps_both_ways(variant):
    """Full size on the meta device: inferred architecture, our exact keys and shapes, and back to the fixture."""
    official = {k: torch.empty(s, device="meta") for k, s in FIXTURE[variant].items()}
    args = infer_official_args(official)
    assert (args.name, args.post_modulation) == EXPECTED[variant]
    assert (args.layer_style, args.rope_positions) == ("official", "normalized")
    assert args.text_padding == ("unmasked" if variant.startswith("t2i") else "masked")
    ours = official_to_ours(official, args)
    model_shapes = {k: v.shape for k, v in build_model(args, device="meta").state_dict().items()}
    assert {k: v.shape for k, v in ours.items()} == model_shapes
    back = ours_to_official(ours, args)
    assert {k: list(v.shape) for k, v in back.items()} == FIXTURE[variant]
    assert {k: list(v) for k, v in official_shapes(args).items()} == FIXTURE[variant]
    last = f"patch_blocks.{args.depth - 1}."
    pruned = {k for k in FIXTURE[variant] if k.startswith(last) and any(p in k for p in PRUNED)}
    assert len(pruned) == (7 if variant.startswith("t2i") else 0)  # only the text model prunes its last text stream


@pytest.mark.parametrize("conditioning", ["class", "text"])
@pytest.mark.parametrize("post_modulation", [False, True])
def test_small_layout_matches_fixture_and_round_trips(conditioning, post_modulation):
    args = small_args(conditioning, post_modulation)
    variant = ("c2i-xl" if conditioning == "class" else "t2i") + ("-postmod" if post_modulation else "")
    ours = random_state(args)
    official = ours_to_official(ours, args)
    assert pattern(official) == pattern(FIXTURE[variant])  # same layout as the real one, fewer blocks
    assert infer_official_args(official) == args
    again = official_to_ours(official, args)
    assert again.keys() == ours.keys() and all(torch.equal(again[k], v) for k, v in ours.items())
    # an official checkpoint has trained values in the pruned tensors: import drops them, export re-creates them
    g = torch.Generator().manual_seed(1)
    trained = {k: torch.randn(v.shape, generator=g) for k, v in official.items()}
    back = ours_to_official(official_to_ours(trained, args), args)
    last = f"patch_blocks.{args.depth - 1}."
    for k, v in trained.items():
        if k.startswith(last) and any(p in k for p in PRUNED):
            assert torch.equal(back[k], torch.ones_like(v) if "norm" in k else torch.zeros_like(v)), k
        elif k.startswith(last) and ("qkv_y" in k or "adaLN_modulation_txt" in k):
            D = args.hidden_size  # kept: K/V rows, shift/scale rows; re-created as zeros: Q rows, the other 4 chunks
            kept, recreated = (slice(D, None), slice(0, D)) if "qkv_y" in k else (slice(0, 2 * D), slice(2 * D, None))
            assert torch.equal(back[k][kept], v[kept]) and not back[k][recreated].any(), k
        else:
            assert torch.equal(back[k], v), k


def test_rope_channel_order_turns_interleaved_rope_into_ours():
    """Official RoPE multiplies interleaved channel pairs by e^{i angle}; after the map's channel order ours
    gives the same vectors (here: 1D text RoPE, whose pairs alternate between our row and column halves)."""
    hd, T = 16, 7
    x = torch.randn(2, 3, T, hd)
    angles = torch.arange(T).float()[:, None] / 10000 ** (torch.arange(0, hd, 2).float() / hd)  # (T, hd/2)
    official = torch.view_as_real(torch.view_as_complex(x.reshape(2, 3, T, hd // 2, 2)) * torch.polar(
        torch.ones_like(angles), angles)).flatten(3)
    order = rope_channel_order(hd)
    ours = apply_rope(x[..., order], *rope_text(hd, T))
    torch.testing.assert_close(ours, official[..., order], rtol=0, atol=1e-6)


def test_only_official_style_models_export():
    args = get_model_args("debug")
    with pytest.raises(ValueError, match="layer_style.*only models with"):
        ours_to_official(random_state(args), args)
    with pytest.raises(ValueError, match="rope_positions"):
        check_official_args(replace(small_args("class", False), rope_positions="integer"))


def test_wrong_official_weights_are_named(tmp_path):
    args = small_args("text", False)
    official = ours_to_official(random_state(args), args)
    official["extra.weight"] = torch.zeros(1)
    del official["y_pos_embedding"]
    with pytest.raises(ValueError, match=r"ckpt X: .*missing: \['y_pos_embedding'\].*unexpected: \['extra.weight'\]"):
        official_to_ours(official, args, where="ckpt X")


class Metadata:  # stands for the pickled training metadata of the official checkpoints
    def __init__(self, epoch):
        self.epoch = epoch


def test_import_command_reads_official_files(tmp_path, capsys):
    """Text model: ``{"state_dict": {"core.*", "_repa_projector.*"}}`` with pickled metadata (needs --allow-pickle);
    class model: a Lightning checkpoint with raw and EMA copies."""
    args = small_args("text", True)
    official = ours_to_official(random_state(args), args)
    src = tmp_path / "pixeldit_t2i.pth"
    torch.save({"state_dict": {**{"core." + k: v for k, v in official.items()},
                               "_repa_projector.0.weight": torch.ones(2, 2)}, "meta": Metadata(3)}, src)
    with pytest.raises(UnsafeCheckpointError, match="--allow-pickle"):
        read_official(src)
    assert main(["import", str(src), str(tmp_path / "t2i")]) == 2
    assert "--allow-pickle" in capsys.readouterr().err
    assert main(["import", str(src), str(tmp_path / "t2i"), "--allow-pickle"]) == 0
    model, cfg = from_pretrained(tmp_path / "t2i")
    assert model.args == args and cfg.system_prompt.startswith("Given a user prompt") and cfg.sampler.shift == 4.0
    assert json.loads((tmp_path / "t2i" / "config.json").read_text())["model_args"]["rope_positions"] == "normalized"
    assert main(["export", str(tmp_path / "t2i"), str(tmp_path / "out.safetensors")]) == 0
    exported = load_file(str(tmp_path / "out.safetensors"))
    assert exported.keys() == official.keys() and all(torch.equal(exported[k], v) for k, v in official.items())

    args = small_args("class", False)
    raw, ema = random_state(args, 1), random_state(args, 2)
    ckpt = {"state_dict": {**{"denoiser." + k: v for k, v in ours_to_official(raw, args).items()},
                           **{"ema_denoiser." + k: v for k, v in ours_to_official(ema, args).items()},
                           "diffusion_trainer.proj.0.weight": torch.ones(2, 2)}, "global_step": 10}
    torch.save(ckpt, tmp_path / "xl.ckpt")
    for weights, expect in (("ema", ema), ("raw", raw)):
        assert main(["import", str(tmp_path / "xl.ckpt"), str(tmp_path / weights), "--weights", weights]) == 0
        model, cfg = from_pretrained(tmp_path / weights)
        assert all(torch.equal(model.state_dict()[k], v) for k, v in expect.items())
        assert cfg.weights == weights and cfg.sampler.cfg_interval == (0.0, 0.9)
    assert main(["export", str(tmp_path / "ema"), str(tmp_path / "xl.pth")]) == 0
    back = torch.load(tmp_path / "xl.pth", weights_only=True)["state_dict"]
    assert {k: v for k, v in back.items() if k.startswith("ema_denoiser.")}.keys() == {
        k for k in ckpt["state_dict"] if k.startswith("ema_denoiser.")}
    assert main(["export", str(tmp_path / "ema"), str(tmp_path / "xl.bin")]) == 2
    assert "valid suffixes: .safetensors, .pth" in capsys.readouterr().err


@pytest.mark.parametrize("conditioning", ["class", "text"])
def test_import_train_one_step_export_import(tmp_path, conditioning):
    """Untouched tensors survive import -> one optimizer step on a few parameters -> export -> import unchanged."""
    args = small_args(conditioning, conditioning == "text")
    g = torch.Generator().manual_seed(0)
    official = {k: torch.randn(v.shape, generator=g) for k, v in ours_to_official(random_state(args), args).items()}
    save_file(official, str(tmp_path / "official.safetensors"))
    assert main(["import", str(tmp_path / "official.safetensors"), str(tmp_path / "a")]) == 0
    model, _ = from_pretrained(tmp_path / "a")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trained = {n: p for n, p in model.named_parameters() if n.startswith("pixel_blocks.0.")}
    for n, p in model.named_parameters():
        p.requires_grad_(n in trained)
    opt = torch.optim.AdamW(trained.values(), lr=1e-2)
    x, t = torch.randn(2, 3, 32, 48), torch.rand(2)
    cond = {"y": torch.tensor([1, args.num_classes])} if conditioning == "class" else {
        "context": torch.randn(2, args.text_len, args.text_dim),
        "context_mask": torch.ones(2, args.text_len, dtype=torch.bool)}
    model.train()
    (model(x, t, **cond) - torch.randn_like(x)).square().mean().backward()
    opt.step()
    cfg = ReleaseConfig.load(tmp_path / "a")
    save_release({k: v.detach() for k, v in model.state_dict().items()}, cfg, tmp_path / "b")
    assert main(["export", str(tmp_path / "b"), str(tmp_path / "b.safetensors")]) == 0
    assert main(["import", str(tmp_path / "b.safetensors"), str(tmp_path / "c")]) == 0
    final = from_pretrained(tmp_path / "c")[0].state_dict()
    untouched = [k for k in final if not k.startswith("pixel_blocks.0.")]
    assert all(torch.equal(final[k], before[k]) for k in untouched)
    assert all(torch.equal(final[k], v) for k, v in model.state_dict().items())  # trained ones survive too
    assert any(not torch.equal(final[k], before[k]) for k in trained)  # and the step did change them
