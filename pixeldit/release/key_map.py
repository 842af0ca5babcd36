"""Key map between training checkpoints and release weights (with its round-trip test in tests/test_release_format.py).

Training wraps the model and the REPA projector in one module (``pixeldit.train.engine.TrainModule``:
``model.*`` and ``projector.*``), so DeepSpeed's consolidated weights carry those prefixes; the EMA is kept
over the bare model. A release holds exactly the bare ``PixelDiT.state_dict()`` keys.

Bump ``RELEASE_FORMAT_VERSION`` and add a rule to ``RENAMES`` whenever a parameter of the model is renamed,
so that older releases keep loading.
"""
from __future__ import annotations

import torch

from pixeldit.errors import CheckpointError

# 1: first format. 2: model_args gained rope_positions, post_modulation, layer_style and text_padding (a format 1
# release loads with integer RoPE positions: sizes.LEGACY_DEFAULTS); older code refuses format 2 by name.
RELEASE_FORMAT_VERSION = 2
TRAINING_PREFIX = "model."  # TrainModule.model
TRAINING_ONLY_PREFIXES = ("projector.",)  # TrainModule.projector: trained alongside, not part of a release
RENAMES: dict[str, str] = {}  # old release key -> current key (none yet: no parameter was renamed)


def training_to_release(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip the training wrapper prefix and drop training-only modules (keys already bare pass through)."""
    out = {}
    for key, value in state.items():
        if key.startswith(TRAINING_ONLY_PREFIXES):
            continue
        out[key[len(TRAINING_PREFIX):] if key.startswith(TRAINING_PREFIX) else key] = value
    return out


def training_only(state: dict[str, torch.Tensor], prefix: str = "projector.") -> dict[str, torch.Tensor]:
    """The tensors of one training-only submodule, without its prefix (e.g. the REPA projector)."""
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def release_to_model(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Apply renames of older release versions so the keys match ``PixelDiT.state_dict()``."""
    return {RENAMES.get(k, k): v for k, v in state.items()}


def release_to_training(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of ``training_to_release`` for the model part (e.g. to warm-start a run from a release)."""
    return {TRAINING_PREFIX + k: v for k, v in release_to_model(state).items()}


def check_release_keys(state: dict[str, torch.Tensor], expected: dict[str, torch.Size], where: str) -> None:
    """Raise a CheckpointError naming ``where`` unless ``state`` has exactly the ``expected`` keys and shapes."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(state) & set(expected) if tuple(state[k].shape) != tuple(expected[k]))
    if missing or unexpected or wrong:
        details = [f"{name}: {keys[:5]}{' ...' if len(keys) > 5 else ''}" for name, keys in
                   (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if keys]
        raise CheckpointError(f"{where}: weights do not match the model architecture ({'; '.join(details)}); "
                              f"check the model size/overrides in the checkpoint's meta.json")
