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
  averaged over images): a transformers ``CLIPModel`` folder (e.g. an openai/clip-vit-large-patch14
  snapshot) with its tokenizer; images resized (shorter side) and centre-cropped to the model's image
  size, normalised with the folder's ``preprocessor_config.json`` mean/std (OpenAI's if absent). open_clip
  was rejected: its model code imports torchvision at import time.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

INCEPTION_FILE = "inception-2015-12-05.pt"  # the name clean-fid's loader opens inside a folder
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def weights_fingerprint(path: str | os.PathLike, preprocessing: str) -> str:
    """SHA-256 over the file (or every file of the folder, sorted, names included) and a preprocessing tag."""
    p = Path(path)
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith("."))
    h = hashlib.sha256(preprocessing.encode())
    for f in files:
        h.update(str(f.relative_to(p) if f != p else f.name).encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:20]


def _to_float(images: np.ndarray, device: torch.device) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float32 in [0, 1] on ``device``."""
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected uint8 images (B, H, W, 3), got {images.dtype} {images.shape}")
    return torch.from_numpy(np.ascontiguousarray(images)).to(device).permute(0, 3, 1, 2).float() / 255.0


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
        x = _to_float(images, self.device)
        x = F.interpolate(x, size=(self.size, self.size), mode="bicubic", align_corners=False, antialias=True)
        x = (x.clamp(0, 1) - self.mean) / self.std
        return self.backbone(pixel_values=x).pooler_output.double().cpu().numpy()  # (B, C) layer-normed CLS


class ClipScorer:
    """CLIP score of images against their prompts with a local transformers CLIP (module docstring)."""

    name = "clip"

    def __init__(self, path: str | os.PathLike, device: str | torch.device = "cpu"):
        if not path or not os.path.isdir(path):
            raise FileNotFoundError(f"CLIP folder {str(path)!r} not found: pass a local transformers CLIPModel folder "
                                    "(config.json, weights, tokenizer; e.g. an openai/clip-vit-large-patch14 snapshot)")
        from transformers import AutoConfig, AutoTokenizer, CLIPModel

        config = AutoConfig.from_pretrained(path, local_files_only=True)
        if config.model_type != "clip":
            raise ValueError(f"{path}/config.json: model_type {config.model_type!r} is not a CLIP model ('clip')")
        self.device = torch.device(device)
        self.model = CLIPModel.from_pretrained(path, local_files_only=True).to(self.device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.size = int(config.vision_config.image_size)
        self.max_tokens = int(config.text_config.max_position_embeddings)
        mean, std = OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
        pre = Path(path) / "preprocessor_config.json"
        if pre.exists():
            d = json.loads(pre.read_text())
            mean, std = tuple(d.get("image_mean", mean)), tuple(d.get("image_std", std))
        self.mean = torch.tensor(mean, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=self.device).view(1, 3, 1, 1)
        self.fingerprint = f"{self.name}-{weights_fingerprint(path, f'short-side bicubic-aa {self.size} crop')}"

    def _pixels(self, images: np.ndarray) -> torch.Tensor:
        x = _to_float(images, self.device)  # (B, 3, H, W)
        h, w = x.shape[2:]
        scale = self.size / min(h, w)
        nh, nw = max(self.size, round(h * scale)), max(self.size, round(w * scale))
        x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True)
        top, left = (nh - self.size) // 2, (nw - self.size) // 2
        x = x[:, :, top:top + self.size, left:left + self.size].clamp(0, 1)  # (B, 3, S, S)
        return (x - self.mean) / self.std

    @torch.no_grad()
    def scores(self, images: np.ndarray, prompts: list[str]) -> np.ndarray:
        """(B, H, W, 3) uint8 and B prompts -> (B,) float64: 100 * max(cos(image, text), 0)."""
        if len(prompts) != len(images):
            raise ValueError(f"CLIP score: {len(images)} images but {len(prompts)} prompts")
        tokens = self.tokenizer(list(prompts), padding=True, truncation=True, max_length=self.max_tokens,
                                return_tensors="pt").to(self.device)
        img = self.model.get_image_features(pixel_values=self._pixels(images))  # (B, E)
        txt = self.model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
        img, txt = (getattr(o, "pooler_output", o) for o in (img, txt))  # tensors (transformers returns either)
        cos = F.cosine_similarity(img.float(), txt.float(), dim=-1)
        return (100.0 * cos.clamp(min=0)).double().cpu().numpy()
