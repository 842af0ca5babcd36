"""Load a release folder: the model (``from_pretrained``) and its text encoder (``load_text_encoder``).

No pickle, no deepspeed, no GPU: ``config.json`` gives the architecture (checked against the size table),
the safetensors weights are loaded strictly. The text encoder is recorded by name; ``locate_text_encoder``
turns the name into a local folder: an explicit ``text_encoder_path`` first, else the name itself when it is
a folder here (releases written with an absolute path), else the Hugging Face cache (offline: nothing is
downloaded).
"""
from __future__ import annotations

import os

import torch

from pixeldit.conditioning import TextEncoder
from pixeldit.errors import CheckpointError, ConfigError
from pixeldit.models import PixelDiT, build_model

from .config import CONFIG_FILE, ReleaseConfig
from .key_map import release_to_model
from .safe_load import load_release_weights

TEXT_ENCODER_FLAG = "--text-encoder"


def from_pretrained(folder: str | os.PathLike, dtype: torch.dtype = torch.float32,
                    device: str | torch.device = "cpu") -> tuple[PixelDiT, ReleaseConfig]:
    """Build the model from ``config.json`` and load the safetensors weights strictly; returns it in eval mode."""
    config = ReleaseConfig.load(folder)
    model = build_model(config.args())
    state = release_to_model(load_release_weights(folder))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"{folder}: the weights do not match the architecture in {CONFIG_FILE}: "
                              f"{' '.join(str(err).split())}; re-export the release with pixeldit-release") from None
    return model.to(device=device, dtype=dtype).eval(), config


def locate_text_encoder(name: str, text_encoder_path: str | os.PathLike | None = None) -> str:
    """A local folder holding the text encoder ``name`` (see the module docstring for the order)."""
    if text_encoder_path:
        return os.fspath(text_encoder_path)
    if not name:
        raise ConfigError(f"this model's {CONFIG_FILE} names no text encoder (key text_encoder): pass "
                          f"{TEXT_ENCODER_FLAG} PATH (Python: text_encoder_path=PATH), a local transformers folder")
    if os.path.isdir(name):
        return name
    cached = _hub_cache_folder(name)
    if cached is None:
        raise ConfigError(f"text encoder {name!r} (key text_encoder of the model's {CONFIG_FILE}) is neither a "
                          f"local folder nor in the Hugging Face cache, and nothing is downloaded here: pass "
                          f"{TEXT_ENCODER_FLAG} PATH (Python: text_encoder_path=PATH) with a local copy of it")
    return cached


def _hub_cache_folder(name: str) -> str | None:
    """The cached snapshot folder of the Hugging Face repo ``name``, or None (never downloads)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return snapshot_download(name, local_files_only=True)
    except (LocalEntryNotFoundError, HFValidationError):
        return None


def load_text_encoder(config: ReleaseConfig, text_encoder_path: str | os.PathLike | None = None,
                      device: str | torch.device = "cpu") -> TextEncoder:
    """The text encoder a text-to-image release was trained with (its system prompt and token length)."""
    args = config.args()
    path = locate_text_encoder(config.text_encoder, text_encoder_path)
    encoder = TextEncoder.from_pretrained(path, system_prompt=config.system_prompt, max_length=args.text_len,
                                          device=device, keep_padding_states=args.text_padding == "unmasked")
    if encoder.dim != args.text_dim:
        raise ConfigError(f"text encoder {path} has width {encoder.dim}, the model expects {args.text_dim}: pass "
                          f"{TEXT_ENCODER_FLAG} PATH with the encoder the model was trained with "
                          f"({config.text_encoder or 'not recorded'})")
    return encoder
