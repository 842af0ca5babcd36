"""Release folders: load a trained PixelDiT with no pickle, no deepspeed and no GPU.

    model, config = from_pretrained("releases/pixeldit-t2i")
    images = generate(model, cond, null_cond, noise=noise, **config.sampler.generate_kwargs())

A release folder holds ``config.json`` (``ReleaseConfig``: architecture from the size table, training
resolution and curriculum stage, text encoder and system prompt, sampler defaults), ``model.safetensors``
(or ``model-0000k-of-0000n.safetensors`` shards listed by ``model.safetensors.index.json``, the Hugging Face
layout) and a model card ``README.md``. Weights are read with safetensors only (``safe_load``).
Written by ``pixeldit.train.export.export_release`` (CLI ``pixeldit-release``).
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from pixeldit.diffusion.samplers import SAMPLERS
from pixeldit.models import ModelArgs, PixelDiT, build_model
from pixeldit.models.key_map import RELEASE_FORMAT_VERSION, release_to_model

from .safe_load import SHARD_INDEX, SINGLE_FILE, UnsafeCheckpointError, load_release_weights, safe_load

CONFIG_FILE = "config.json"
WEIGHTS = ("ema", "raw")
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass
class SamplerDefaults:
    """Sampling settings of ``pixeldit.diffusion.generate`` the release recommends (CLI flags override)."""

    sampler: str = "flow_dpm"
    steps: int = 25
    cfg_scale: float = 4.5
    cfg_interval: tuple[float, float] = (0.0, 1.0)  # t range where CFG applies (t = 1 noise)
    shift: float = 1.0  # time-grid shift; the training stage's shift by default

    def __post_init__(self) -> None:
        self.cfg_interval = (float(self.cfg_interval[0]), float(self.cfg_interval[1]))
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler={self.sampler!r}; valid samplers: {', '.join(SAMPLERS)}")
        if self.steps < 1 or self.shift <= 0:
            raise ValueError(f"sampler defaults need steps >= 1 and shift > 0, got steps={self.steps}, "
                             f"shift={self.shift}")
        lo, hi = self.cfg_interval
        if not 0.0 <= lo <= hi <= 1.0:
            raise ValueError(f"cfg_interval={self.cfg_interval} must satisfy 0 <= lo <= hi <= 1")

    def generate_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``pixeldit.diffusion.generate``."""
        return {"sampler": self.sampler, "steps": self.steps, "cfg_scale": self.cfg_scale,
                "cfg_interval": self.cfg_interval, "shift": self.shift}


def default_sampler(args: ModelArgs, shift: float = 1.0) -> SamplerDefaults:
    """The paper's inference defaults: FlowDPM-Solver, 100 steps and CFG 3.25 on t in [0.10, 1.00] for
    class-conditional models; 25 steps for text-to-image (CFG 4.5 everywhere)."""
    if args.conditioning == "class":
        return SamplerDefaults("flow_dpm", 100, 3.25, (0.10, 1.00), shift)
    return SamplerDefaults("flow_dpm", 25, 4.5, (0.0, 1.0), shift)


@dataclass
class ReleaseConfig:
    """Contents of ``config.json``."""

    model_args: dict[str, Any]  # ModelArgs fields (the size table entry plus overrides)
    resolution: int = 256  # base resolution of the training stage the weights come from
    stage: str = ""  # curriculum stage name
    stage_index: int = 0
    step: int = 0  # optimizer steps trained
    weights: str = "ema"  # "ema" (default) or "raw"
    dtype: str = "bf16"  # dtype of the stored tensors: "bf16" or "fp32"
    text_encoder: str = ""  # path/name of the frozen text encoder (text-to-image only)
    system_prompt: str = ""  # prepended to every prompt by the text encoder (as in training)
    sampler: SamplerDefaults = field(default_factory=SamplerDefaults)
    format_version: int = RELEASE_FORMAT_VERSION

    def __post_init__(self) -> None:
        if self.weights not in WEIGHTS:
            raise ValueError(f"weights={self.weights!r}; valid values: {', '.join(WEIGHTS)}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r}; valid values: {', '.join(DTYPES)}")
        self.args()  # validates the architecture arguments

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
        version = d.get("format_version", 0)
        if version > RELEASE_FORMAT_VERSION:
            raise ValueError(f"{path}: release format {version} is newer than this code ({RELEASE_FORMAT_VERSION}); "
                             f"upgrade pixeldit")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"{path}: unknown keys {unknown}; valid keys: {sorted(known)}")
        try:
            return cls(**{**d, "sampler": SamplerDefaults(**d.get("sampler", {}))})
        except (TypeError, ValueError) as err:
            raise ValueError(f"{path}: {err}") from err


def from_pretrained(folder: str | os.PathLike, dtype: torch.dtype = torch.float32,
                    device: str | torch.device = "cpu") -> tuple[PixelDiT, ReleaseConfig]:
    """Build the model from ``config.json`` and load the safetensors weights strictly; returns it in eval mode."""
    config = ReleaseConfig.load(folder)
    model = build_model(config.args())
    state = release_to_model(load_release_weights(folder))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(f"{folder}: the weights do not match the architecture in {CONFIG_FILE}: {err}") from None
    return model.to(device=device, dtype=dtype).eval(), config


__all__ = ["from_pretrained", "ReleaseConfig", "SamplerDefaults", "default_sampler", "safe_load",
           "load_release_weights", "UnsafeCheckpointError", "CONFIG_FILE", "SHARD_INDEX", "SINGLE_FILE", "DTYPES"]
