"""The training objective: velocity matching on the rectified flow + REPA alignment, with CFG dropout.

    loss = || v_theta(x_t, t, c) - (noise - x0) ||^2  +  repa_weight * (1 - cos(proj(h_k), dino(x0)))

t ~ logit-normal(t_mean, t_std) then shifted (``flow.sample_timesteps``); the condition c is replaced by
the null condition with probability ``cond_drop_prob`` per sample (classifier-free guidance). All
randomness comes from ``generator`` so a run is reproducible (and resumable) step by step.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .flow import flow_matching_loss, interpolate, sample_timesteps
from .repa import repa_loss

Cond = dict[str, torch.Tensor]
# the frozen REPA teacher (pixeldit.conditioning.DinoV2Teacher): (x0 (B, 3, H, W), patch grid (rows, cols)) -> (B, L, C)
Teacher = Callable[[torch.Tensor, tuple[int, int]], torch.Tensor]


@dataclass
class ObjectiveConfig:
    t_mean: float = 0.0  # logit-normal mean
    t_std: float = 1.0  # logit-normal std
    shift: float = 1.0  # resolution shift (1.0 at 256, 3.0 at 512, 4.0 at 1024 for T2I)
    repa_weight: float = 0.5  # lambda; 0 switches REPA off (per curriculum stage)
    cond_drop_prob: float = 0.1  # label/caption dropout for CFG

    def __post_init__(self):
        problems = []
        if self.t_std <= 0:
            problems.append(f"t_std={self.t_std} must be > 0")
        if self.shift <= 0:
            problems.append(f"shift={self.shift} must be > 0")
        if self.repa_weight < 0:
            problems.append(f"repa_weight={self.repa_weight} must be >= 0 (0 switches REPA off)")
        if not 0.0 <= self.cond_drop_prob <= 1.0:
            problems.append(f"cond_drop_prob={self.cond_drop_prob} must be in [0, 1]")
        if problems:
            raise ValueError("ObjectiveConfig: " + "; ".join(problems))


def drop_condition(cond: Cond, null_cond: Cond, drop: torch.Tensor) -> Cond:
    """Replace the condition of samples where ``drop`` (B,) is True by the null condition."""
    if cond.keys() != null_cond.keys():
        raise ValueError(f"cond keys {sorted(cond)} and null_cond keys {sorted(null_cond)} differ")
    out = {}
    for k, v in cond.items():
        null = null_cond[k].to(v.device)
        if null.shape[0] != v.shape[0]:
            null = null.expand(v.shape[0], *null.shape[1:])
        out[k] = torch.where(drop.view(-1, *([1] * (v.dim() - 1))), null, v)
    return out


def compute_loss(
    model: nn.Module,
    x0: torch.Tensor,
    cond: Cond,
    cfg: ObjectiveConfig,
    *,
    projector: nn.Module | None = None,
    teacher: Teacher | None = None,
    null_cond: Cond,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """Losses of one batch. x0: (B, 3, H, W) in [-1, 1]; cond/null_cond: the model's condition kwargs.

    REPA runs when ``cfg.repa_weight > 0`` and both projector and teacher are given; "repa" is then the
    detached 1 - cos term and "loss" = flow + repa_weight * repa (repa is 0 when off). ``generator`` (on
    x0's device) draws t, the noise and the dropout mask, in that order. Returns {"loss", "flow", "repa"}.
    """
    B, dev = x0.shape[0], x0.device
    if cfg.repa_weight > 0 and (projector is None) != (teacher is None):
        raise ValueError("REPA needs both projector and teacher (or neither, to switch it off)")
    t = sample_timesteps(B, cfg.t_mean, cfg.t_std, cfg.shift, generator=generator, device=dev)  # (B,)
    noise = torch.randn(x0.shape, generator=generator, device=dev, dtype=x0.dtype)  # (B, 3, H, W)
    drop = torch.rand(B, generator=generator, device=dev) < cfg.cond_drop_prob  # (B,)
    c = drop_condition(cond, null_cond, drop)
    x_t = interpolate(x0, noise, t)  # (B, 3, H, W)
    use_repa = cfg.repa_weight > 0 and projector is not None and teacher is not None
    if use_repa:
        args = model.args  # the PixelDiT's ModelArgs: REPA block and patch size
        v, feats = model(x_t, t, return_features_at=args.repa_block, **c)  # (B, 3, H, W), (B, L, D)
        p = args.patch_size
        target = teacher(x0, (x0.shape[2] // p, x0.shape[3] // p))  # (B, L, C) on the same patch grid
        repa = repa_loss(projector(feats), target)
    else:
        v = model(x_t, t, **c)  # (B, 3, H, W)
        repa = torch.zeros((), device=dev)
    flow = flow_matching_loss(v, x0, noise)
    loss = flow + (cfg.repa_weight * repa if use_repa else 0.0)
    return {"loss": loss, "flow": flow.detach(), "repa": repa.detach()}
