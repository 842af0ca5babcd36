"""The model, the flow objective and the sampler together can learn sharp images exactly.

The debug PixelDiT (patch 16) overfits four 32x32 images, one class each, whose sharp edges cut through the
patch borders at 16 (a square, a disc, a triangle, a bar); the images sampled from noise for those classes
must reproduce them at >= 25 dB PSNR. A defect in patchify / unpatchify, the time convention, the condition
path or a sampler shows up here as blocks, blur or the wrong image; the prompt-following benchmark
(tools/bench_learning.py) covers the text path at scale.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from pixeldit.diffusion import generate
from pixeldit.diffusion.objective import ObjectiveConfig, compute_loss
from pixeldit.models import build_model, get_model_args
from tools.sampler_order import single_thread

SIZE = 32  # 2 x 2 patches of 16
STEPS = 400
SHIFT = 2.0  # more training samples at the noise end, where each image's layout is decided


def sharp_images() -> torch.Tensor:
    """(4, 3, 32, 32) in [-1, 1]: flat shapes whose edges are off the 16-pixel patch grid."""
    shapes = []
    for kind, fg, bg in (("square", (220, 30, 30), (255, 255, 255)), ("disc", (40, 70, 220), (0, 0, 0)),
                         ("triangle", (240, 210, 30), (128, 128, 128)), ("bar", (30, 170, 60), (190, 215, 240))):
        img = Image.new("RGB", (SIZE, SIZE), bg)
        draw = ImageDraw.Draw(img)
        if kind == "square":
            draw.rectangle((7, 4, 24, 21), fill=fg)
        elif kind == "disc":
            draw.ellipse((3, 8, 27, 29), fill=fg)
        elif kind == "triangle":
            draw.polygon([(19, 4), (28, 26), (4, 26)], fill=fg)
        else:
            draw.rectangle((13, 2, 20, 28), fill=fg)
        shapes.append(torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 127.5 - 1)
    return torch.stack(shapes)


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of (B, 3, H, W) images in [-1, 1] (peak 1 on the [0, 1] scale)."""
    mse = ((a - b) / 2).square().mean(dim=(1, 2, 3))
    return 10 * torch.log10(1 / mse)


def test_fixture_edges_cross_the_patch_borders():
    for img in sharp_images():
        shape = (img != img[:, :1, :1]).any(dim=0)  # (32, 32): pixels unlike the background corner
        for line in (shape[16], shape[:, 16]):  # the first row / column of the lower / right patches
            assert line.any() and not line.all()  # the shape's outline crosses the border there


@pytest.mark.slow
def test_debug_model_overfits_sharp_images_at_high_psnr():
    x = sharp_images()
    labels = torch.arange(len(x))
    torch.manual_seed(0)
    model = build_model(get_model_args("debug"))
    opt = torch.optim.AdamW(model.parameters(), lr=4e-3, weight_decay=0.0)
    cfg = ObjectiveConfig(shift=SHIFT, repa_weight=0.0, cond_drop_prob=0.0)
    gen = torch.Generator().manual_seed(0)
    batch, y = x.repeat(4, 1, 1, 1), labels.repeat(4)  # (16, 3, 32, 32), (16,)
    with single_thread():
        for step in range(STEPS):
            for group in opt.param_groups:  # cosine decay to 0: the last steps polish the fine detail
                group["lr"] = 4e-3 * 0.5 * (1 + math.cos(math.pi * step / STEPS))
            loss = compute_loss(model, batch, {"y": y}, cfg, null_cond=model.null_condition(len(y)),
                                generator=gen)["loss"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
        model.eval()
        samples = generate(model, {"y": labels}, height=SIZE, width=SIZE, steps=50, sampler="euler", shift=SHIFT,
                           seed=1)
    quality = psnr(samples, x)
    per_image = [round(float(q), 1) for q in quality]
    assert quality.min() >= 25.0, f"PSNR per image {per_image} dB; final loss {float(loss):.4f}"
