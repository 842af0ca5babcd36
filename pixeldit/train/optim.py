"""Optimizer and learning-rate schedule.

``build_optimizer`` makes AdamW or CAME (``pixeldit.train.came``) over the trainable parameters (model + REPA
projector); DeepSpeed wraps it (ZeRO partitions its states; CAME is then told its partitions' layout by
``came.bind_zero``). ``LRSchedule`` is a pure function of the step inside a stage: linear
warmup over ``warmup_steps``, then constant or cosine down to ``lr * min_lr_ratio``. Because it has no
hidden state, a resumed run gets exactly the same LR; the trainer writes it into the parameter groups
before every optimizer step (``apply``), and its ``state_dict`` goes into the checkpoint for reference.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from .came import CAME
from .config import OptimConfig, StageConfig


def build_optimizer(module: nn.Module, cfg: OptimConfig, lr: float, device_type: str = "cpu") -> torch.optim.Optimizer:
    """AdamW or CAME over ``module``'s trainable parameters.

    Weight decay (if any) applies to matrices only; biases, norms and embeddings' 1-D parameters are not
    decayed. AdamW: ``optim.fused`` (default: on when ``device_type`` is cuda) selects torch's fused kernel (one
    kernel over every tensor of a group) instead of the foreach kernels; DeepSpeed's ZeRO optimizers call it on
    their fp32 partitions, which live on the device (on the CPU with ZeRO-3 offload, where torch has a fused
    kernel too).
    """
    if cfg.name not in ("adamw", "came"):
        raise ValueError(f"optim.name={cfg.name!r}; valid values: adamw, came")
    decay, no_decay = [], []
    for _, p in module.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    if cfg.name == "came":
        names = {id(p): n for n, p in module.named_parameters()}
        return CAME(groups, lr=lr, betas=cfg.came.betas, eps=cfg.came.eps, clip_threshold=cfg.came.clip_threshold,
                    names=names)
    fused = (device_type == "cuda") if cfg.fused is None else cfg.fused
    return torch.optim.AdamW(groups, lr=lr, betas=cfg.betas, eps=cfg.eps, fused=fused or None)


@dataclass(frozen=True)
class LRSchedule:
    """LR of optimizer step ``i`` (0-based, counted from the start of the stage)."""

    lr: float
    steps: int
    warmup_steps: int = 0
    schedule: str = "constant"
    min_lr_ratio: float = 0.0

    def __post_init__(self) -> None:
        if self.schedule not in ("constant", "cosine"):
            raise ValueError(f"schedule={self.schedule!r}; valid values: constant, cosine")

    @classmethod
    def for_stage(cls, stage: StageConfig) -> "LRSchedule":
        return cls(stage.lr, stage.steps, stage.warmup_steps, stage.schedule, stage.min_lr_ratio)

    def lr_at(self, i: int) -> float:
        if i < self.warmup_steps:
            return self.lr * (i + 1) / self.warmup_steps
        if self.schedule == "constant":
            return self.lr
        decay_steps = max(1, self.steps - self.warmup_steps)
        progress = min(1.0, (i - self.warmup_steps) / decay_steps)
        floor = self.lr * self.min_lr_ratio
        return floor + (self.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def apply(self, optimizer: torch.optim.Optimizer, i: int) -> float:
        """Set the LR of step ``i`` on every parameter group; returns it."""
        lr = self.lr_at(i)
        for group in optimizer.param_groups:
            group["lr"] = lr
        return lr

    def state_dict(self) -> dict:
        return asdict(self)
