"""REPA: align mid-level patch tokens with a frozen DINOv2 (ViT-B/14) through a small MLP projector.

The teacher (``pixeldit.conditioning.DinoV2Teacher``) gives (B, L, C) patch features of the clean image
on the model's patch grid. The projector maps the model's tokens after patch block ``args.repa_block``
(8 for XL, 6 for T2I) to the teacher width. Loss = 1 - cosine similarity, averaged over tokens and batch;
weight lambda (0.5 by default) in ``objective.py``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class REPAProjector(nn.Module):
    """3-layer MLP Linear(D, W)-SiLU-Linear(W, W)-SiLU-Linear(W, C): (B, L, D) -> (B, L, C_teacher)."""

    def __init__(self, hidden_size: int, teacher_dim: int, width: int = 2048):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(hidden_size, width), nn.SiLU(),
            nn.Linear(width, width), nn.SiLU(),
            nn.Linear(width, teacher_dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # (B, L, C_teacher)


def repa_loss(projected: torch.Tensor, teacher_feats: torch.Tensor) -> torch.Tensor:
    """1 - cosine similarity, mean over tokens and batch. projected / teacher_feats: (B, L, C) -> scalar."""
    if projected.shape != teacher_feats.shape:
        raise ValueError(f"REPA: projected tokens {tuple(projected.shape)} vs teacher features "
                         f"{tuple(teacher_feats.shape)}: the projector's output width must be the teacher's "
                         "hidden size and both grids the model's patch grid")
    return 1 - F.cosine_similarity(projected.float(), teacher_feats.float(), dim=-1).mean()
