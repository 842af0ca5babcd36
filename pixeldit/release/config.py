"""``config.json`` of a release folder: ``ReleaseConfig``, its sampler defaults, and the weight / dtype choices.

The one definition of each: ``WEIGHTS`` (which weights a release holds), ``DTYPES`` (how they are stored),
the sampler defaults (``SamplerDefaults``, ``default_sampler``); ``pixeldit-release`` and ``pixeldit-sample``
take their argparse choices and defaults from here.

The text encoder is recorded by NAME (a Hugging Face id such as ``google/gemma-2-2b-it``, or the name of the
folder it was loaded from), never as a local path; ``pixeldit.release.load_text_encoder`` finds it at load
time (an explicit local folder, else the Hugging Face cache). Releases written before this rule hold an
absolute path, which still loads where that folder exists.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import torch

from pixeldit.diffusion.samplers import SAMPLERS
from pixeldit.errors import CheckpointError, ConfigError
from pixeldit.models import MODEL_SIZES, ModelArgs

from .key_map import RELEASE_FORMAT_VERSION

CONFIG_FILE = "config.json"
Weights = Literal["ema", "raw"]
WEIGHTS: tuple[str, ...] = get_args(Weights)
DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp32": torch.float32}
DEFAULT_WEIGHTS: Weights = "ema"
DEFAULT_DTYPE = "bf16"
# The paper's CFG interval for class-conditional models, in OUR time (t = 1 noise, pixeldit.diffusion.flow).
# The official sampler (c2i/src/diffusion.py, FlowDPMSolverSampler) runs its own time from noise at 0 to data
# at 1 and guides when guidance_interval_min < t < guidance_interval_max, i.e. 0.1 < t_official < 1.0 for the
# published [0.1, 1.0]: t_ours = 1 - t_official in (0.0, 0.9). Guidance is off over the first 10% of the
# trajectory from noise and on until the end. (The boundary step at t = 0.9 exactly is guided here, not in the
# official sampler: our interval is closed, theirs open.) The 320-epoch checkpoint's [0.1, 0.9] maps to itself.
CLASS_CFG_INTERVAL = (0.0, 0.9)


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
            raise ConfigError(f"sampler={self.sampler!r}; valid samplers: {', '.join(SAMPLERS)}")
        if self.steps < 1 or self.shift <= 0:
            raise ConfigError(f"sampler settings need steps >= 1 and shift > 0, got steps={self.steps}, "
                              f"shift={self.shift}")
        lo, hi = self.cfg_interval
        if not 0.0 <= lo <= hi <= 1.0:
            raise ConfigError(f"cfg_interval={self.cfg_interval} must satisfy 0 <= lo <= hi <= 1")

    def override(self, **changes: Any) -> "SamplerDefaults":
        """A copy with the given fields replaced; None values keep the default (unset CLI flags)."""
        valid = [f.name for f in dataclasses.fields(self)]
        unknown = sorted(set(changes) - set(valid))
        if unknown:
            raise ConfigError(f"unknown sampler settings {unknown}; valid: {valid}")
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    def generate_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``pixeldit.diffusion.generate``."""
        return {"sampler": self.sampler, "steps": self.steps, "cfg_scale": self.cfg_scale,
                "cfg_interval": self.cfg_interval, "shift": self.shift}


def default_sampler(args: ModelArgs, shift: float = 1.0) -> SamplerDefaults:
    """The paper's inference defaults: FlowDPM-Solver, 100 steps and CFG 3.25 on our t in [0.0, 0.9]
    (``CLASS_CFG_INTERVAL``: the official [0.1, 1.0] in its reversed time) for class-conditional models; 25 steps
    and CFG 4.5 everywhere for text-to-image (``SamplerDefaults()``)."""
    if args.conditioning == "class":
        return SamplerDefaults(steps=100, cfg_scale=3.25, cfg_interval=CLASS_CFG_INTERVAL, shift=shift)
    return SamplerDefaults(shift=shift)


def add_sampler_flags(parser: argparse.ArgumentParser) -> None:
    """--sampler/--steps/--cfg-scale/--cfg-interval/--shift; unset flags keep the model's ``SamplerDefaults``."""
    group = parser.add_argument_group("sampler (default: the model's settings, see config.json 'sampler')")
    group.add_argument("--sampler", choices=list(SAMPLERS), default=None)
    group.add_argument("--steps", type=int, default=None)
    group.add_argument("--cfg-scale", type=float, default=None, help="1 disables guidance")
    group.add_argument("--cfg-interval", type=float, nargs=2, default=None, metavar=("T_LO", "T_HI"),
                       help="apply CFG for t in [T_LO, T_HI] (t = 1 is noise)")
    group.add_argument("--shift", type=float, default=None, help="time-grid shift (default: the training stage's)")


def sampler_flags(a: argparse.Namespace) -> dict[str, Any]:
    """The values of ``add_sampler_flags`` as ``SamplerDefaults.override`` keywords (None: not given)."""
    return {"sampler": a.sampler, "steps": a.steps, "cfg_scale": a.cfg_scale, "shift": a.shift,
            "cfg_interval": tuple(a.cfg_interval) if a.cfg_interval else None}


_HF_CACHE_SNAPSHOT = re.compile(r"models--([^/]+)--([^/]+)/snapshots/")


def text_encoder_name(location: str) -> str:
    """The name a release records for a text encoder given as a local folder or a Hugging Face id.

    A Hugging Face cache snapshot (``.../models--ORG--NAME/snapshots/HASH``) -> ``ORG/NAME``; another local
    folder (absolute, relative, or existing here) -> its folder name; anything else (a hub id) unchanged.
    """
    if not location:
        return ""
    hub = _HF_CACHE_SNAPSHOT.search(location.replace(os.sep, "/"))
    if hub:
        return f"{hub.group(1)}/{hub.group(2)}"
    if os.path.isabs(location) or location.startswith(".") or os.path.isdir(location):
        return os.path.basename(os.path.normpath(location))
    return location


def check_model_args(model_args: dict[str, Any], where: str) -> ModelArgs:
    """``ModelArgs`` of a release/checkpoint; the name must be a size of ``pixeldit.models.MODEL_SIZES``."""
    name = model_args.get("name") if isinstance(model_args, dict) else None
    if name not in MODEL_SIZES:
        raise ConfigError(f"{where}: model_args.name={name!r} is not a known architecture; valid names: "
                          f"{', '.join(MODEL_SIZES)} (a newer pixeldit may know it: upgrade, or fix the file)")
    try:
        return ModelArgs.from_dict(model_args)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{where}: model_args: {err}") from None


@dataclass
class ReleaseConfig:
    """Contents of ``config.json``."""

    model_args: dict[str, Any]  # ModelArgs fields (the size table entry plus overrides)
    resolution: int = 256  # base resolution of the training stage the weights come from
    stage: str = ""  # curriculum stage name
    stage_index: int = 0
    step: int = 0  # optimizer steps trained
    weights: str = DEFAULT_WEIGHTS  # one of WEIGHTS
    dtype: str = DEFAULT_DTYPE  # dtype of the stored tensors: one of DTYPES
    text_encoder: str = ""  # NAME of the frozen text encoder (text-to-image only; see the module docstring)
    system_prompt: str = ""  # prepended to every prompt by the text encoder (as in training)
    sampler: SamplerDefaults = field(default_factory=SamplerDefaults)
    format_version: int = RELEASE_FORMAT_VERSION

    def __post_init__(self) -> None:
        if self.weights not in WEIGHTS:
            raise ConfigError(f"weights={self.weights!r}; valid values: {', '.join(WEIGHTS)}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype={self.dtype!r}; valid values: {', '.join(DTYPES)}")
        check_model_args(self.model_args, "ReleaseConfig")

    def args(self) -> ModelArgs:
        return ModelArgs.from_dict(self.model_args)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def load(cls, folder: str | os.PathLike) -> "ReleaseConfig":
        path = Path(folder) / CONFIG_FILE
        if not path.exists():
            raise CheckpointError(f"{path} not found: {folder} is not a PixelDiT release folder (make one with "
                                  f"pixeldit-release)")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise CheckpointError(f"{path} is not valid JSON ({err}); re-download the release or re-export it "
                                  f"with pixeldit-release") from None
        if not isinstance(d, dict):
            raise ConfigError(f"{path}: expected a JSON object, got {type(d).__name__}")
        version = d.get("format_version", 0)
        if version > RELEASE_FORMAT_VERSION:
            raise ConfigError(f"{path}: release format {version} is newer than this code ({RELEASE_FORMAT_VERSION}); "
                              f"upgrade pixeldit")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"{path}: unknown keys {unknown}; valid keys: {sorted(known)}")
        check_model_args(d.get("model_args"), str(path))
        try:
            return cls(**{**d, "sampler": SamplerDefaults(**d.get("sampler", {}))})
        except (TypeError, ValueError) as err:
            raise ConfigError(f"{path}: {err}") from None
