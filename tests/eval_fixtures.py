"""Tiny random-weight extractors saved in their real on-disk formats, loaded back by the real loaders.

- Inception: a TorchScript module with clean-fid's interface (``layers`` submodule, ``forward(x,
  return_features)``) saved as ``inception-2015-12-05.pt``, the file clean-fid's ``InceptionV3W`` opens.
- DINOv2: a 1-layer transformers ``Dinov2Model`` folder (``diffusion_fixtures.save_tiny_dinov2``).
- CLIP: a 1-layer transformers ``CLIPModel`` with MiniLM's WordPiece tokenizer ([SEP] as end token).
Plus small fixture files in the official GenEval / DPG-Bench formats (made-up prompts).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from diffusion_fixtures import minilm_dir, save_tiny_dinov2  # noqa: F401 (re-exported)

# made-up prompts in GenEval's evaluation_metadata.jsonl format (the official file is the user's copy)
GENEVAL_LINES = [
    {"tag": "single_object", "include": [{"class": "bench", "count": 1}], "prompt": "a photo of a bench"},
    {"tag": "colors", "include": [{"class": "cat", "count": 1, "color": "red"}], "prompt": "a photo of a red cat"},
]


class TinyInception(torch.nn.Module):
    """clean-fid's TorchScript Inception interface: ``layers((x - 128) / 128)`` -> (B, 2048, 1, 1)."""

    def __init__(self):
        super().__init__()
        self.layers = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 13, stride=13), torch.nn.Tanh(),
                                          torch.nn.AdaptiveAvgPool2d(1), torch.nn.Conv2d(8, 2048, 1))

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        return self.layers((x - 128) / 128)


def save_tiny_inception(folder: Path, seed: int = 0) -> Path:
    """Returns the saved ``inception-2015-12-05.pt``."""
    from pixeldit.evaluation.extractors import INCEPTION_FILE

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    path = folder / INCEPTION_FILE
    torch.jit.script(TinyInception().eval()).save(str(path))
    return path


def save_tiny_clip(path: Path) -> Path:
    from transformers import AutoTokenizer, CLIPConfig, CLIPModel

    tok = AutoTokenizer.from_pretrained(minilm_dir())
    cfg = CLIPConfig(
        text_config=dict(vocab_size=tok.vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=32, pad_token_id=tok.pad_token_id,
                         bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=8)
    torch.manual_seed(0)
    CLIPModel(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def write_geneval_metadata(path: Path) -> Path:
    path.write_text("".join(json.dumps(line) + "\n" for line in GENEVAL_LINES))
    return path


def write_dpg_prompts(folder: Path) -> Path:
    """DPG-Bench's prompts/{item_id}.txt, the same prompts as the GenEval fixture (ids sort in that order)."""
    (folder / "prompts").mkdir(parents=True, exist_ok=True)
    for item_id, line in zip(("item_a", "item_b"), GENEVAL_LINES):
        (folder / "prompts" / f"{item_id}.txt").write_text(line["prompt"] + "\n")
    return folder


def write_image_folder(folder: Path, n: int, size: int = 40, seed: int = 0) -> Path:
    """``n`` smooth random RGB images (PNG and JPEG) in a nested folder."""
    rng = np.random.default_rng(seed)
    (folder / "sub").mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:size, 0:size]
    for i in range(n):
        base = rng.integers(0, 256, size=3)
        arr = (base + 80 * np.sin(xx[..., None] / (2 + i % 5) + yy[..., None] / 5 + rng.random(3))) % 256
        name = folder / ("sub" if i % 2 else "") / (f"{i:03d}.png" if i % 3 else f"{i:03d}.jpg")
        Image.fromarray(arr.astype(np.uint8)).save(name)
    return folder
