"""Read weights only from safe formats: safetensors, or torch.load(weights_only=True).

A file that needs arbitrary unpickling is refused: pickles can run code when loaded, so weights from
untrusted places must never go through plain ``torch.load``.
"""
from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import torch
from safetensors.torch import load_file

SHARD_INDEX = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class UnsafeCheckpointError(ValueError):
    """A weights file that could only be read by running arbitrary pickled code."""


def safe_load(path: str | os.PathLike, device: str = "cpu") -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors file, or of a torch file loadable with weights_only=True."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} not found")
    if path.suffix == ".safetensors":
        return load_file(str(path), device=device)
    try:
        obj = torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as err:
        raise UnsafeCheckpointError(
            f"refusing to load {path}: it holds pickled objects beyond plain tensors, and unpickling can run "
            f"arbitrary code. Convert it where you trust it (e.g. `pixeldit-release` from the training "
            f"checkpoint) to .safetensors. Detail: {str(err).splitlines()[0]}") from None
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UnsafeCheckpointError(f"{path} is not a flat {{name: tensor}} state dict")
    return obj


def load_release_weights(folder: str | os.PathLike, device: str = "cpu") -> dict[str, torch.Tensor]:
    """All tensors of a release folder: model.safetensors, or the shards listed by the index file."""
    folder = Path(folder)
    index = folder / SHARD_INDEX
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        state: dict[str, torch.Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            state.update(safe_load(folder / shard, device))
        missing = sorted(set(weight_map) - set(state))
        if missing:
            raise ValueError(f"{index} lists tensors absent from its shards: {missing[:5]}")
        return state
    single = folder / SINGLE_FILE
    if not single.exists():
        raise FileNotFoundError(f"{folder} has neither {SINGLE_FILE} nor {SHARD_INDEX}: not a release folder")
    return safe_load(single, device)
