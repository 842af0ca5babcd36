"""Read weights only from safe formats: safetensors, or ``torch.load(weights_only=True)``.

A file that needs arbitrary unpickling is refused (``UnsafeCheckpointError``): a pickle can run any code
while it loads, so weights from untrusted places must never go through plain ``torch.load``.
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
    """A weights file that could only be read by running arbitrary pickled code (or is not a state dict)."""


def safe_load(path: str | os.PathLike, device: str = "cpu") -> dict[str, torch.Tensor]:
    """{name: tensor} of a ``.safetensors`` file, or of a torch file loadable with ``weights_only=True``."""
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
            f"arbitrary code. Convert it to .safetensors where you trust its origin (a training checkpoint: "
            f"`pixeldit-release RUN_DIR OUT`), or load it yourself with torch.load(weights_only=False) only if "
            f"you trust whoever made it. Detail: {str(err).splitlines()[0]}") from None
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise UnsafeCheckpointError(f"{path} is not a flat {{name: tensor}} state dict (got {type(obj).__name__}); "
                                    f"save model.state_dict() itself, or convert it with pixeldit-release")
    return obj


def load_release_weights(folder: str | os.PathLike, device: str = "cpu") -> dict[str, torch.Tensor]:
    """All tensors of a release folder: ``model.safetensors``, or the shards listed by the index file."""
    folder = Path(folder)
    index = folder / SHARD_INDEX
    if index.exists():
        weight_map = json.loads(index.read_text()).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index}: no 'weight_map' {{tensor name: shard file}}")
        shards = sorted(set(weight_map.values()))
        bad = [s for s in shards if Path(s).name != s or not s.endswith(".safetensors")]
        if bad:
            raise UnsafeCheckpointError(f"{index} names shard files {bad}: shards must be .safetensors files "
                                        f"inside the release folder")
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            state.update(safe_load(folder / shard, device))
        missing = sorted(set(weight_map) - set(state))
        if missing:
            raise ValueError(f"{index} lists tensors absent from its shards: {missing[:5]}")
        return state
    single = folder / SINGLE_FILE
    if not single.exists():
        raise FileNotFoundError(f"{folder} has neither {SINGLE_FILE} nor {SHARD_INDEX}: not a release folder")
    return safe_load(single, device)
