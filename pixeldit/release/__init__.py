"""Release folders: load a trained PixelDiT with no pickle, no deepspeed and no GPU.

    model, config = from_pretrained("releases/pixeldit-t2i")

A release folder holds ``config.json`` (architecture, training resolution / stage, text encoder, system
prompt, sampler defaults), ``model.safetensors`` (or ``model-0000k-of-0000n.safetensors`` shards and
``model.safetensors.index.json``) and a model card ``README.md``.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from pixeldit.models import ModelArgs, PixelDiT, build_model
from pixeldit.models.key_map import RELEASE_FORMAT_VERSION, release_to_model

from .safe_load import UnsafeCheckpointError, load_release_weights, safe_load

CONFIG_FILE = "config.json"


@dataclass
class SamplerDefaults:
    sampler: str = "flow_dpm"
    steps: int = 25
    cfg_scale: float = 4.5
    cfg_interval: tuple[float, float] = (0.0, 1.0)
    shift: float | None = 1.0  # None: take the training stage's shift when exporting


@dataclass
class ReleaseConfig:
    model_args: dict[str, Any]
    resolution: int = 256
    stage: str = ""
    step: int = 0
    weights: str = "ema"  # "ema" or "raw"
    dtype: str = "bf16"
    text_encoder: str = ""
    system_prompt: str = ""
    sampler: SamplerDefaults = field(default_factory=SamplerDefaults)
    format_version: int = RELEASE_FORMAT_VERSION

    def args(self) -> ModelArgs:
        return ModelArgs.from_dict(self.model_args)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def load(cls, folder: str | os.PathLike) -> "ReleaseConfig":
        path = Path(folder) / CONFIG_FILE
        if not path.exists():
            raise FileNotFoundError(f"{path} not found: not a PixelDiT release folder (make one with pixeldit-release)")
        d = json.loads(path.read_text())
        if d.get("format_version", 0) > RELEASE_FORMAT_VERSION:
            raise ValueError(f"{path}: release format {d['format_version']} is newer than this code "
                             f"({RELEASE_FORMAT_VERSION}); upgrade pixeldit")
        sampler = d.pop("sampler", {})
        if "cfg_interval" in sampler:
            sampler["cfg_interval"] = tuple(sampler["cfg_interval"])
        return cls(**d, sampler=SamplerDefaults(**sampler))


def from_pretrained(folder: str | os.PathLike, dtype: torch.dtype = torch.float32,
                    device: str | torch.device = "cpu") -> tuple[PixelDiT, ReleaseConfig]:
    """Build the model from ``config.json`` and load the safetensors weights strictly."""
    config = ReleaseConfig.load(folder)
    model = build_model(config.args())
    state = release_to_model(load_release_weights(folder))
    model.load_state_dict(state, strict=True)
    return model.to(device=device, dtype=dtype).eval(), config


__all__ = ["from_pretrained", "ReleaseConfig", "SamplerDefaults", "safe_load", "load_release_weights",
           "UnsafeCheckpointError", "CONFIG_FILE"]
