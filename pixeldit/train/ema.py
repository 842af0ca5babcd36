"""Exponential moving average of the model weights that works under every ZeRO stage.

ZeRO-1/2 keep full parameters on every rank: the EMA is a full fp32 copy (``layout="full"``), identical on
all ranks, and only rank 0 saves it. ZeRO-3 keeps on each rank only its partition ``param.ds_tensor`` (the
flattened parameter padded to a multiple of the world size, rank r holding elements
[r * n, (r + 1) * n)): the EMA is kept over that local partition (``layout="zero3"``), so an update
needs no gather, and every rank saves its own file.

The EMA file format and its readers (``consolidate_ema``, ``partition_state``: the full state dict of any
checkpoint whatever its stage and world size, and back) live in ``pixeldit.run_folder``; a run resumed on
another world size or ZeRO stage re-partitions through them.
"""
from __future__ import annotations

import os

import torch
from torch import nn

from pixeldit.run_folder import consolidate_ema, partition_bounds, partition_state, read_ema_file, save_ema_file


class EMA:
    """EMA shadow of ``model``'s parameters in fp32: ``shadow = decay * shadow + (1 - decay) * param``."""

    def __init__(self, model: nn.Module, decay: float, zero3: bool, world_size: int = 1, rank: int = 0):
        self.model = model
        self.decay = decay
        self.layout = "zero3" if zero3 else "full"
        self.world_size, self.rank = world_size, rank
        self.shapes: dict[str, list[int]] = {}
        self.shadow: dict[str, torch.Tensor] = {}
        self._valid: dict[str, int] = {}
        with torch.no_grad():
            for name, p in model.named_parameters():
                src = self._source(p)
                self.shapes[name] = list(p.ds_shape if zero3 else p.shape)
                numel = int(torch.Size(self.shapes[name]).numel())
                self._valid[name] = partition_bounds(numel, world_size, rank)[2] if zero3 else numel
                shadow = torch.zeros_like(src, dtype=torch.float32)
                shadow[: self._valid[name]] = src[: self._valid[name]].float()
                self.shadow[name] = shadow

    def _source(self, p: torch.Tensor) -> torch.Tensor:
        return p.ds_tensor.reshape(-1) if self.layout == "zero3" else p.data.reshape(-1)

    @torch.no_grad()
    def update(self) -> None:
        for name, p in self.model.named_parameters():
            n = self._valid[name]
            self.shadow[name][:n].lerp_(self._source(p)[:n].to(torch.float32), 1.0 - self.decay)

    def state_dict(self) -> dict:
        shadow = self.shadow if self.layout == "zero3" else {
            n: t.reshape(self.shapes[n]) for n, t in self.shadow.items()
        }
        return {"layout": self.layout, "decay": self.decay, "world_size": self.world_size, "rank": self.rank,
                "shapes": self.shapes, "shadow": shadow}

    def load_full(self, full: dict[str, torch.Tensor]) -> None:
        """Set the shadow from a full state dict (model keys)."""
        missing = sorted(set(self.shadow) - set(full))
        if missing:
            raise KeyError(f"EMA state lacks parameters {missing[:5]}{'...' if len(missing) > 5 else ''}")
        parts = partition_state(full, self.world_size, self.rank) if self.layout == "zero3" else {
            n: full[n].detach().reshape(-1).float() for n in self.shadow
        }
        for name in self.shadow:
            if parts[name].shape != self.shadow[name].shape:
                raise ValueError(f"EMA parameter {name}: shape {tuple(parts[name].shape)} does not match the "
                                 f"model's {tuple(self.shadow[name].shape)}")
            self.shadow[name].copy_(parts[name])

    def save(self, folder: str | os.PathLike) -> None:
        """ZeRO-3: every rank writes its partition; full layout: rank 0 writes the (replicated) copy."""
        if self.layout == "full" and self.rank != 0:
            return
        save_ema_file(folder, self.state_dict())

    def load(self, folder: str | os.PathLike) -> None:
        """Load from a checkpoint folder: own partition if layout and world size match, else re-partition."""
        sd = read_ema_file(folder, self.rank) if self.layout == "zero3" else None
        if sd is not None and sd["layout"] == "zero3" and sd["world_size"] == self.world_size:
            for name in self.shadow:
                self.shadow[name].copy_(sd["shadow"][name])
            return
        self.load_full(consolidate_ema(folder))

