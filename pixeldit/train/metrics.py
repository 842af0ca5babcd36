"""Logging of a training run: per-step JSONL, progress bar, wandb (offline by default), throughput and MFU.

Rank 0 logs; other ranks only time their steps. Every optimizer step appends one line to
``{run_dir}/losses.jsonl`` (step, stage, loss, flow, repa, lr, grad_norm, skipped, skip_reason, nonfinite_total,
bucket, samples/s, mfu, the step-time breakdown ``time_{data,forward,backward,optimizer,checkpoint}_s``
(``StepPhases``), graph compilations): a resumed run appends the steps it re-runs again, so the file also shows
that they are identical. Every line is strict JSON: a non-finite number (the NaN loss of a skipped step, an
infinite gradient norm) is written as ``null``; ``skip_reason`` says which it was.
wandb runs in ``offline`` mode unless ``logging.wandb=online`` (``disabled`` turns it off); its run id is
kept in ``{run_dir}/wandb_id.txt`` so a resumed run continues the same wandb run.

MFU = model FLOPs of the step (``pixeldit.models.flops.train_flops``: 3x forward per image; the recomputed forward
of activation checkpointing is not counted) / (step time x world size x peak FLOP/s per device).
"""
from __future__ import annotations

import contextlib
import json
import math
import time
import uuid
from pathlib import Path
from typing import Any

import torch

from pixeldit.models import ModelArgs
from pixeldit.diffusion import to_uint8
from pixeldit.models.flops import train_flops
from pixeldit.run_folder import LOSSES, append_metrics
from pixeldit.storage import atomic_local_file

from .config import RunConfig, to_saved_dict

# dense bf16 peak TFLOP/s per device, matched against torch.cuda.get_device_name()
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0}


def device_peak_tflops(override: float = 0.0) -> float | None:
    """Peak dense bf16 TFLOP/s of this device: the config value, else a table lookup; None if unknown (CPU)."""
    if override > 0:
        return override
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


class FlopCounter:
    """Model FLOPs of training on one image of (height, width) (``train_flops``), cached per size."""

    def __init__(self, args: ModelArgs):
        self.args = args
        self._cache: dict[tuple[int, int], int] = {}

    def train_flops(self, height: int, width: int) -> int:
        if (height, width) not in self._cache:
            self._cache[(height, width)] = train_flops(self.args, height, width)
        return self._cache[(height, width)]


def json_record(record: dict[str, Any]) -> dict[str, Any]:
    """The record with non-finite floats (NaN, inf) as None: JSON has no NaN, ``json.dumps`` would write a bare
    ``NaN`` that strict readers reject."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}


class MetricsLogger:
    """Rank-0 sink for step records and image grids; a no-op on other ranks."""

    def __init__(self, cfg: RunConfig, rank: int, world_size: int, initial_step: int):
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.run_dir = Path(cfg.run_dir)
        self.peak = device_peak_tflops(cfg.logging.peak_tflops)
        self.wandb_run = None
        self.bar = None
        if rank != 0:
            return
        self.jsonl = open(self.run_dir / LOSSES, "a")
        if cfg.logging.progress_bar:
            from tqdm import tqdm
            self.bar = tqdm(total=cfg.total_steps, initial=initial_step, desc="train", dynamic_ncols=True)
        if cfg.logging.wandb != "disabled":
            self.wandb_run = self._init_wandb()

    def _init_wandb(self):
        import wandb

        id_file = self.run_dir / "wandb_id.txt"
        run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:12]
        id_file.write_text(run_id)
        return wandb.init(project=self.cfg.logging.project, name=self.cfg.logging.run_name or self.run_dir.name,
                          id=run_id, resume="allow", dir=str(self.run_dir), mode=self.cfg.logging.wandb,
                          config=to_saved_dict(self.cfg))  # credentials redacted

    def mfu(self, flops: float, seconds: float) -> float | None:
        if self.peak is None or seconds <= 0:
            return None
        return flops / (seconds * self.world_size * self.peak * 1e12)

    def log_step(self, record: dict[str, Any]) -> None:
        if self.rank != 0:
            return
        self.jsonl.write(json.dumps(json_record(record), allow_nan=False) + "\n")
        self.jsonl.flush()
        step = record["step"]
        if self.bar is not None:
            self.bar.update(1)
            if step % self.cfg.logging.log_every == 0:
                mfu = record.get("mfu")
                self.bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                                     sps=f"{record.get('samples_per_s') or 0:.1f}",
                                     mfu="-" if mfu is None else f"{100 * mfu:.1f}%", ms=breakdown_ms(record))
        if self.wandb_run is not None and step % self.cfg.logging.log_every == 0:
            self.wandb_run.log({f"train/{k}": v for k, v in record.items()
                                if isinstance(v, (int, float)) and v is not None}, step=step)

    def log_images(self, step: int, grid: torch.Tensor, path: Path) -> None:
        """grid (3, H, W) in [-1, 1]: saved as PNG (atomically) and sent to wandb."""
        if self.rank != 0:
            return
        from PIL import Image

        arr = to_uint8(grid[None])[0]
        with atomic_local_file(path) as tmp:
            Image.fromarray(arr).save(tmp, format="PNG")
        if self.wandb_run is not None:
            import wandb

            self.wandb_run.log({"samples/ema": wandb.Image(str(path))}, step=step)

    def log_metrics(self, record: dict[str, Any], wandb_values: dict[str, float], line: str) -> None:
        """An evaluation record (e.g. the validation loss) into ``{run_dir}/metrics.jsonl`` and wandb at its step,
        and one line on the terminal."""
        if self.rank != 0:
            return
        append_metrics(self.run_dir, json_record(record))
        self.write(line)
        if self.wandb_run is not None:
            self.wandb_run.log(wandb_values, step=record["step"])

    def write(self, text: str) -> None:
        if self.rank == 0:
            (self.bar.write if self.bar is not None else print)(text)

    def close(self) -> None:
        if self.rank != 0:
            return
        self.jsonl.close()
        if self.bar is not None:
            self.bar.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()


def breakdown_ms(record: dict[str, Any]) -> str:
    """``data/fwd/bwd/opt/ckpt`` milliseconds of a step record (the progress bar's ``ms``)."""
    return "/".join(f"{1e3 * record.get(f'time_{p}_s', 0.0):.0f}" for p in StepPhases.PHASES)


class StepPhases:
    """Seconds of one optimizer step per phase, measured without host synchronisation.

    forward / backward / optimizer: CUDA events on the compute stream (GPU time between them, read with
    ``seconds()`` once the step is complete, i.e. when its record is written a step later), the host clock on
    the CPU (where execution is synchronous); data (waiting for the loader) and checkpoint (a save) are host
    times. The record fields are ``time_{phase}_s``.
    """

    PHASES = ("data", "forward", "backward", "optimizer", "checkpoint")

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self._host = dict.fromkeys(self.PHASES, 0.0)
        self._events: list[tuple[str, Any, Any]] = []
        # the step's start and its first wait for the other ranks (``mark_sync``; pixeldit.train.stragglers)
        self._start: Any = time.perf_counter()
        self._sync: Any = None
        if self.cuda:
            self._start = torch.cuda.Event(enable_timing=True)
            self._start.record()

    def mark_sync(self) -> None:
        """Here the step first waits for the other ranks (its stats all-reduce); once per step."""
        if self.cuda:
            self._sync = torch.cuda.Event(enable_timing=True)
            self._sync.record()
        else:
            self._sync = time.perf_counter()

    def until_sync_s(self) -> float | None:
        """Seconds from the step's start to ``mark_sync`` (None without a mark); on CUDA it waits for that event,
        so read it late (with the step's record)."""
        if self._sync is None:
            return None
        if self.cuda:
            self._sync.synchronize()
            return self._start.elapsed_time(self._sync) / 1000.0
        return self._sync - self._start

    @contextlib.contextmanager
    def phase(self, name: str):
        if not self.cuda:
            t0 = time.perf_counter()
            yield
            self._host[name] += time.perf_counter() - t0
            return
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        yield
        end.record()
        self._events.append((name, start, end))

    def add(self, name: str, seconds: float) -> None:
        self._host[name] += seconds

    def seconds(self) -> dict[str, float]:
        out = dict(self._host)
        for name, start, end in self._events:
            end.synchronize()
            out[name] += start.elapsed_time(end) / 1000.0
        return {f"time_{k}_s": v for k, v in out.items()}
