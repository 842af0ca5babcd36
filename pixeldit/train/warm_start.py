"""Start a run from the weights of a release folder (``checkpoint.init_from``): fine-tune a model we released or
an imported official one (``python -m pixeldit.release.official_cli import``).

Weights only: the model and its EMA start from the release; the optimizer, the LR schedule and the REPA
projector (not part of a release) start fresh. In the trainer's order:

 1. ``check_init_release(cfg)``, in ``preflight`` (before anything starts): the folder must exist and hold a
    ``config.json`` and its weights file(s), and the release's architecture must equal the run config's
    (``model.size`` + ``model.overrides``) field by field, else one ``ConfigError`` naming the key (and every
    differing field with both values);
 2. ``read_init_weights(cfg)``: the release's tensors in fp32, keys strictly those of the model;
 3. ``build_engine(..., init_state=...)`` loads them into the model before ``deepspeed.initialize`` (so the
    bf16 and partitioned copies DeepSpeed makes hold them) and ``write_fp32_masters`` then writes the exact
    values into the ZeRO fp32 master partitions: DeepSpeed makes its masters from the bf16 module, so an fp32
    release would otherwise start from bf16-rounded weights;
 4. the EMA starts from the same fp32 values (``EMA.load_full``).

Only a run with no checkpoint of its own is initialised: once it has saved one, a restart resumes from
``checkpoints/latest`` (optimizer included) and never reads the release again.

The release folder format is owned by ``pixeldit.release``; this module is the one place training reads it,
through the format modules only (``config``, ``safe_load``, ``key_map``: no deepspeed, nothing of training).
"""
from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from pixeldit.errors import CheckpointError, ConfigError, UserError
from pixeldit.release.config import CONFIG_FILE, ReleaseConfig
from pixeldit.release.key_map import TRAINING_PREFIX, release_to_model
from pixeldit.release.safe_load import SHARD_INDEX, SINGLE_FILE, load_release_weights

from .config import RunConfig
from .zero_partitions import write_full_values, zero_partitions


def check_init_release(cfg: RunConfig) -> ReleaseConfig | None:
    """The release of ``checkpoint.init_from`` (None when unset) after checking its architecture."""
    folder = cfg.checkpoint.init_from
    if not folder:
        return None
    if not os.path.isdir(folder):
        raise ConfigError(f"checkpoint.init_from={folder!r} not found (the run {cfg.run_dir} has no checkpoint of its "
                          f"own yet, so it would start from that release's weights); set it to a release folder "
                          f"(pixeldit-release, or pixeldit-official import) or remove it")
    try:
        release = ReleaseConfig.load(folder)
    except UserError as err:
        raise ConfigError(f"checkpoint.init_from={folder!r}: {err}") from None
    if not any(os.path.isfile(os.path.join(folder, name)) for name in (SINGLE_FILE, SHARD_INDEX)):
        raise ConfigError(f"checkpoint.init_from={folder!r}: neither {SINGLE_FILE} nor {SHARD_INDEX} there: not a "
                          f"complete release folder; re-export it with pixeldit-release")
    saved, wanted = release.args().to_dict(), cfg.model.args().to_dict()
    changed = {k: (saved.get(k), wanted.get(k)) for k in sorted(set(saved) | set(wanted)) if saved.get(k) != wanted.get(k)}
    if changed:
        raise ConfigError(f"checkpoint.init_from={folder}: the release's architecture differs from the run config "
                          f"(field: (release, run config)) {changed}; set model.size and model.overrides to the "
                          f"release's model_args ({folder}/{CONFIG_FILE})")
    return release


def read_init_weights(cfg: RunConfig) -> dict[str, torch.Tensor]:
    """The release's weights as fp32 ``PixelDiT.state_dict()`` tensors; keys and shapes must be the model's."""
    folder = cfg.checkpoint.init_from
    check_init_release(cfg)
    state = {k: v.float() for k, v in release_to_model(load_release_weights(folder)).items()}
    expected = {k: tuple(v.shape) for k, v in _meta_model(cfg).state_dict().items()}
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(state) & set(expected) if tuple(state[k].shape) != expected[k])
    if missing or unexpected or wrong:
        raise CheckpointError(f"checkpoint.init_from={folder}: weights do not match the architecture of its "
                              f"{CONFIG_FILE} (missing {missing[:3]}, unexpected {unexpected[:3]}, wrong shape "
                              f"{wrong[:3]}); re-export the release")
    return state


def _meta_model(cfg: RunConfig) -> nn.Module:
    from pixeldit.models import build_model

    return build_model(cfg.model.args(), device="meta")


@torch.no_grad()
def load_into_model(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy the weights into the freshly built model (strict), before DeepSpeed wraps it."""
    model.load_state_dict(state, strict=True)


def write_fp32_masters(engine: Any, module: nn.Module, state: dict[str, torch.Tensor]) -> int:
    """Write the exact fp32 weights into this rank's ZeRO fp32 master partitions (``module`` is the engine's
    ``TrainModule``: model parameters are ``model.*``); returns the elements written on this rank."""
    names = {id(p): n for n, p in module.named_parameters()}
    values = {TRAINING_PREFIX + k: v for k, v in state.items()}
    parts = zero_partitions(engine.optimizer, names)
    return write_full_values(parts, values)
