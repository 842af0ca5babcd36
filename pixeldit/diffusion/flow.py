"""Rectified flow in pixel space: the one place that states the time convention.

TIME CONVENTION (used everywhere in this package, the samplers and the guidance interval included):

    x_t = (1 - t) * x0 + t * noise,      t in [0, 1],  t = 0 is data, t = 1 is pure Gaussian noise
    v   = dx_t/dt = noise - x0           (the network predicts v)

Sampling integrates dx/dt = v(x, t) from t = 1 (noise) down to t = 0 (data). Images are float in [-1, 1].
From a velocity the two estimates of the path's ends are x0 = x_t - t v and noise = x_t + (1 - t) v.

Resolution shift (SD3/Sana): t' = s t / (1 + (s - 1) t) moves timesteps towards the noise end (s > 1),
needed at high resolution where more pixels keep more signal at the same t. Used for training-time
timestep sampling and for the sampling time grid alike (``RESOLUTION_SHIFT``: 1.0 at 256, 3.0 at 512,
4.0 at 1024 for text-to-image; every run config sets its own).
"""
from __future__ import annotations

import torch

# Default shift per base resolution for text-to-image (Sana/SD3 style); class-conditional 256 uses 1.0.
RESOLUTION_SHIFT: dict[int, float] = {256: 1.0, 512: 3.0, 1024: 4.0}


def _expand(t: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor | float:
    """A per-sample time (B,) viewed as (B, 1, ..., 1) to broadcast over ``like``; floats pass through."""
    if not torch.is_tensor(t):
        return t
    return t.reshape(-1, *([1] * (like.dim() - 1))).to(like.dtype)


def shift_time(t: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3 resolution shift t -> s t / (1 + (s - 1) t); identity for s = 1; keeps 0 and 1 fixed."""
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    return shift * t / (1 + (shift - 1) * t)


def interpolate(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - t) x0 + t noise; x0, noise (B, C, H, W), t (B,)."""
    t = _expand(t, x0)
    return (1 - t) * x0 + t * noise  # (B, C, H, W)


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The velocity of the straight path from x0 (t = 0) to noise (t = 1)."""
    return noise - x0


def x0_from_velocity(x_t: torch.Tensor, v: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
    """Data estimate x0 = x_t - t v; t a float or (B,)."""
    return x_t - _expand(t, x_t) * v


def noise_from_velocity(x_t: torch.Tensor, v: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
    """Noise estimate eps = x_t + (1 - t) v; t a float or (B,)."""
    return x_t + (1 - _expand(t, x_t)) * v


def sample_timesteps(
    batch: int, mean: float = 0.0, std: float = 1.0, shift: float = 1.0,
    generator: torch.Generator | None = None, device: torch.device | str | None = None,
) -> torch.Tensor:
    """Training timesteps (batch,): logit-normal t = sigmoid(N(mean, std)), then the resolution shift.

    ``device`` defaults to the generator's device so a CUDA generator draws on the GPU.
    """
    if std <= 0:
        raise ValueError(f"logit-normal std must be > 0, got {std}")
    if device is None and generator is not None:
        device = generator.device
    u = torch.randn(batch, generator=generator, device=device) * std + mean  # (B,)
    return shift_time(torch.sigmoid(u), shift)


def time_grid(steps: int, shift: float = 1.0, t_start: float = 1.0, t_end: float = 0.0,
              device: torch.device | str | None = None) -> torch.Tensor:
    """Sampling grid: ``steps + 1`` decreasing float64 times from t_start (noise) to t_end (data), each
    uniform point passed through ``shift_time`` (for shift > 1 the steps crowd towards the noise end)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if not 0.0 <= t_end < t_start <= 1.0:
        raise ValueError(f"time grid needs 0 <= t_end < t_start <= 1, got t_start={t_start}, t_end={t_end}")
    u = torch.linspace(t_start, t_end, steps + 1, dtype=torch.float64, device=device)
    return shift_time(u, shift)


def flow_matching_loss(v_pred: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Velocity-matching loss: mean squared error to noise - x0 over all elements (in float32)."""
    return (v_pred.float() - velocity_target(x0, noise).float()).square().mean()
