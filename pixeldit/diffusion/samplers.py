"""ODE samplers for the rectified flow, all with one signature.

    sample(model_fn, x, timesteps, progress=False) -> x at timesteps[-1]

``model_fn(x, t) -> v`` with t a (B,) float32 tensor (every sample at the same time); ``timesteps`` a
strictly decreasing 1-D grid from the noise end, e.g. ``flow.time_grid(steps, shift)``; ``x`` the state at
``timesteps[0]`` (pure noise at t = 1). Time convention: ``pixeldit.diffusion.flow`` (t = 1 noise, t = 0
data, v = noise - x0). Classifier-free guidance is a wrapper around ``model_fn`` (``guidance.py``).

- ``euler``: first order, one model call per step.
- ``heun``: second order (explicit trapezoid), two model calls per step.
- ``flow_dpm``: FlowDPM-Solver, a second-order multistep exponential integrator of the DPM-Solver++(2M)
  family written in the flow's own time, one model call per step (only the first step is first order).

FlowDPM-Solver. The velocity is converted to a data estimate x0 = x - t v and a noise estimate
eps = x + (1 - t) v; the ODE is semi-linear in both forms,

    dx/dt = (x - x0(t)) / t          (data form,  DPM-Solver++)
    dx/dt = (eps(t) - x) / (1 - t)   (noise form, DPM-Solver),

and a step integrates the linear part exactly and the estimate as a line in t through the current and
the previous step's estimates (variation of constants; closed forms below). The data form is used on the
noise half of the path (t >= 1/2) and the noise form on the data half: each form's kernel (t_n / s^2,
resp. (1 - t_n) / (1 - s)^2) stays bounded on its half. Rejected designs, measured on the
Gaussian-mixture check (``python -m tools.sampler_order --ablations``, shifts 1 and 3): the textbook
DPM-Solver++(2M), data form everywhere with the estimate linear in log-SNR lambda = log((1 - t) / t),
has lambda infinite at both ends of the flow, where steps never shrink in lambda (fitted order
1.55-1.57); the data form everywhere, linear in t, has an unbounded kernel near t = 0 and converges
like h^2 log(1/h) (1.79-1.87). This split converges at order 1.98-2.01 with 1.2-10x smaller errors.
Under strong guidance (scale >= 4) the guided field is stiff: below ~15 steps no second-order multistep
variant tried was reliable on the same check; from 25 steps this one was the most accurate.
"""
from __future__ import annotations

import math
from typing import Callable, Iterator, Literal

import torch
from tqdm.auto import tqdm

from .flow import noise_from_velocity, x0_from_velocity

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Sampler = Callable[..., torch.Tensor]


def _t(value: float, like: torch.Tensor) -> torch.Tensor:
    """The model's time input: (B,) float32 on ``like``'s device."""
    return torch.full((like.shape[0],), float(value), device=like.device, dtype=torch.float32)


def _steps(timesteps: torch.Tensor, progress: bool, name: str) -> Iterator[tuple[float, float]]:
    ts = [float(t) for t in timesteps]
    if len(ts) < 2 or any(b >= a for a, b in zip(ts, ts[1:])) or ts[0] > 1 or ts[-1] < 0:
        raise ValueError(f"{name}: timesteps must be a strictly decreasing grid of >= 2 times in [0, 1] from the "
                         f"noise end (use flow.time_grid(steps, shift)), got {ts[:4]}{'...' if len(ts) > 4 else ''}")
    return iter(tqdm(list(zip(ts[:-1], ts[1:])), desc=name, disable=not progress, leave=False))


@torch.no_grad()
def euler(model_fn: ModelFn, x: torch.Tensor, timesteps: torch.Tensor, progress: bool = False) -> torch.Tensor:
    """x_n = x + (t_n - t) v(x, t). x: (B, ...) at timesteps[0] -> (B, ...) at timesteps[-1]."""
    for t, t_next in _steps(timesteps, progress, "euler"):
        x = x + (t_next - t) * model_fn(x, _t(t, x))
    return x


@torch.no_grad()
def heun(model_fn: ModelFn, x: torch.Tensor, timesteps: torch.Tensor, progress: bool = False) -> torch.Tensor:
    """Explicit trapezoid: Euler predictor, average of the two slopes. Two model calls per step."""
    for t, t_next in _steps(timesteps, progress, "heun"):
        h = t_next - t
        v = model_fn(x, _t(t, x))
        v_next = model_fn(x + h * v, _t(t_next, x))
        x = x + 0.5 * h * (v + v_next)
    return x


def _data_form_step(x, x0, slope, t: float, t_next: float) -> torch.Tensor:
    """Exact solution of dx/dt = (x - x0(s)) / s over [t, t_next] for x0(s) = x0 + slope (s - t).

    x_n = (t_n/t) x + (1 - t_n/t) x0 + c1 slope,  c1 = t_n log(t/t_n) - (t - t_n)  (c1 -> -t at t_n = 0).
    """
    x_next = (t_next / t) * x + (1 - t_next / t) * x0
    if slope is not None:
        log_term = t_next * math.log(t / t_next) if t_next > 0 else 0.0
        x_next = x_next + (log_term - (t - t_next)) * slope
    return x_next


def _noise_form_step(x, eps, slope, t: float, t_next: float) -> torch.Tensor:
    """Exact solution of dx/dt = (eps(s) - x) / (1 - s) over [t, t_next] for eps(s) = eps + slope (s - t).

    With u = 1 - t: x_n = (u_n/u) x + (1 - u_n/u) eps + c1 slope,  c1 = (u - u_n) + u_n log(u_n/u).
    """
    u, u_next = 1.0 - t, 1.0 - t_next
    x_next = (u_next / u) * x + (1 - u_next / u) * eps
    if slope is not None:
        x_next = x_next + ((u - u_next) + u_next * math.log(u_next / u)) * slope
    return x_next


@torch.no_grad()
def flow_dpm(model_fn: ModelFn, x: torch.Tensor, timesteps: torch.Tensor, progress: bool = False) -> torch.Tensor:
    """FlowDPM-Solver (module docstring): one model call per step, second order from the second step."""
    prev: tuple[float, torch.Tensor, torch.Tensor] | None = None  # (t, x0, eps) of the previous step
    for t, t_next in _steps(timesteps, progress, "flow_dpm"):
        v = model_fn(x, _t(t, x))  # (B, ...)
        x0, eps = x0_from_velocity(x, v, t), noise_from_velocity(x, v, t)
        if 0.5 * (t + t_next) >= 0.5:  # noise half: data form (t > 0 on this half)
            slope = (x0 - prev[1]) / (t - prev[0]) if prev is not None else None
            x_next = _data_form_step(x, x0, slope, t, t_next)
        else:  # data half: noise form (t < 1 on this half)
            slope = (eps - prev[2]) / (t - prev[0]) if prev is not None else None
            x_next = _noise_form_step(x, eps, slope, t, t_next)
        prev, x = (t, x0, eps), x_next
    return x


SAMPLERS: dict[str, Sampler] = {"euler": euler, "heun": heun, "flow_dpm": flow_dpm}
SamplerName = Literal[tuple(SAMPLERS)]  # the names of SAMPLERS as a type (run config: logging.image_sampler)
SAMPLER_ORDER: dict[str, int] = {"euler": 1, "heun": 2, "flow_dpm": 2}  # expected convergence order
MODEL_CALLS_PER_STEP: dict[str, int] = {"euler": 1, "heun": 2, "flow_dpm": 1}


def get_sampler(name: str) -> Sampler:
    """The sampler called ``name``; ValueError listing the valid names otherwise."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; valid samplers: {', '.join(SAMPLERS)}")
    return SAMPLERS[name]
