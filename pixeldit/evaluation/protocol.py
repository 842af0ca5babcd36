"""The evaluation protocol (everything that decides the numbers, recorded with them) and the local resources.

``EvalProtocol`` pins what is generated and measured: the prompt set, images per prompt, sampler, steps,
CFG scale and interval, time shift, seed, resolution, metrics and the reference data. Sampling fields left
``None`` take the model's release defaults (``ReleaseConfig.sampler``; the training resolution);
``resolved(config)`` fills them in, and the resolved protocol is what ``results.json`` records.

Seeds: image j of prompt i starts from ``torch.randn(3, H, W)`` drawn on the CPU with seed
``seed + i * images_per_prompt + j`` (the convention of ``pixeldit-sample``): the images do not depend on
the batch size or the device.

``EvalResources`` says where this machine keeps the extractor weights, the text encoder, the statistics
cache, and how to run (device, batch size, precision): it changes the cost, never the numbers (the
extractors' weight fingerprints are recorded).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Any

import torch

from pixeldit.diffusion.samplers import SAMPLERS

from .prompts import PROMPT_KINDS

METRICS = ("fid", "fd_dinov2", "clip_score")
REFERENCE_METRICS = ("fid", "fd_dinov2")  # need reference statistics
PRECISIONS = ("fp32", "bf16")


@dataclass(frozen=True)
class EvalProtocol:
    prompts: str  # prompt set kind: prompts | classes | geneval | dpg_bench
    source: str  # prompt file, class ids ("0-999"), GenEval metadata file, DPG-Bench prompts folder
    images_per_prompt: int = 1
    sampler: str | None = None  # None: the release default
    steps: int | None = None
    cfg_scale: float | None = None
    cfg_interval: tuple[float, float] | None = None  # t range where guidance applies (t = 1 is noise)
    shift: float | None = None
    seed: int = 0
    resolution: int | None = None  # square images; None: the training resolution
    metrics: tuple[str, ...] = ()
    reference: str = ""  # dataset root (samples.parquet) or image folder for fid / fd_dinov2
    reference_images: int = 50_000  # at most this many reference images (a seeded subset)

    def __post_init__(self) -> None:
        object.__setattr__(self, "metrics", tuple(self.metrics))
        if self.cfg_interval is not None:
            object.__setattr__(self, "cfg_interval", (float(self.cfg_interval[0]), float(self.cfg_interval[1])))
        self.validate()

    def validate(self) -> None:
        """ValueError naming the field at fault."""
        if self.prompts not in PROMPT_KINDS:
            raise ValueError(f"prompts={self.prompts!r}; valid kinds: {', '.join(PROMPT_KINDS)}")
        if not self.source:
            raise ValueError(f"prompts={self.prompts!r} needs a source (file, folder or class ids)")
        if self.images_per_prompt < 1:
            raise ValueError(f"images_per_prompt={self.images_per_prompt} must be >= 1")
        if self.prompts == "dpg_bench" and self.images_per_prompt not in (1, 4):
            raise ValueError(f"images_per_prompt={self.images_per_prompt}: DPG-Bench's scorer reads one image or a "
                             "2 x 2 grid per prompt (1 or 4)")
        if self.sampler is not None and self.sampler not in SAMPLERS:
            raise ValueError(f"sampler={self.sampler!r}; valid samplers: {', '.join(SAMPLERS)}")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps={self.steps} must be >= 1")
        if self.shift is not None and self.shift <= 0:
            raise ValueError(f"shift={self.shift} must be > 0")
        if self.cfg_interval is not None and not 0.0 <= self.cfg_interval[0] <= self.cfg_interval[1] <= 1.0:
            raise ValueError(f"cfg_interval={self.cfg_interval} must satisfy 0 <= lo <= hi <= 1")
        if self.resolution is not None and self.resolution < 1:
            raise ValueError(f"resolution={self.resolution} must be >= 1")
        unknown = [m for m in self.metrics if m not in METRICS]
        if unknown:
            raise ValueError(f"metrics {unknown}; valid metrics: {', '.join(METRICS)}")
        if any(m in REFERENCE_METRICS for m in self.metrics) and not self.reference:
            raise ValueError(f"metrics {[m for m in self.metrics if m in REFERENCE_METRICS]} need reference= (a "
                             "dataset root or an image folder)")
        if self.reference_images < 2:
            raise ValueError(f"reference_images={self.reference_images} must be >= 2")
        if "clip_score" in self.metrics and self.prompts == "classes":
            raise ValueError("metric clip_score needs text prompts, not class ids")

    def resolved(self, sampler_defaults: Any, resolution: int) -> "EvalProtocol":
        """Sampling fields left None filled from ``ReleaseConfig.sampler`` and the training resolution."""
        d = sampler_defaults
        return dataclasses.replace(
            self, sampler=self.sampler or d.sampler, steps=self.steps or d.steps,
            cfg_scale=d.cfg_scale if self.cfg_scale is None else self.cfg_scale,
            cfg_interval=tuple(d.cfg_interval) if self.cfg_interval is None else self.cfg_interval,
            shift=d.shift if self.shift is None else self.shift, resolution=self.resolution or resolution)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["metrics"], d["cfg_interval"] = list(self.metrics), list(self.cfg_interval) if self.cfg_interval else None
        return d

    @property
    def key(self) -> str:
        """Short hash of the protocol: one model-card row per protocol."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:12]

    def sampling_summary(self) -> str:
        lo, hi = self.cfg_interval or (None, None)
        return (f"{self.sampler}, {self.steps} steps, CFG {self.cfg_scale:g} on [{lo:g}, {hi:g}], shift {self.shift:g}, "
                f"{self.resolution}px, seed {self.seed}")

    def image_seed(self, prompt_index: int, image_index: int) -> int:
        return self.seed + prompt_index * self.images_per_prompt + image_index


@dataclass
class EvalResources:
    """Where this machine keeps things and how to run; never changes the numbers."""

    inception: str = ""  # FID: inception-2015-12-05.pt or its folder
    dinov2: str = ""  # FD-DINOv2: a transformers DINOv2 folder (e.g. facebook/dinov2-large)
    clip: str = ""  # CLIP score: a transformers CLIP folder (e.g. openai/clip-vit-large-patch14)
    text_encoder: str = ""  # override the model config's text encoder path
    stats_cache: str = ""  # reference statistics folder; default {reference}/eval_stats
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    batch_size: int = 16
    precision: str = "fp32"  # bf16: autocast for the diffusion model (GPU)
    workers: int = 2  # reference image decoding processes
    save_images: bool = True  # PNGs in the benchmark layouts (GenEval / DPG-Bench always write them)
    model_card: bool = True  # release targets: add the results to the release's README.md

    def check(self, protocol: EvalProtocol) -> None:
        """FileNotFoundError / ValueError naming what the protocol's metrics need and is missing."""
        if self.batch_size < 1 or self.workers < 0:
            raise ValueError(f"batch_size={self.batch_size} must be >= 1 and workers={self.workers} >= 0")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision={self.precision!r}; valid values: {', '.join(PRECISIONS)}")
        need = {"fid": ("inception", "--inception FILE (inception-2015-12-05.pt)"),
                "fd_dinov2": ("dinov2", "--dinov2 DIR (a transformers DINOv2 folder)"),
                "clip_score": ("clip", "--clip DIR (a transformers CLIP folder)")}
        for metric in protocol.metrics:
            attr, flag = need[metric]
            if not getattr(self, attr):
                raise ValueError(f"metric {metric} needs {flag}")
