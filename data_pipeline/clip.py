"""The project's one CLIP loader (score stage and evaluation) and the aesthetic head, from local files only.

``ClipEmbedder``: a transformers ``CLIPModel`` folder (config.json, weights, tokenizer) -> unit-norm image and
text embeddings. Images: the shorter side resized to the model's image size (bicubic, antialiased, in float,
no quantisation), centre-cropped, normalised with the folder's ``preprocessor_config.json`` mean/std (OpenAI's
if absent); texts: the folder's tokenizer, truncated to the text model's positions.

Why transformers and not open_clip: ``open_clip/__init__.py`` imports ``open_clip.factory`` -> ``transform``,
which imports torchvision at import time, and every submodule import (``open_clip.model`` included) runs that
``__init__`` first; the torchvision that pip resolves for the pinned torch build cannot be imported next to it.
Loading open_clip's modules without their package would mean faking ``sys.modules`` entries. OpenAI CLIP and
the LAION / DataComp open_clip ViT checkpoints are published in (or convert to) the transformers CLIP layout,
which loads here with no torchvision and no download.

``AestheticHead``: LAION's improved aesthetic predictor shape, a stack of Linear layers ending in one output,
applied to the unit-norm CLIP image embedding (for ViT-L/14: 768 -> 1024 -> 128 -> 64 -> 16 -> 1, no
activations; its dropouts do nothing at inference). Weights: a safetensors file with tensors
``layers.{i}.weight`` / ``layers.{i}.bias``, applied in increasing ``i`` -- exactly the keys of LAION's
``sac+logos+ava1-l14-linearMSE.pth`` state dict, so that file converts with
``safetensors.torch.save_file(torch.load(pth, weights_only=True), "aesthetic.safetensors")``.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_LAYER_KEY = re.compile(r"layers\.(\d+)\.(weight|bias)")


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


def to_float_images(images: np.ndarray, device: torch.device) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float32 in [0, 1] on ``device``."""
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected uint8 images (B, H, W, 3), got {images.dtype} {images.shape}")
    pixels = np.require(images, requirements=("C", "W"))  # torch wants writable memory (PIL's arrays are read-only)
    return torch.from_numpy(pixels).to(device).permute(0, 3, 1, 2).float() / 255.0


class ClipEmbedder:
    """Unit-norm CLIP image / text embeddings from a local transformers CLIP folder (module docstring).

    ``dim``: the projection size; ``size``: the square input side; ``fingerprint``: weights + preprocessing.
    """

    name = "clip"

    def __init__(self, path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
        if not path or not os.path.isdir(path):
            raise FileNotFoundError(f"CLIP folder {str(path)!r} not found: pass a local transformers CLIPModel folder "
                                    "(config.json, weights, tokenizer; e.g. an openai/clip-vit-large-patch14 snapshot)")
        from transformers import AutoConfig, AutoTokenizer, CLIPModel

        config = AutoConfig.from_pretrained(path, local_files_only=True)
        if config.model_type != "clip":
            raise ValueError(f"{path}/config.json: model_type {config.model_type!r} is not a CLIP model ('clip')")
        self.device = torch.device(device)
        self.dtype = dtype or torch.float32
        self.model = CLIPModel.from_pretrained(path, local_files_only=True).to(self.device, self.dtype).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.size = int(config.vision_config.image_size)
        self.dim = int(config.projection_dim)
        self.max_tokens = int(config.text_config.max_position_embeddings)
        mean, std = OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
        pre = Path(path) / "preprocessor_config.json"
        if pre.exists():
            d = json.loads(pre.read_text())
            mean, std = tuple(d.get("image_mean", mean)), tuple(d.get("image_std", std))
        self.mean = torch.tensor(mean, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=self.device).view(1, 3, 1, 1)
        self.fingerprint = f"{self.name}-{weights_fingerprint(path, f'short-side bicubic-aa {self.size} crop')}"

    def pixels(self, images: np.ndarray | Sequence[np.ndarray]) -> torch.Tensor:
        """uint8 images, a (B, H, W, 3) array or a list of (H, W, 3) of any sizes -> (B, 3, S, S) normalised."""
        if isinstance(images, np.ndarray) and images.ndim == 4:
            groups = [images]
        else:
            groups = [np.asarray(im)[None] for im in images]
        out = []
        for group in groups:  # one resize per distinct size
            x = to_float_images(group, self.device)  # (b, 3, H, W)
            h, w = x.shape[2:]
            scale = self.size / min(h, w)
            nh, nw = max(self.size, round(h * scale)), max(self.size, round(w * scale))
            x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True)
            top, left = (nh - self.size) // 2, (nw - self.size) // 2
            out.append(x[:, :, top:top + self.size, left:left + self.size].clamp(0, 1))  # (b, 3, S, S)
        return (torch.cat(out) - self.mean) / self.std

    @torch.no_grad()
    def image_embeddings(self, images: np.ndarray | Sequence[np.ndarray]) -> torch.Tensor:
        """uint8 images -> (B, E) float32 unit-norm embeddings on the CPU."""
        emb = self.model.get_image_features(pixel_values=self.pixels(images).to(self.dtype))
        return F.normalize(getattr(emb, "pooler_output", emb).float(), dim=-1).cpu()  # (B, E)

    @torch.no_grad()
    def text_embeddings(self, texts: Sequence[str]) -> torch.Tensor:
        """B texts -> (B, E) float32 unit-norm embeddings on the CPU."""
        tokens = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_tokens,
                                return_tensors="pt").to(self.device)
        emb = self.model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
        return F.normalize(getattr(emb, "pooler_output", emb).float(), dim=-1).cpu()  # (B, E)


class AestheticHead(torch.nn.Module):
    """A Linear stack to one output on unit-norm CLIP image embeddings (module docstring)."""

    def __init__(self, dims: Sequence[int]):
        super().__init__()
        if len(dims) < 2 or dims[-1] != 1:
            raise ValueError(f"aesthetic head dims {list(dims)}: need an input size and a last size of 1")
        self.layers = torch.nn.ModuleList(torch.nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.fingerprint = ""

    @classmethod
    def from_file(cls, path: str | os.PathLike, embed_dim: int) -> AestheticHead:
        """Load ``layers.{i}.weight/bias`` tensors from a safetensors file; the input size must be ``embed_dim``."""
        from safetensors.torch import load_file

        if not os.path.isfile(path):
            raise FileNotFoundError(f"aesthetic head {str(path)!r} not found: pass a safetensors file with "
                                    "layers.{i}.weight / layers.{i}.bias tensors")
        state = load_file(str(path))
        layers: dict[int, dict[str, torch.Tensor]] = {}
        for name, tensor in state.items():
            m = _LAYER_KEY.fullmatch(name)
            if m is None:
                raise ValueError(f"{path}: tensor {name!r} is not layers.{{i}}.weight / layers.{{i}}.bias")
            layers.setdefault(int(m.group(1)), {})[m.group(2)] = tensor
        order = sorted(layers)
        for i in order:
            if set(layers[i]) != {"weight", "bias"} or layers[i]["weight"].ndim != 2:
                raise ValueError(f"{path}: layers.{i} needs a 2-d weight and a bias")
        if not order:
            raise ValueError(f"{path}: no layers.{{i}}.weight tensors")
        dims = [int(layers[order[0]]["weight"].shape[1])] + [int(layers[i]["weight"].shape[0]) for i in order]
        for i, j in zip(order[:-1], order[1:]):
            if layers[j]["weight"].shape[1] != layers[i]["weight"].shape[0]:
                raise ValueError(f"{path}: layers.{j} takes {layers[j]['weight'].shape[1]} inputs but layers.{i} "
                                 f"gives {layers[i]['weight'].shape[0]}")
        if dims[0] != embed_dim or dims[-1] != 1:
            raise ValueError(f"{path}: a head {dims[0]} -> {dims[-1]}, need {embed_dim} -> 1 (the CLIP embedding size "
                             "to one score)")
        head = cls(dims)
        for lin, i in zip(head.layers, order):
            lin.weight.data.copy_(layers[i]["weight"].float())
            lin.bias.data.copy_(layers[i]["bias"].float())
        head.fingerprint = f"aesthetic-{weights_fingerprint(path, 'linear-stack unit-norm-input')}"
        return head.eval()

    @torch.no_grad()
    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        """(B, E) unit-norm image embeddings -> (B,) scores."""
        x = embeddings.float()
        for lin in self.layers:
            x = lin(x)  # (B, d_i)
        return x[:, 0]
