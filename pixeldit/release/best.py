"""``pixeldit-release RUN OUT --best METRIC``: the checkpoint of a run with the best recorded metric.

The records are the run's ``metrics.jsonl`` (``pixeldit.run_folder.read_metrics``): the trainer's validation loss
(``val_loss``) and the eval jobs' results (``fid``, ``fd_dinov2``, ``clip_score``); the last record of a step
counts. Lower is better for the losses and distances, higher for CLIP score. Only steps whose step folder is
still there can be released; a better step whose folder was pruned is named in the note.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

from pixeldit import run_folder
from pixeldit.errors import CheckpointError, ConfigError

LOWER_IS_BETTER = ("val_loss", "fid", "fd_dinov2")
HIGHER_IS_BETTER = ("clip_score",)
BEST_METRICS = LOWER_IS_BETTER + HIGHER_IS_BETTER


def recorded(run_dir: str | os.PathLike) -> dict[str, dict[int, float]]:
    """{metric: {step: value}} of the run's metrics.jsonl (the last finite record of a step)."""
    out: dict[str, dict[int, float]] = {}
    for record in run_folder.read_metrics(run_dir):
        for metric in BEST_METRICS:
            value = record.get(metric)
            if isinstance(value, (int, float)) and math.isfinite(value):
                out.setdefault(metric, {})[int(record["step"])] = float(value)
    return out


def _steps(values: dict[int, float]) -> str:
    steps = sorted(values)
    return ", ".join(map(str, steps[:8])) + (f" ... ({len(steps)} steps)" if len(steps) > 8 else "")


def best_checkpoint(run_dir: str | os.PathLike, metric: str) -> tuple[Path, float, str | None]:
    """(step folder, its value, a note when a better step's folder was pruned) of the best ``metric``."""
    run = Path(run_dir)
    if not (run / run_folder.CHECKPOINTS).is_dir():
        raise CheckpointError(f"--best needs a training run folder (with {run_folder.CHECKPOINTS}/), got {run_dir}")
    values = recorded(run)
    if metric not in BEST_METRICS or metric not in values:
        have = "; ".join(f"{m} at steps {_steps(v)}" for m, v in sorted(values.items())) or "nothing"
        raise ConfigError(f"--best {metric}: {run / run_folder.METRICS} records {have}; valid metrics: "
                          f"{', '.join(BEST_METRICS)}")
    sign = 1.0 if metric in LOWER_IS_BETTER else -1.0
    ranked = sorted(values[metric].items(), key=lambda kv: (sign * kv[1], kv[0]))
    for n, (step, value) in enumerate(ranked):
        folder = run_folder.checkpoints_dir(run) / run_folder.step_dirname(step)
        if (folder / run_folder.META).exists():
            pruned = ranked[:n]
            note = None if not pruned else (
                f"better {metric} at steps {', '.join(str(s) for s, _ in pruned)} (best {pruned[0][1]:.6g}) but "
                f"their checkpoints were pruned (raise checkpoint.keep to keep them)")
            return folder, value, note
    raise CheckpointError(f"--best {metric}: none of the {len(ranked)} steps with a recorded {metric} "
                          f"({_steps(values[metric])}) still has its step folder in {run_folder.checkpoints_dir(run)} "
                          f"(pruned); raise checkpoint.keep")
