"""Feature extractors of the metrics, each loaded from local weights only (never a download).

Every extractor takes uint8 images ``(B, H, W, 3)`` (exactly what the PNGs hold) and has a ``fingerprint``:
the SHA-256 of its weight files plus its preprocessing, so cached reference statistics are reused only
with the very extractor that made them.

- ``InceptionExtractor`` (FID): clean-fid's Inception-v3 (``cleanfid.inception_torchscript.InceptionV3W``,
  the TensorFlow FID weights as the TorchScript file ``inception-2015-12-05.pt``) with clean-fid's "clean"
  preprocessing (``cleanfid.resize``: PIL bicubic to 299 x 299 per channel in float, no quantisation);
  pool3 features (2048). Only these two clean-fid modules are imported: they need torch, numpy and PIL
  only (clean-fid's package metadata asks for torchvision, which this torch build cannot import, so it is
  installed with ``--no-deps``). torch-fidelity was rejected: its package ``__init__`` imports torchvision
  and it loads weights with ``torch.load(weights_only=False)``.
- ``DinoV2Extractor`` (FD-DINOv2, Stein et al. 2023): the DINOv2 of REPA's loader
  (``DinoV2Teacher.from_pretrained``: a local transformers folder), images resized bicubic (antialiased)
  to 224 x 224, ImageNet normalisation, the layer-normed CLS token (``pooler_output``; 1024 for ViT-L/14).
- ``ClipScorer`` (CLIP score, Hessel et al. 2021 as torchmetrics defines it: 100 * max(cos(image, text), 0)
  averaged over images): the project's one CLIP loader, ``data_pipeline.clip.ClipEmbedder`` (a local
  transformers ``CLIPModel`` folder, e.g. an openai/clip-vit-large-patch14 snapshot, with its tokenizer;
  images resized (shorter side) and centre-cropped to the model's image size, normalised with the folder's
  ``preprocessor_config.json`` mean/std). The data pipeline's score stage embeds with the same class. open_clip
  was rejected: its package imports torchvision at import time (data_pipeline/clip.py says more).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from data_pipeline.clip import ClipEmbedder, to_float_images, weights_fingerprint

INCEPTION_FILE = "inception-2015-12-05.pt"  # the name clean-fid's loader opens inside a folder
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class InceptionExtractor:
    """FID's Inception-v3 pool3 features through clean-fid (module docstring). ``path``: the .pt file or its folder."""

    name = "inception_v3"
    dim = 2048

    def __init__(self, path: str | os.PathLike, device: str | torch.device = "cpu"):
        p = Path(path)
        folder = p.parent if p.is_file() else p
        if p.is_file() and p.name != INCEPTION_FILE or not (folder / INCEPTION_FILE).is_file():
            raise FileNotFoundError(f"Inception weights {str(path)!r}: expected the file {INCEPTION_FILE} (the "
                                    f"TorchScript FID Inception clean-fid uses) or a folder holding it")
        try:
            from cleanfid.inception_torchscript import InceptionV3W
            from cleanfid.resize import make_resizer
        except ModuleNotFoundError as err:
            raise ModuleNotFoundError(f"FID needs clean-fid ({err}): pip install --no-deps clean-fid==0.1.35 "
                                      "(tools/setup.sh does)") from None

        self.device = torch.device(device)
        self.model = InceptionV3W(str(folder), download=False, resize_inside=False).to(self.device).eval()
        self.resize = make_resizer("PIL", False, "bicubic", (299, 299))  # clean-fid "clean" mode
        self.fingerprint = f"{self.name}-{weights_fingerprint(folder / INCEPTION_FILE, 'clean-fid clean 299')}"

    @torch.no_grad()
    def features(self, images: np.ndarray) -> np.ndarray:
        """(B, H, W, 3) uint8 -> (B, 2048) float64."""
        if images.dtype != np.uint8:
            raise ValueError(f"expected uint8 images, got {images.dtype}")
        batch = np.stack([self.resize(img) for img in images]).transpose(0, 3, 1, 2)  # (B, 3, 299, 299) in [0, 255]
        return self.model(torch.from_numpy(batch).to(self.device)).double().cpu().numpy()


class DinoV2Extractor:
    """FD-DINOv2 features: the CLS token of REPA's DINOv2 loader at 224 x 224 (module docstring)."""

    name = "dinov2"
    size = 224

    def __init__(self, path: str | os.PathLike, device: str | torch.device = "cpu"):
        from pixeldit.conditioning import DinoV2Teacher

        self.device = torch.device(device)
        self.backbone = DinoV2Teacher.from_pretrained(path).backbone.to(self.device).eval()
        self.dim = int(self.backbone.config.hidden_size)
        self.mean = torch.tensor(IMAGENET_MEAN, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD, device=self.device).view(1, 3, 1, 1)
        self.fingerprint = f"{self.name}-{weights_fingerprint(path, 'bicubic-aa 224 imagenet-norm cls')}"

    @torch.no_grad()
    def features(self, images: np.ndarray) -> np.ndarray:
        """(B, H, W, 3) uint8 -> (B, C) float64."""
        x = to_float_images(images, self.device)
        x = F.interpolate(x, size=(self.size, self.size), mode="bicubic", align_corners=False, antialias=True)
        x = (x.clamp(0, 1) - self.mean) / self.std
        return self.backbone(pixel_values=x).pooler_output.double().cpu().numpy()  # (B, C) layer-normed CLS


class ClipScorer:
    """CLIP score of images against their prompts: the project's CLIP loader (``data_pipeline.clip.ClipEmbedder``,
    also used by the data score stage) and 100 * max(cos, 0) (module docstring)."""

    name = "clip"

    def __init__(self, path: str | os.PathLike, device: str | torch.device = "cpu"):
        self.embedder = ClipEmbedder(path, device)
        self.fingerprint = self.embedder.fingerprint

    def scores(self, images: np.ndarray, prompts: list[str]) -> np.ndarray:
        """(B, H, W, 3) uint8 and B prompts -> (B,) float64: 100 * max(cos(image, text), 0)."""
        if len(prompts) != len(images):
            raise ValueError(f"CLIP score: {len(images)} images but {len(prompts)} prompts")
        cos = (self.embedder.image_embeddings(images) * self.embedder.text_embeddings(prompts)).sum(-1)  # (B,)
        return (100.0 * cos.clamp(min=0)).double().numpy()
