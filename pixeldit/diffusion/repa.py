"""REPA: align mid-level patch tokens with a frozen DINOv2 (ViT-B/14) via a small MLP projector.

The teacher resizes the clean image so its 14-px patch grid equals the model's 16-px patch grid
(224 at 256, 448 at 512; per axis, so non-square images work) and returns its patch tokens (no CLS, no
register tokens). Loss = 1 - cosine similarity between projected model tokens and teacher tokens,
averaged over tokens and batch.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class REPAProjector(nn.Module):
    """3-layer MLP: (B, L, D) model tokens -> (B, L, C_teacher)."""

    def __init__(self, hidden_size: int, teacher_dim: int, width: int = 2048):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(hidden_size, width), nn.SiLU(),
            nn.Linear(width, width), nn.SiLU(),
            nn.Linear(width, teacher_dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # (B, L, C_teacher)


class DinoV2Teacher(nn.Module):
    """Frozen DINOv2 feature extractor on the model's patch grid."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone.eval().requires_grad_(False)
        cfg = backbone.config
        self.patch = int(cfg.patch_size)
        self.num_registers = int(getattr(cfg, "num_register_tokens", 0) or 0)
        self.dim = int(cfg.hidden_size)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> "DinoV2Teacher":
        """Load ``transformers.Dinov2Model`` from a local folder (never downloads)."""
        if not path or not os.path.isdir(path):
            raise FileNotFoundError(
                f"DINOv2 teacher folder {path!r} not found: set conditioning.repa_teacher to a local folder "
                "holding a transformers Dinov2Model (config.json + weights), or turn REPA off in every stage")
        from transformers import Dinov2Model

        return cls(Dinov2Model.from_pretrained(path, torch_dtype=dtype, local_files_only=True))

    @torch.no_grad()
    def forward(self, x0: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """x0: (B, 3, H, W) in [-1, 1]; grid: (rows, cols) of the model's patch grid -> (B, rows*cols, C)."""
        gh, gw = grid
        x = F.interpolate(x0.float(), size=(gh * self.patch, gw * self.patch), mode="bicubic", align_corners=False)
        x = ((x + 1) / 2 - self.mean) / self.std  # ImageNet normalisation
        dtype = next(self.backbone.parameters()).dtype
        out = self.backbone(pixel_values=x.to(dtype)).last_hidden_state  # (B, 1 + R + gh*gw, C)
        return out[:, 1 + self.num_registers:].float()  # (B, gh*gw, C)


def repa_loss(projected: torch.Tensor, teacher_feats: torch.Tensor) -> torch.Tensor:
    """1 - cosine similarity, mean over tokens and batch. projected/teacher_feats: (B, L, C)."""
    if projected.shape != teacher_feats.shape:
        raise ValueError(f"REPA: projected tokens {tuple(projected.shape)} vs teacher {tuple(teacher_feats.shape)}")
    return 1 - F.cosine_similarity(projected.float(), teacher_feats.float(), dim=-1).mean()
