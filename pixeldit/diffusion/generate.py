"""Generate images from a PixelDiT: sampler + classifier-free guidance + time grid in one call."""
from __future__ import annotations

import torch
from torch import nn

from .flow import time_grid
from .guidance import Cond, cfg_model_fn
from .samplers import get_sampler


@torch.no_grad()
def generate(
    model: nn.Module,
    noise: torch.Tensor,
    cond: Cond,
    *,
    null_cond: Cond | None = None,
    steps: int = 25,
    sampler: str = "flow_dpm",
    cfg_scale: float = 1.0,
    cfg_interval: tuple[float, float] = (0.0, 1.0),
    shift: float = 1.0,
    progress: bool = False,
) -> torch.Tensor:
    """Integrate from ``noise`` (B, 3, H, W) at t = 1 to an image at t = 0; returns (B, 3, H, W) clamped to [-1, 1].

    ``cond``/``null_cond`` are the model's condition kwargs ({"y": ...} or {"context", "context_mask"}).
    Seed-reproducible: all randomness is in ``noise``.
    """
    fn = cfg_model_fn(model, cond, null_cond, scale=cfg_scale, interval=cfg_interval)
    x = get_sampler(sampler)(fn, noise, time_grid(steps, shift, device=noise.device), progress=progress)
    return x.clamp(-1, 1)
