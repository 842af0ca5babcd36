"""REPA end to end: a tiny random DINOv2 saved and reloaded, the projector, and the loss on the debug model."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pixeldit.conditioning import DinoV2Teacher
from pixeldit.conditioning.teacher import IMAGENET_MEAN, IMAGENET_STD
from pixeldit.diffusion import ObjectiveConfig, REPAProjector, compute_loss, repa_loss
from pixeldit.models import build_model, get_model_args


def save_dinov2(path, registers: int = 0):
    from transformers import Dinov2Config, Dinov2Model, Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    kw = dict(hidden_size=24, num_hidden_layers=1, num_attention_heads=2, intermediate_size=48, patch_size=14,
              image_size=28)
    torch.manual_seed(0)
    if registers:
        Dinov2WithRegistersModel(Dinov2WithRegistersConfig(num_register_tokens=registers, **kw)).save_pretrained(path)
    else:
        Dinov2Model(Dinov2Config(**kw)).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return DinoV2Teacher.from_pretrained(save_dinov2(tmp_path_factory.mktemp("dinov2")))


def reference_patch_tokens(backbone, x0: torch.Tensor, size: tuple[int, int], skip: int) -> torch.Tensor:
    x = F.interpolate(x0, size=size, mode="bicubic", align_corners=False, antialias=True)
    x = ((x + 1) / 2 - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        return backbone(pixel_values=x).last_hidden_state[:, skip:]


def test_teacher_resizes_to_the_model_patch_grid(teacher):
    assert teacher.dim == 24 and teacher.patch == 14 and not any(p.requires_grad for p in teacher.parameters())
    x0 = torch.rand(2, 3, 32, 48) * 2 - 1  # a 2 x 3 grid of 16-px patches
    feats = teacher(x0)  # grid inferred from the 16-px model patch
    assert feats.shape == (2, 6, 24)  # 28 x 42 px for DINOv2: 2 x 3 tokens of 14 px
    assert torch.allclose(feats, reference_patch_tokens(teacher.backbone, x0, (28, 42), skip=1), atol=1e-5)  # no CLS
    assert torch.equal(teacher(x0, (2, 3)), feats)


def test_teacher_drops_register_tokens(tmp_path):
    t = DinoV2Teacher.from_pretrained(save_dinov2(tmp_path / "reg", registers=4))
    assert t.num_registers == 4
    x0 = torch.rand(1, 3, 32, 32) * 2 - 1
    feats = t(x0)
    assert feats.shape == (1, 4, 24)
    assert torch.allclose(feats, reference_patch_tokens(t.backbone, x0, (28, 28), skip=5), atol=1e-5)


def test_teacher_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="repa_teacher"):
        DinoV2Teacher.from_pretrained(tmp_path / "missing")
    from transformers import BertConfig, BertModel

    BertModel(BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8,
                         vocab_size=16)).save_pretrained(tmp_path / "bert")
    with pytest.raises(ValueError, match="is not a DINOv2"):
        DinoV2Teacher.from_pretrained(tmp_path / "bert")


def test_projector_shape_and_loss_is_one_minus_cosine():
    proj = REPAProjector(64, 24, width=32)
    assert [type(m).__name__ for m in proj.net] == ["Linear", "SiLU", "Linear", "SiLU", "Linear"]
    assert proj(torch.randn(2, 5, 64)).shape == (2, 5, 24)
    a = torch.randn(2, 5, 24)
    assert torch.isclose(repa_loss(a, 3 * a), torch.tensor(0.0), atol=1e-6)  # aligned: 0
    assert torch.isclose(repa_loss(a, -a), torch.tensor(2.0))  # opposite: 2
    b = torch.randn(2, 5, 24)
    manual = 1 - (F.normalize(a, dim=-1) * F.normalize(b, dim=-1)).sum(-1).mean()
    assert torch.isclose(repa_loss(a, b), manual, atol=1e-6)
    with pytest.raises(ValueError, match="teacher's hidden size"):
        repa_loss(a, torch.randn(2, 5, 12))


def test_compute_loss_with_repa_end_to_end(teacher):
    args = get_model_args("debug", repa_block=1)
    torch.manual_seed(0)
    model = build_model(args)
    with torch.no_grad():  # leave the zero-init so gradients reach the first block through the output
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.normal_(std=0.02)
    projector = REPAProjector(args.hidden_size, teacher.dim, width=32)
    x0 = torch.rand(2, 3, 32, 48) * 2 - 1
    y = torch.tensor([1, 2])
    cfg = ObjectiveConfig(repa_weight=0.5, cond_drop_prob=0.0)
    out = compute_loss(model, x0, {"y": y}, cfg, projector=projector, teacher=teacher,
                       null_cond=model.null_condition(2), generator=torch.Generator().manual_seed(0))
    assert set(out) == {"loss", "flow", "repa"}
    assert torch.isclose(out["loss"], out["flow"] + 0.5 * out["repa"])
    # the repa term is 1 - cos between the projected block-1 tokens and the teacher's tokens
    g = torch.Generator().manual_seed(0)  # replay the generator: t, noise, dropout
    from pixeldit.diffusion.flow import interpolate, sample_timesteps

    t = sample_timesteps(2, generator=g)
    x_t = interpolate(x0, torch.randn(x0.shape, generator=g), t)
    with torch.no_grad():
        _, feats = model(x_t, t, y=y, return_features_at=1)
        cos = F.cosine_similarity(projector(feats), teacher(x0), dim=-1)  # (B, L)
    assert torch.isclose(out["repa"], 1 - cos.mean(), atol=1e-5)
    out["loss"].backward()
    assert projector.net[0].weight.grad.abs().sum() > 0 and projector.net[4].weight.grad.abs().sum() > 0
    assert model.patch_blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())


def test_repa_switched_off(teacher):
    args = get_model_args("debug")
    model = build_model(args)
    x0 = torch.rand(2, 3, 32, 32) * 2 - 1
    projector = REPAProjector(args.hidden_size, teacher.dim, width=32)
    off = compute_loss(model, x0, {"y": torch.tensor([1, 2])}, ObjectiveConfig(repa_weight=0.0),
                       projector=projector, teacher=teacher, null_cond=model.null_condition(2))
    assert off["repa"] == 0 and torch.isclose(off["loss"], off["flow"])
    off["loss"].backward()
    assert all(p.grad is None for p in projector.parameters())  # the projector is not used at all
    with pytest.raises(ValueError, match="both projector and teacher"):
        compute_loss(model, x0, {"y": torch.tensor([1, 2])}, ObjectiveConfig(), projector=projector,
                     null_cond=model.null_condition(2))
