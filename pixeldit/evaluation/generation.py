"""Generation for an evaluation: load the target, build conditions, sample every (prompt, image) in batches.

The target is a release folder (``config.json``: ``pixeldit.release.from_pretrained``) or a training run /
step folder (its EMA weights: ``pixeldit.release.export.load_training_model``). Images are produced in the
order (prompt 0: images 0..k-1, prompt 1: ...), batch by batch, each from the noise of its own seed
(``EvalProtocol.image_seed``), through ``pixeldit.diffusion.generate``.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from pixeldit.diffusion import generate, to_uint8
from pixeldit.models import PixelDiT
from pixeldit.release import CONFIG_FILE, ReleaseConfig
from pixeldit.release.reader import load_text_encoder
from pixeldit.release.sample import load_any

from .prompts import PromptEntry, PromptSet
from .protocol import EvalProtocol, EvalResources


def load_target(target: str, device: str | torch.device = "cpu") -> tuple[PixelDiT, ReleaseConfig, str, str]:
    """(model in eval mode, its ReleaseConfig, "release" | "checkpoint", the text encoder folder a training run
    used where it exists here, else "") -- ``pixeldit.release.sample.load_any``."""
    model, cfg, trained_with = load_any(target, device)
    return model, cfg, "release" if (Path(target) / CONFIG_FILE).exists() else "checkpoint", trained_with


@dataclass(frozen=True)
class ImageItem:
    prompt_index: int
    image_index: int
    seed: int
    entry: PromptEntry


def image_items(pset: PromptSet, protocol: EvalProtocol) -> list[ImageItem]:
    return [ImageItem(i, j, protocol.image_seed(i, j), e)
            for i, e in enumerate(pset.entries) for j in range(protocol.images_per_prompt)]


class Conditioner:
    """Condition kwargs (and the null condition for guidance) of a batch of prompt entries."""

    def __init__(self, model: PixelDiT, cfg: ReleaseConfig, pset: PromptSet, resources: EvalResources,
                 trained_with: str = ""):
        args = model.args
        if pset.conditioning != args.conditioning:
            raise ValueError(f"{args.name} is a {args.conditioning}-conditional model but the prompt set "
                             f"{pset.kind} ({pset.source}) is for {pset.conditioning}-conditional models")
        self.model, self.encoder = model, None
        if args.conditioning == "class":
            bad = [e.class_id for e in pset.entries if not 0 <= e.class_id < args.num_classes]
            if bad:
                raise ValueError(f"class ids {bad[:5]} outside 0..{args.num_classes - 1} of {args.name}")
            return
        device = next(model.parameters()).device
        self.encoder = load_text_encoder(cfg, resources.text_encoder or trained_with or None, device)

    def __call__(self, entries: list[PromptEntry]) -> tuple[dict, dict]:
        device = next(self.model.parameters()).device
        if self.encoder is None:
            y = torch.tensor([e.class_id for e in entries], device=device)
            return {"y": y}, self.model.null_condition(len(entries), device)
        emb, mask = self.encoder.encode([e.prompt for e in entries])  # (B, T, C), (B, T)
        null_emb, null_mask = self.encoder.encode_null(len(entries))
        return {"context": emb, "context_mask": mask}, {"context": null_emb, "context_mask": null_mask}


@torch.no_grad()
def generate_batches(model: PixelDiT, conditioner: Conditioner, items: list[ImageItem], protocol: EvalProtocol,
                     resources: EvalResources) -> Iterator[tuple[list[ImageItem], np.ndarray]]:
    """Yield (items, uint8 images (B, R, R, 3)) batch by batch; ``protocol`` must be ``resolved``."""
    device = next(model.parameters()).device
    r = protocol.resolution
    kw = {"sampler": protocol.sampler, "steps": protocol.steps, "cfg_scale": protocol.cfg_scale,
          "cfg_interval": protocol.cfg_interval, "shift": protocol.shift}
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if resources.precision == "bf16"
                else contextlib.nullcontext())
    for start in range(0, len(items), resources.batch_size):
        batch = items[start:start + resources.batch_size]
        cond, null = conditioner([it.entry for it in batch])
        noise = torch.stack([torch.randn(3, r, r, generator=torch.Generator().manual_seed(it.seed)) for it in batch])
        with autocast:
            x = generate(model, cond, null, noise=noise.to(device), **kw)  # (B, 3, R, R) in [-1, 1]
        yield batch, to_uint8(x)
