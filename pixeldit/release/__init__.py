"""Release folders: write them from training checkpoints, load them with no pickle, no deepspeed and no GPU.

    model, config = from_pretrained("releases/pixeldit-t2i")
    encoder = load_text_encoder(config)            # text-to-image; text_encoder_path=PATH for a local copy
    images = generate(model, cond, null_cond, noise=noise, **config.sampler.generate_kwargs())

A release folder holds ``config.json`` (``ReleaseConfig``: architecture from the size table, training
resolution and curriculum stage, text encoder name and system prompt, sampler defaults), ``model.safetensors``
(or ``model-0000k-of-0000n.safetensors`` shards listed by ``model.safetensors.index.json``, the Hugging Face
layout) and a model card ``README.md``. Weights are read with safetensors only (``safe_load``).

Modules (this package imports nothing from ``pixeldit.train``; only ``zero`` uses deepspeed, lazily):
  config     ReleaseConfig, SamplerDefaults, default_sampler, WEIGHTS, DTYPES: the one definition of each
  reader     from_pretrained, load_text_encoder          safe_load   safetensors / weights-only loading
  writer     save_release (atomic folder, shards, card)   key_map     training keys <-> release keys
  zero       ZeRO partitions -> full weights; universal checkpoints
  export     training checkpoint -> release (export_release) or model (load_training_model)
  cli        pixeldit-release                             sample      pixeldit-sample
The training run folder and checkpoint format is ``pixeldit.run_folder``.
"""
from __future__ import annotations

from .config import CONFIG_FILE, DTYPES, WEIGHTS, ReleaseConfig, SamplerDefaults, default_sampler
from .reader import from_pretrained, load_text_encoder
from .safe_load import SHARD_INDEX, SINGLE_FILE, UnsafeCheckpointError, load_release_weights, safe_load

__all__ = ["from_pretrained", "load_text_encoder", "ReleaseConfig", "SamplerDefaults", "default_sampler",
           "safe_load", "load_release_weights", "UnsafeCheckpointError", "CONFIG_FILE", "SHARD_INDEX",
           "SINGLE_FILE", "DTYPES", "WEIGHTS"]
