"""Classifier-free guidance as a wrapper around the model function, with a guidance interval.

    model_fn = cfg_model_fn(model, cond, null_cond, scale=3.25, interval=(0.0, 0.9))
    x = sampler(model_fn, noise, timesteps)

Inside the interval (t_lo <= t <= t_hi, in the time of ``pixeldit.diffusion.flow``: t = 1 noise, t = 0
data) the velocity is v_uncond + scale * (v_cond - v_uncond), from one batched forward of [cond; uncond];
outside it the conditional velocity alone (one forward of half the size). scale = 1 disables guidance.
The paper's settings, 3.25 on [0.1, 1.0] (early checkpoints) and 2.75 on [0.1, 0.9] (long training), are in the
official time (t = 0 noise): here 3.25 on [0.0, 0.9] and 2.75 on [0.1, 0.9] (pixeldit.release.config
CLASS_CFG_INTERVAL). The interval is closed; the official sampler's is open.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

Cond = dict[str, torch.Tensor]
ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def concat_conditions(a: Cond, b: Cond) -> Cond:
    """Batch two condition dicts with the same keys: each value (B, ...) + (B, ...) -> (2B, ...)."""
    if a.keys() != b.keys():
        raise ValueError(f"cond keys {sorted(a)} and null_cond keys {sorted(b)} differ")
    out = {}
    for k in a:
        if a[k].shape[1:] != b[k].shape[1:]:
            raise ValueError(f"cond[{k!r}] {tuple(a[k].shape)} and null_cond[{k!r}] {tuple(b[k].shape)} differ "
                             "beyond the batch dimension")
        out[k] = torch.cat([a[k], b[k].to(a[k].device).expand(a[k].shape[0], *b[k].shape[1:])], dim=0)
    return out


def cfg_model_fn(
    model: nn.Module | Callable[..., torch.Tensor],
    cond: Cond,
    null_cond: Cond | None,
    scale: float = 1.0,
    interval: tuple[float, float] = (0.0, 1.0),
) -> ModelFn:
    """A ``model_fn(x, t) -> v`` for the samplers, applying CFG with ``scale`` for t inside ``interval``.

    model(x (B, 3, H, W), t (B,), **cond) -> v (B, 3, H, W); cond/null_cond the model's condition kwargs
    ({"y": (B,)} or {"context": (B, T, C), "context_mask": (B, T)}). A null_cond of batch 1 is broadcast.
    All samples of a call share one time (as the samplers guarantee).
    """
    t_lo, t_hi = (float(v) for v in interval)
    if not 0.0 <= t_lo <= t_hi <= 1.0:
        raise ValueError(f"guidance interval {tuple(interval)} must satisfy 0 <= t_lo <= t_hi <= 1 "
                         "(t = 1 is noise, t = 0 data)")
    guided = scale != 1.0
    if guided and null_cond is None:
        raise ValueError("CFG with scale != 1 needs null_cond (the unconditional condition)")
    both = concat_conditions(cond, null_cond) if guided else None

    def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        tv = float(t.reshape(-1)[0])
        if not guided or not t_lo <= tv <= t_hi:
            return model(x, t, **cond)  # (B, 3, H, W)
        v = model(torch.cat([x, x]), torch.cat([t, t]), **both)  # (2B, 3, H, W)
        v_c, v_u = v.chunk(2)  # (B, 3, H, W) each
        return v_u + scale * (v_c - v_u)

    return model_fn
