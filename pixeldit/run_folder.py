"""The run folder and checkpoint on-disk format: its names, ``meta.json``, the ``latest`` pointer, EMA files.

The one owner of this format: the trainer writes it (``pixeldit.train.checkpoint``, ``pixeldit.train.ema``),
release tools and launchers read it, tests build fixtures through it. Imports torch, the standard library and
``pixeldit.storage`` / ``pixeldit.errors`` only.

    {run_dir}/config.yaml                        the resolved run config
    {run_dir}/losses.jsonl                       one JSON record per optimizer step
    {run_dir}/samples/step_{N:08d}.png           EMA preview grids
    {run_dir}/checkpoints/latest                 text: the name of the newest complete step folder
    {run_dir}/checkpoints/step_{N:08d}/          one checkpoint: DeepSpeed's model + optimizer states (ZeRO
                                                 partitions), meta.json, ema_rank{r:05d}.pt, rng_rank{r:05d}.pt
    {run_dir}/checkpoints/universal_step_{N:08d}/  the same step as a DeepSpeed universal checkpoint (a ``zero/``
                                                 folder; resumable on any number of ranks)

A step folder is built by every rank under ``staging_dirname(N)`` (a ``pixeldit.storage.is_tmp`` name) and
renamed to ``step_{N:08d}`` once complete; ``latest`` is replaced after that, so it never names a half folder.

EMA files hold ``{"layout", "decay", "world_size", "rank", "shapes": {name: shape}, "shadow": {name: tensor}}``:
layout ``"full"``: one file (rank 0) of full tensors (ZeRO-1/2); layout ``"zero3"``: one file per rank holding
rank r's ZeRO-3 partition of every flattened parameter, elements [r * n, (r + 1) * n) with
n = ceil(numel / world_size), zero-padded. ``consolidate_ema`` rebuilds the full state dict from either.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch

from pixeldit.errors import CheckpointError
from pixeldit.storage import TMP_MARK, atomic_local_file, is_tmp, write_json_atomic, write_text_atomic

RUN_CONFIG = "config.yaml"
LOSSES = "losses.jsonl"
SAMPLES = "samples"
CHECKPOINTS = "checkpoints"
LATEST = "latest"
META = "meta.json"
STEP_PREFIX = "step_"
UNIVERSAL_PREFIX = "universal_"
EMA_FILE = "ema_rank{rank:05d}.pt"
RNG_FILE = "rng_rank{rank:05d}.pt"
EMA_LAYOUTS = ("full", "zero3")
_STEP_NAME = re.compile(rf"{STEP_PREFIX}(\d+)")


def checkpoints_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / CHECKPOINTS


def step_dirname(step: int) -> str:
    return f"{STEP_PREFIX}{step:08d}"


def staging_dirname(step: int) -> str:
    """The folder every rank writes step ``step`` into before rank 0 renames it: one name all ranks agree on,
    recognised as a leftover by ``pixeldit.storage.is_tmp``."""
    return f".{step_dirname(step)}{TMP_MARK}all-ranks"


def is_save_leftover(name: str) -> bool:
    """A staging or replaced step folder, or a temp ``latest``, left by an interrupted save (never read).
    Other temp names (e.g. a universal conversion in progress) are not a save's to delete."""
    return is_tmp(name) and name.startswith((f".{STEP_PREFIX}", f".{LATEST}"))


def preview_path(run_dir: str | os.PathLike, step: int) -> Path:
    return Path(run_dir) / SAMPLES / f"{step_dirname(step)}.png"


def step_dirs(checkpoints: str | os.PathLike) -> list[Path]:
    """The complete step folders under ``checkpoints``, oldest first."""
    root = Path(checkpoints)
    found = [p for p in root.iterdir() if p.is_dir() and _STEP_NAME.fullmatch(p.name)] if root.is_dir() else []
    return sorted(found, key=lambda p: int(_STEP_NAME.fullmatch(p.name).group(1)))


def read_meta(step_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(step_dir) / META
    if not path.exists():
        raise CheckpointError(f"{path} not found: {step_dir} is not a complete checkpoint folder")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path} is not valid JSON ({err}); the checkpoint is damaged: use an older "
                              f"step folder") from None


def write_meta(step_dir: str | os.PathLike, meta: dict[str, Any]) -> None:
    write_json_atomic(Path(step_dir) / META, meta)


def read_latest(checkpoints: str | os.PathLike) -> Path | None:
    """The step folder named by ``checkpoints/latest``, or None when there is no pointer yet."""
    pointer = Path(checkpoints) / LATEST
    if not pointer.exists():
        return None
    name = pointer.read_text().strip()
    path = pointer.parent / name
    if not name.startswith(STEP_PREFIX) or not (path / META).exists():
        raise CheckpointError(f"{pointer} names {name!r}, which is not a complete checkpoint folder "
                              f"(no {path / META}); remove {pointer} to start over or fix it by hand")
    return path


def write_latest(checkpoints: str | os.PathLike, step_dir: str | os.PathLike) -> None:
    write_text_atomic(Path(checkpoints) / LATEST, Path(step_dir).name)


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A step folder (with meta.json), or a run folder / its checkpoints folder -> the step folder of ``latest``."""
    p = Path(path)
    if (p / META).exists():
        return p
    latest = read_latest(p if p.name == CHECKPOINTS else checkpoints_dir(p))
    if latest is None:
        raise CheckpointError(f"{path}: no checkpoint here: neither a step folder (with {META}) nor a run folder "
                              f"with {CHECKPOINTS}/{LATEST}; pass a run folder that has saved a checkpoint, or one "
                              f"of its {CHECKPOINTS}/{STEP_PREFIX}N folders")
    return latest


def universal_dirname(step_dir: str | os.PathLike) -> str:
    return UNIVERSAL_PREFIX + Path(step_dir).name


def is_universal_checkpoint(path: str | os.PathLike) -> bool:
    """True for a DeepSpeed universal checkpoint folder of ours (a ``zero/`` folder and meta.json)."""
    p = Path(path)
    return (p / "zero").is_dir() and (p / META).exists()


def rank_files(step_dir: str | os.PathLike) -> list[Path]:
    """Our per-rank files of a step folder (EMA and RNG), in the order of their names."""
    prefixes = (EMA_FILE.split("{")[0], RNG_FILE.split("{")[0])
    return sorted(f for f in Path(step_dir).iterdir() if f.is_file() and f.name.startswith(prefixes))


# --- EMA files ------------------------------------------------------------------------------------------

def partition_bounds(numel: int, world_size: int, rank: int) -> tuple[int, int, int]:
    """(start, partition size, valid elements) of rank's ZeRO-3 partition of a flattened tensor."""
    size = -(-numel // world_size)
    start = size * rank
    return start, size, max(0, min(numel - start, size))


def partition_state(full: dict[str, torch.Tensor], world_size: int, rank: int) -> dict[str, torch.Tensor]:
    """The ZeRO-3 local partitions (1-D fp32, padded with zeros) of a full state dict."""
    out = {}
    for name, t in full.items():
        flat = t.detach().reshape(-1).float()
        start, size, valid = partition_bounds(flat.numel(), world_size, rank)
        part = torch.zeros(size, dtype=torch.float32)
        part[:valid] = flat[start:start + valid]
        out[name] = part
    return out


def save_ema_file(folder: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Write one rank's EMA file (``state`` as in the module docstring) atomically; returns its path."""
    if state["layout"] not in EMA_LAYOUTS:
        raise ValueError(f"EMA layout {state['layout']!r}; valid layouts: {', '.join(EMA_LAYOUTS)}")
    path = Path(folder) / EMA_FILE.format(rank=state["rank"])
    with atomic_local_file(path) as tmp:
        torch.save(state, tmp)
    return path


def read_ema_file(folder: str | os.PathLike, rank: int) -> dict[str, Any] | None:
    """One rank's EMA file of a step folder (tensors only, no pickled code), or None when absent."""
    path = Path(folder) / EMA_FILE.format(rank=rank)
    return torch.load(path, map_location="cpu", weights_only=True) if path.exists() else None


def consolidate_ema(step_dir: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Full fp32 EMA state dict (model parameter names -> tensors) of a step folder, any layout and world size."""
    folder = Path(step_dir)
    sd0 = read_ema_file(folder, 0)
    if sd0 is None:
        raise CheckpointError(f"{folder / EMA_FILE.format(rank=0)} not found: {folder} is not a checkpoint folder "
                              f"with an EMA (use --weights raw for the raw weights)")
    if sd0["layout"] == "full":
        return {n: t.clone() for n, t in sd0["shadow"].items()}
    world = sd0["world_size"]
    parts = [sd0]
    for r in range(1, world):
        part = read_ema_file(folder, r)
        if part is None:
            raise CheckpointError(f"{folder / EMA_FILE.format(rank=r)} missing: the ZeRO-3 EMA of {folder} was saved "
                                  f"by {world} ranks; copy the whole step folder")
        parts.append(part)
    full = {}
    for name, shape in sd0["shapes"].items():
        numel = int(torch.Size(shape).numel())
        flat = torch.cat([p["shadow"][name] for p in parts])[:numel]
        full[name] = flat.reshape(shape).clone()
    return full
