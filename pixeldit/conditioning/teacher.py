"""The frozen DINOv2 teacher of REPA: patch features of the clean image on the model's patch grid.

The teacher resizes the clean image so its 14-px patch grid equals the model's 16-px patch grid, per
axis (224 at 256, 448 at 512; non-square images too), normalises it like ImageNet, and returns the
final (layer-normed) patch tokens: no CLS, no register tokens. The projector and the loss that use these
features are in ``pixeldit.diffusion.repa``.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DINOV2_MODEL_TYPES = ("dinov2", "dinov2_with_registers")


class DinoV2Teacher(nn.Module):
    """Frozen DINOv2 feature extractor on the model's patch grid.

    ``teacher(x0, grid=None) -> (B, rows * cols, C)``; x0 (B, 3, H, W) in [-1, 1]; grid defaults to
    (H // model_patch, W // model_patch), i.e. the PixelDiT's 16-px patch grid.
    """

    def __init__(self, backbone: nn.Module, model_patch: int = 16):
        super().__init__()
        self.backbone = backbone.eval().requires_grad_(False)
        cfg = backbone.config
        self.patch = int(cfg.patch_size)
        self.model_patch = int(model_patch)
        self.num_registers = int(getattr(cfg, "num_register_tokens", 0) or 0)
        self.dim = int(cfg.hidden_size)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, dtype: torch.dtype = torch.float32,
                        model_patch: int = 16) -> "DinoV2Teacher":
        """Load a transformers DINOv2 (``Dinov2Model``, or the with-registers variant) from a local folder.

        Never downloads: ``path`` must be a folder with config.json and weights (``save_pretrained``).
        """
        if not path or not os.path.isdir(path):
            raise FileNotFoundError(
                f"DINOv2 teacher folder {str(path)!r} not found: set conditioning.repa_teacher to a local folder "
                "holding a transformers Dinov2Model (config.json + weights, e.g. a facebook/dinov2-base snapshot), "
                "or turn REPA off in every stage")
        from transformers import AutoConfig, AutoModel

        config = AutoConfig.from_pretrained(path, local_files_only=True)
        if config.model_type not in DINOV2_MODEL_TYPES:
            raise ValueError(f"{path}/config.json: model_type {config.model_type!r} is not a DINOv2 "
                             f"({', '.join(DINOV2_MODEL_TYPES)})")
        return cls(AutoModel.from_pretrained(path, dtype=dtype, local_files_only=True), model_patch=model_patch)

    @torch.no_grad()
    def forward(self, x0: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        """x0: (B, 3, H, W) in [-1, 1]; grid: (rows, cols) of the model's patch grid -> (B, rows*cols, C) float32."""
        if grid is None:
            grid = (x0.shape[2] // self.model_patch, x0.shape[3] // self.model_patch)
        gh, gw = grid
        size = (gh * self.patch, gw * self.patch)  # 224 x 224 for a 256 x 256 image
        x = x0.float()
        if tuple(x.shape[2:]) != size:
            x = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True)  # (B, 3, 14gh, 14gw)
        x = ((x + 1) / 2 - self.mean) / self.std  # [-1, 1] -> ImageNet normalisation
        dtype = next(self.backbone.parameters()).dtype
        out = self.backbone(pixel_values=x.to(dtype)).last_hidden_state  # (B, 1 + R + gh*gw, C)
        return out[:, 1 + self.num_registers:].float()  # (B, gh*gw, C): patch tokens only
