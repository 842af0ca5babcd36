"""Rectified flow in pixel space: the one place that states the time convention.

TIME CONVENTION (used everywhere in this package):

    x_t = (1 - t) * x0 + t * noise,      t in [0, 1],  t = 0 is data, t = 1 is pure Gaussian noise
    v   = dx_t/dt = noise - x0           (the network predicts v)

Sampling integrates dx/dt = v(x, t) from t = 1 (noise) down to t = 0 (data). Images are float in [-1, 1].

Resolution shift (SD3/Sana): t' = s t / (1 + (s - 1) t) moves timesteps towards the noise end (s > 1),
needed at high resolution where more pixels keep more signal at the same t. Used for training-time
timestep sampling and for the sampling time grid alike (1.0 at 256, 3.0 at 512, 4.0 at 1024 for T2I).
"""
from __future__ import annotations

import torch


def shift_time(t: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3 resolution shift t -> s t / (1 + (s - 1) t); identity for s = 1; keeps 0 and 1 fixed."""
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    return shift * t / (1 + (shift - 1) * t)


def interpolate(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - t) x0 + t noise, t (B,) broadcast over the image dims."""
    t = t.view(-1, *([1] * (x0.dim() - 1))).to(x0.dtype)
    return (1 - t) * x0 + t * noise  # (B, C, H, W)


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The velocity of the straight path from x0 to noise."""
    return noise - x0


def x0_from_velocity(x_t: torch.Tensor, v: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
    """Data estimate x0 = x_t - t v."""
    t = t.view(-1, *([1] * (x_t.dim() - 1))) if torch.is_tensor(t) else t
    return x_t - t * v


def noise_from_velocity(x_t: torch.Tensor, v: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
    """Noise estimate eps = x_t + (1 - t) v."""
    t = t.view(-1, *([1] * (x_t.dim() - 1))) if torch.is_tensor(t) else t
    return x_t + (1 - t) * v


def sample_timesteps(
    batch: int, mean: float = 0.0, std: float = 1.0, shift: float = 1.0,
    generator: torch.Generator | None = None, device: torch.device | str | None = None,
) -> torch.Tensor:
    """Logit-normal timesteps t = sigmoid(N(mean, std)) followed by the resolution shift: (batch,)."""
    u = torch.randn(batch, generator=generator, device=device) * std + mean
    return shift_time(torch.sigmoid(u), shift)


def time_grid(steps: int, shift: float = 1.0, t_start: float = 1.0, t_end: float = 0.0,
              device: torch.device | str | None = None) -> torch.Tensor:
    """Sampling grid of ``steps + 1`` decreasing times from t_start (noise) to t_end (data), shifted."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    u = torch.linspace(t_start, t_end, steps + 1, dtype=torch.float64, device=device)
    return shift_time(u, shift)


def flow_matching_loss(v_pred: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Velocity-matching loss: mean squared error to noise - x0 (computed in float32)."""
    return (v_pred.float() - velocity_target(x0, noise).float()).square().mean()
