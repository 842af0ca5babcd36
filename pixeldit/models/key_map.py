"""Key map between training checkpoints and release weights, next to the model it describes.

Training wraps the model and the REPA projector in one module (``model.*``, ``projector.*``); a release
holds the bare ``PixelDiT.state_dict()`` keys. Bump ``RELEASE_FORMAT_VERSION`` and add a rename rule
here whenever a parameter name of the model changes, so old releases keep loading.
"""
from __future__ import annotations

import torch

RELEASE_FORMAT_VERSION = 1
TRAINING_PREFIX = "model."
TRAINING_ONLY_PREFIXES = ("projector.",)  # trained alongside the model, not part of a release
RENAMES: dict[str, str] = {}  # old release key -> current key (none yet: version 1)


def training_to_release(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip the training wrapper prefix and drop training-only modules (keys already bare pass through)."""
    out = {}
    for key, value in state.items():
        if key.startswith(TRAINING_ONLY_PREFIXES):
            continue
        out[key[len(TRAINING_PREFIX):] if key.startswith(TRAINING_PREFIX) else key] = value
    return out


def release_to_model(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Apply renames of older release versions so the keys match ``PixelDiT.state_dict()``."""
    return {RENAMES.get(k, k): v for k, v in state.items()}


def release_to_training(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of ``training_to_release`` (e.g. to warm-start a run from a release)."""
    return {TRAINING_PREFIX + k: v for k, v in release_to_model(state).items()}
