"""Classifier-free guidance as a wrapper around the model function, with a guidance interval.

    model_fn = cfg_model_fn(model, cond, null_cond, scale=3.25, interval=(0.10, 1.00))
    x = sampler(model_fn, noise, timesteps)

Inside the interval (t in [t_lo, t_hi], time convention of ``pixeldit.diffusion.flow``: t = 1 noise) the
velocity is v_uncond + scale * (v_cond - v_uncond), from one batched forward of [cond; uncond]; outside
it, only the conditional velocity (one forward of half the size). scale = 1 disables guidance.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

Cond = dict[str, torch.Tensor]


def _cat(a: Cond, b: Cond) -> Cond:
    if a.keys() != b.keys():
        raise ValueError(f"cond keys {sorted(a)} and null_cond keys {sorted(b)} differ")
    return {k: torch.cat([a[k], b[k].to(a[k].device)], dim=0) for k in a}


def cfg_model_fn(
    model: nn.Module | Callable[..., torch.Tensor],
    cond: Cond,
    null_cond: Cond | None,
    scale: float = 1.0,
    interval: tuple[float, float] = (0.0, 1.0),
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """A ``model_fn(x, t) -> v`` applying CFG with ``scale`` for t inside ``interval``."""
    t_lo, t_hi = interval
    if not 0.0 <= t_lo <= t_hi <= 1.0:
        raise ValueError(f"guidance interval {interval} must satisfy 0 <= t_lo <= t_hi <= 1")
    guided = scale != 1.0
    if guided and null_cond is None:
        raise ValueError("CFG with scale != 1 needs null_cond (the unconditional condition)")
    both = _cat(cond, null_cond) if guided else None

    def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        tv = float(t.reshape(-1)[0])
        if not guided or not (t_lo <= tv <= t_hi):
            return model(x, t, **cond)  # (B, C, H, W)
        v = model(torch.cat([x, x]), torch.cat([t, t]), **both)  # (2B, C, H, W)
        v_c, v_u = v.chunk(2)
        return v_u + scale * (v_c - v_u)

    return model_fn
