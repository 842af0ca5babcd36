"""Everything between the model and the trainer: rectified flow, REPA, text encoder, samplers, guidance.

Time convention (``flow.py``): x_t = (1 - t) x0 + t noise, t = 0 data, t = 1 noise, v = noise - x0;
samplers integrate from t = 1 to t = 0.
"""
from .flow import RESOLUTION_SHIFT, sample_timesteps, shift_time, time_grid
from .generate import generate, image_grid, initial_noise
from .guidance import cfg_model_fn
from .objective import ObjectiveConfig, compute_loss
from .repa import DinoV2Teacher, REPAProjector, repa_loss
from .samplers import SAMPLERS, get_sampler
from .text_cache import TextEmbeddingCache, precompute_text_embeddings
from .text_encoder import (DEFAULT_SYSTEM_PROMPT, OFFICIAL_SYSTEM_PROMPT, SYSTEM_PROMPTS, TextEncoder,
                           resolve_system_prompt)

__all__ = [
    "RESOLUTION_SHIFT", "sample_timesteps", "shift_time", "time_grid", "generate", "image_grid", "initial_noise",
    "cfg_model_fn",
    "ObjectiveConfig", "compute_loss", "DinoV2Teacher", "REPAProjector", "repa_loss", "SAMPLERS", "get_sampler",
    "TextEmbeddingCache", "precompute_text_embeddings", "TextEncoder", "DEFAULT_SYSTEM_PROMPT",
    "OFFICIAL_SYSTEM_PROMPT", "SYSTEM_PROMPTS", "resolve_system_prompt",
]
