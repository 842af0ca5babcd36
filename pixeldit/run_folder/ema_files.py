"""EMA files of a step folder (the layouts are in the package docstring): ZeRO-3 partitions, one rank's file,
and the full state dict rebuilt from either layout (``consolidate_ema``). torch is imported by the functions
that need it: the run-folder format is read by processes that never touch a tensor (a job's per-task
supervisor, ``pixeldit-submit status``)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

from pixeldit.errors import CheckpointError
from pixeldit.storage import atomic_local_file

from .layout import EMA_FILE, EMA_LAYOUTS


def partition_bounds(numel: int, world_size: int, rank: int) -> tuple[int, int, int]:
    """(start, partition size, valid elements) of rank's ZeRO-3 partition of a flattened tensor."""
    size = -(-numel // world_size)
    start = size * rank
    return start, size, max(0, min(numel - start, size))


def partition_state(full: dict[str, torch.Tensor], world_size: int, rank: int) -> dict[str, torch.Tensor]:
    """The ZeRO-3 local partitions (1-D fp32, padded with zeros) of a full state dict."""
    import torch

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
    import torch

    if state["layout"] not in EMA_LAYOUTS:
        raise ValueError(f"EMA layout {state['layout']!r}; valid layouts: {', '.join(EMA_LAYOUTS)}")
    path = Path(folder) / EMA_FILE.format(rank=state["rank"])
    with atomic_local_file(path) as tmp:
        torch.save(state, tmp)
    return path


def read_ema_file(folder: str | os.PathLike, rank: int) -> dict[str, Any] | None:
    """One rank's EMA file of a step folder (tensors only, no pickled code), or None when absent."""
    import torch

    path = Path(folder) / EMA_FILE.format(rank=rank)
    return torch.load(path, map_location="cpu", weights_only=True) if path.exists() else None


def consolidate_ema(step_dir: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Full fp32 EMA state dict (model parameter names -> tensors) of a step folder, any layout and world size."""
    import torch

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
