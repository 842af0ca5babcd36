"""PixelDiT model: shapes, per-pixel AdaLN, compaction, zero-init, gradients, overfitting, FLOP counter."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from pixeldit.models import MODEL_SIZES, ModelArgs, build_model, get_model_args
from pixeldit.models.flops import forward_flops_breakdown
from pixeldit.models.layers import rope_2d
from pixeldit.models.pixel_blocks import PiTBlock, PixelwiseAdaLN, patchify_pixels, unpatchify_pixels

SMALL = ("debug", "debug-T2I")
OFFICIAL = {"layer_style": "official", "post_modulation": True}  # the official layers with PiT post-modulation
VARIANTS = [("debug", {}), ("debug-T2I", {}), ("debug", OFFICIAL),
            ("debug-T2I", {**OFFICIAL, "text_padding": "unmasked"})]


def cond_kwargs(args, batch: int, device="cpu", gen: torch.Generator | None = None) -> dict:
    if args.conditioning == "class":
        return {"y": torch.randint(0, args.num_classes + 1, (batch,), device=device, generator=gen)}
    ctx = torch.randn(batch, args.text_len, args.text_dim, device=device, generator=gen)
    mask = torch.ones(batch, args.text_len, dtype=torch.bool, device=device)
    mask[0, args.text_len // 2:] = False  # padded caption
    return {"context": ctx, "context_mask": mask}


def randomize_zero_init(model: torch.nn.Module, std: float = 0.02, seed: int = 0) -> None:
    """Give every parameter a non-degenerate value (a fresh model has zero modulation and head)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.copy_(torch.randn(p.shape, generator=g) * std)


@pytest.mark.parametrize("size", list(MODEL_SIZES))
@pytest.mark.parametrize("hw", [(256, 256), (192, 320), (320, 128)])
def test_shapes_every_size(size, hw):
    args = get_model_args(size)
    device = "cpu" if size in SMALL else "meta"
    model = build_model(args, device=device)
    x = torch.randn(2, 3, *hw, device=device)
    t = torch.rand(2, device=device)
    v, feats = model(x, t, return_features_at=args.repa_block, **cond_kwargs(args, 2, device))
    assert v.shape == x.shape
    L = (hw[0] // 16) * (hw[1] // 16)
    assert feats.shape == (2, L, args.hidden_size)


@pytest.mark.parametrize("size", SMALL)
def test_fresh_model_outputs_exactly_zero(size):
    args = get_model_args(size)
    model = build_model(args)
    v = model(torch.randn(3, 3, 32, 64), torch.rand(3), **cond_kwargs(args, 3))
    assert torch.equal(v, torch.zeros_like(v))


def test_pixelwise_adaln_differs_across_pixels_of_a_patch():
    torch.manual_seed(0)
    ada = PixelwiseAdaLN(cond_dim=8, pixel_dim=4, patch_size=4)
    torch.nn.init.normal_(ada.linear.weight)  # trained (non-zero) modulation
    s_cond = torch.randn(5, 8)  # 5 patches
    mods = ada(s_cond)
    assert len(mods) == 6
    for m in mods:
        assert m.shape == (5, 16, 4)
        # every pixel of a patch gets its own parameters: no two pixels share a row
        per_patch = m[0]  # (p*p, Dp)
        assert torch.cdist(per_patch, per_patch).add(torch.eye(16) * 1e9).min() > 0

    # and the model uses them: two identical pixels inside one patch are updated differently
    args = get_model_args("debug")
    model = build_model(args)
    randomize_zero_init(model)
    block = model.pixel_blocks[0]
    x = torch.zeros(1, 256, args.pixel_dim)  # one patch, all pixels identical
    out = block(x, torch.randn(1, args.hidden_size), B=1, rope=_rope_for(args, 1, 1))
    assert not torch.allclose(out[0, 0], out[0, 1])


def _rope_for(args, gh, gw):
    from pixeldit.models.layers import rope_2d
    return rope_2d(args.attn_dim // args.attn_heads, gh, gw)


@pytest.mark.parametrize("hw", [(64, 64), (32, 96)])
def test_compaction_shortens_attention_by_p_squared(hw):
    args = get_model_args("debug")
    model = build_model(args)
    seen = []
    hook = model.pixel_blocks[0].compaction.attn.register_forward_hook(lambda m, inp, out: seen.append(inp[0].shape))
    model(torch.randn(2, 3, *hw), torch.rand(2), y=torch.tensor([0, 1]))
    hook.remove()
    pixel_tokens = hw[0] * hw[1]
    (B, L, A), = seen
    assert (B, A) == (2, args.attn_dim)
    assert pixel_tokens == L * args.patch_size ** 2


def test_patchify_roundtrip():
    x = torch.randn(2, 3, 32, 48)
    assert torch.equal(unpatchify_pixels(patchify_pixels(x, 16), 2, 32, 48, 16), x)


@pytest.mark.parametrize("size,overrides", VARIANTS)
def test_gradient_reaches_every_parameter(size, overrides):
    args = get_model_args(size, **overrides)
    model = build_model(args)
    randomize_zero_init(model)
    x = torch.randn(2, 3, 32, 32)
    v, feats = model(x, torch.rand(2), return_features_at=1, **cond_kwargs(args, 2))
    (v.square().mean() + feats.mean()).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    if args.conditioning == "class":
        # only the rows of the label table that were looked up get gradient
        missing = [n for n in missing if n != "y_embed.table.weight"]
        assert model.y_embed.table.weight.grad.abs().sum() > 0
    assert missing == []


def test_debug_model_overfits_one_batch():
    torch.manual_seed(0)
    args = get_model_args("debug")
    model = build_model(args)
    x0 = torch.rand(4, 3, 32, 32) * 2 - 1
    noise = torch.randn_like(x0)
    t = torch.tensor([0.2, 0.4, 0.6, 0.8])
    xt = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * noise
    target = noise - x0
    y = torch.tensor([0, 1, 2, 3])
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    first = None
    for _ in range(150):
        loss = (model(xt, t, y=y) - target).square().mean()
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05 * first, (first, loss.item())


def test_any_multiple_of_patch_size_but_not_others():
    args = get_model_args("debug")
    model = build_model(args)
    for hw in [(16, 16), (48, 80), (128, 32)]:
        assert model(torch.randn(1, 3, *hw), torch.rand(1), y=torch.tensor([0])).shape == (1, 3, *hw)
    with pytest.raises(ValueError, match="multiples of patch size 16"):
        model(torch.randn(1, 3, 40, 48), torch.rand(1), y=torch.tensor([0]))


def test_unknown_size_lists_valid_sizes():
    with pytest.raises(ValueError, match="valid sizes: B/16, L/16, XL/16, T2I"):
        get_model_args("XXL/2")


@pytest.mark.parametrize("size,overrides", VARIANTS)
def test_flop_counter_matches_torch_flop_counter(size, overrides):
    """Every Linear is counted exactly; attention products are added analytically (SDPA on CPU is
    not counted by FlopCounterMode)."""
    args = get_model_args(size, **overrides)
    hw = (32, 48) if args.conditioning == "class" else (64, 32)
    model = build_model(args)
    with FlopCounterMode(display=False) as counter:
        model(torch.randn(1, 3, *hw), torch.rand(1), **cond_kwargs(args, 1))
    ours = forward_flops_breakdown(args, *hw)
    assert counter.get_total_flops() == ours.total - ours.patch_attention - ours.pixel_attention


def test_flop_counter_reproduces_paper_numbers():
    xl = get_model_args("XL/16")
    # Table 5 of the paper: 82,247 GFLOPs for XL/16 at 256 without pixel-token compaction
    assert round(forward_flops_breakdown(xl, 256, 256, compaction=False).total / 1e9) == 82247
    params = sum(p.numel() for p in build_model(xl, device="meta").parameters())
    assert round(params / 1e6) == 798  # PixelDiT-XL: 797.5M parameters


def test_saved_args_from_before_the_new_fields_keep_their_behaviour():
    """A model_args dict written before rope_positions existed means integer positions; new models default
    to the official normalized ones."""
    saved = get_model_args("debug").to_dict()
    for key in ("rope_positions", "post_modulation", "layer_style", "text_padding"):
        del saved[key]
    old = ModelArgs.from_dict(saved)
    assert (old.rope_positions, old.post_modulation, old.layer_style, old.text_padding) == (
        "integer", False, "pixeldit", "masked")
    assert get_model_args("debug").rope_positions == "normalized"
    assert ModelArgs.from_dict(get_model_args("debug").to_dict()) == get_model_args("debug")


@pytest.mark.parametrize("field,value,valid", [("rope_positions", "grid", "normalized, integer"),
                                               ("layer_style", "nvidia", "pixeldit, official"),
                                               ("text_padding", "zero", "masked, unmasked"),
                                               ("post_modulation", "yes", "true, false")])
def test_invalid_choices_list_the_valid_values(field, value, valid):
    with pytest.raises(ValueError, match=f"{field}='{value}'; valid values: {valid}"):
        get_model_args("debug", **{field: value})


def test_normalized_rope_positions_span_the_same_range_at_every_resolution():
    """Normalized: the corners of a 4x6 and an 8x12 grid sit at the same positions (0 and 16); integer: not."""
    for positions, same in (("normalized", True), ("integer", False)):
        small, big = rope_2d(16, 4, 6, positions=positions), rope_2d(16, 8, 12, positions=positions)
        assert torch.equal(small[0][0], big[0][0])
        assert torch.allclose(small[0][-1], big[0][-1], atol=1e-6) == same


def test_rope_positions_change_the_output():
    args = get_model_args("debug")
    model = build_model(args)
    randomize_zero_init(model, std=0.2)
    x, t, y = torch.randn(1, 3, 48, 64), torch.rand(1), torch.tensor([1])
    legacy = build_model(replace(args, rope_positions="integer"))
    legacy.load_state_dict(model.state_dict())
    assert (model(x, t, y=y) - legacy(x, t, y=y)).abs().max() > 1e-3


@pytest.mark.parametrize("text_padding", ["masked", "unmasked"])
def test_unmasked_text_padding_ignores_the_mask(text_padding):
    args = get_model_args("debug-T2I", text_padding=text_padding)
    model = build_model(args)
    randomize_zero_init(model, std=0.2)
    x, t = torch.randn(2, 3, 32, 32), torch.rand(2)
    cond = cond_kwargs(args, 2, gen=torch.Generator().manual_seed(0))  # sample 0 is padded
    with_mask = model(x, t, **cond)
    without = model(x, t, context=cond["context"])
    assert torch.equal(with_mask, without) == (text_padding == "unmasked")


def test_post_modulation_pit_block_modulates_outputs():
    """Post-modulation: 4 chunks (scale1, shift1, scale2, shift2) per pixel, no gates; zero modulation leaves the
    attention and MLP outputs unscaled (a pre-modulated block is then the identity)."""
    torch.manual_seed(0)
    block = PiTBlock(8, 4, 2, attn_dim=8, num_heads=2, post_modulation=True)
    assert block.adaln.linear.out_features == 4 * 4 * 4
    x, s_cond = torch.randn(3, 4, 4), torch.randn(3, 8)
    rope = rope_2d(4, 1, 3)
    torch.nn.init.zeros_(block.adaln.linear.weight)
    torch.nn.init.zeros_(block.adaln.linear.bias)
    plain = x + block.compaction(block.norm1(x), 1, rope)
    plain = plain + block.mlp(block.norm2(plain))
    torch.testing.assert_close(block(x, s_cond, 1, rope), plain)
    block.adaln.linear.bias.data.view(4, 4, 4)[:, 1] = 0.5  # (pixel, chunk, channel): shift1 of every pixel
    block.adaln.linear.bias.data.view(4, 4, 4)[:, 2] = -1.0  # scale2: the MLP output is switched off
    shifted = x + block.compaction(block.norm1(x), 1, rope) + 0.5
    torch.testing.assert_close(block(x, s_cond, 1, rope), shifted)
