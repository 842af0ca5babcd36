"""Image grid from the EMA model every ``logging.image_every`` steps.

Collective: under ZeRO-3 the EMA partitions are all-gathered into the full weights; rank 0 then builds a
plain PixelDiT from them, samples ``logging.image_count`` images at the stage's base resolution with
``pixeldit.diffusion.generate`` (sampler ``logging.image_sampler``, the stage's shift, classifier-free
guidance, fixed noise seed), and saves
``{run_dir}/samples/step_{N:08d}.png`` (also sent to wandb). The training RNG is not touched.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.distributed as dist

from pixeldit.diffusion import generate, image_grid
from pixeldit.models import build_model
from pixeldit.run_folder import preview_path

from .config import RunConfig, StageConfig
from .ema import EMA


def ema_full_state(ema: EMA, device: torch.device) -> dict[str, torch.Tensor]:
    """Full EMA state dict on every rank (all-gather of the ZeRO-3 partitions; a copy otherwise)."""
    full = {}
    for name, shadow in ema.shadow.items():
        shape = ema.shapes[name]
        if ema.layout == "zero3" and dist.is_initialized() and dist.get_world_size() > 1:
            part = shadow.to(device)
            parts = [torch.empty_like(part) for _ in range(dist.get_world_size())]
            dist.all_gather(parts, part)
            flat = torch.cat(parts)
        else:
            flat = shadow
        full[name] = flat[: math.prod(shape)].reshape(shape).to("cpu", copy=True)
    return full


@torch.no_grad()
def write_preview(cfg: RunConfig, bundle, ema: EMA, conditioner, stage: StageConfig, step: int, metrics,
                  device: torch.device) -> Path | None:
    full = ema_full_state(ema, device)
    path = None
    if not dist.is_initialized() or dist.get_rank() == 0:
        model = build_model(cfg.model.args()).to(device)
        model.load_state_dict(full)
        model.eval()
        n = cfg.logging.image_count
        cond, null_cond = conditioner.for_prompts(n)
        gen = torch.Generator(device=device).manual_seed(cfg.seed)
        noise = torch.randn(n, 3, stage.resolution, stage.resolution, generator=gen, device=device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.deepspeed.precision == "bf16"):
            images = generate(model, cond, null_cond, noise=noise, steps=cfg.logging.image_sample_steps,
                              sampler=cfg.logging.image_sampler, cfg_scale=cfg.logging.image_cfg_scale,
                              shift=cfg.stage_objective(stage).shift)  # (N, 3, H, W) in [-1, 1]
        grid = image_grid(images.float().cpu(), nrow=max(1, int(math.ceil(math.sqrt(n)))))
        path = preview_path(cfg.run_dir, step)
        metrics.log_images(step, grid, path)
        del model
    if dist.is_initialized():
        dist.barrier()
    return path
