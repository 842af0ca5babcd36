"""Read weights only from safe formats: safetensors, or ``torch.load(weights_only=True)``.

A file that needs arbitrary unpickling is refused (``UnsafeCheckpointError``): a pickle can run any code
while it loads, so weights from untrusted places must never go through plain ``torch.load``. A damaged
``.safetensors`` file (truncated, empty, or a pickle under that name) raises ``CheckpointError`` naming the
file and the fix.
"""
from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from pixeldit.errors import CheckpointError

SHARD_INDEX = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
FIX = "re-download the release or re-export it with pixeldit-release"
_PICKLE_MAGIC = (b"PK\x03\x04", b"\x80")  # torch.save's zip archive; a bare pickle (protocol >= 2)


class UnsafeCheckpointError(CheckpointError, ValueError):
    """A weights file that could only be read by running arbitrary pickled code (or is not a state dict)."""


def load_safetensors(path: Path, device: str = "cpu") -> dict[str, torch.Tensor]:
    """``safetensors.torch.load_file`` whose failures name the file, what is wrong with it and the fix."""
    try:
        return load_file(str(path), device=device)
    except SafetensorError as err:
        with open(path, "rb") as f:
            head = f.read(4)
        if not head:
            what = "is empty"
        elif head.startswith(_PICKLE_MAGIC):
            what = "is a pickle (torch.save) file under a .safetensors name, not safetensors"
        else:
            what = f"is not a complete safetensors file ({err}; truncated?)"
        raise CheckpointError(f"{path} {what}: {FIX}") from None


def safe_load(path: str | os.PathLike, device: str = "cpu") -> dict[str, torch.Tensor]:
    """{name: tensor} of a ``.safetensors`` file, or of a torch file loadable with ``weights_only=True``."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file {path} not found: {FIX}")
    if path.suffix == ".safetensors":
        return load_safetensors(path, device)
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
        try:
            weight_map = json.loads(index.read_text()).get("weight_map")
        except (json.JSONDecodeError, AttributeError) as err:
            raise CheckpointError(f"{index} is not a JSON object ({err}): {FIX}") from None
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index}: no 'weight_map' {{tensor name: shard file}}: {FIX}")
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
            raise CheckpointError(f"{index} lists tensors absent from its shards: {missing[:5]}: {FIX}")
        return state
    single = folder / SINGLE_FILE
    if not single.exists():
        raise CheckpointError(f"{folder} has neither {SINGLE_FILE} nor {SHARD_INDEX}: not a complete release "
                              f"folder; {FIX}")
    return safe_load(single, device)
