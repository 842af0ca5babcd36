"""Flow maths between the model and the trainer: rectified flow, objective, REPA loss, samplers, guidance, generate.

The frozen networks that make conditions (text encoder, caption-embedding cache, DINOv2 teacher) are in
``pixeldit.conditioning``.

Time convention (``flow.py``): x_t = (1 - t) x0 + t noise, t = 0 data, t = 1 noise, v = noise - x0;
samplers integrate from t = 1 to t = 0.
"""
from .flow import RESOLUTION_SHIFT, sample_timesteps, shift_time, time_grid
from .generate import generate, image_grid, initial_noise, to_uint8
from .guidance import cfg_model_fn
from .objective import ObjectiveConfig, compute_loss
from .repa import REPAProjector, repa_loss
from .samplers import SAMPLERS, get_sampler

__all__ = [
    "RESOLUTION_SHIFT", "sample_timesteps", "shift_time", "time_grid", "generate", "image_grid", "initial_noise", "to_uint8",
    "cfg_model_fn",
    "ObjectiveConfig", "compute_loss", "REPAProjector", "repa_loss", "SAMPLERS", "get_sampler",
]
