"""ODE samplers for the rectified flow, all with one signature.

    sample(model_fn, x, timesteps, progress=False) -> x at timesteps[-1]

``model_fn(x, t) -> v`` with t a (B,) tensor; ``timesteps`` a decreasing 1-D grid from the noise end,
e.g. ``flow.time_grid(steps, shift)``; ``x`` the state at ``timesteps[0]`` (pure noise at t = 1).
Time convention: see ``pixeldit.diffusion.flow`` (t = 1 noise, t = 0 data).

- ``euler``: first order, one model call per step.
- ``heun``: second order (explicit trapezoid), two calls per step.
- ``flow_dpm``: FlowDPM-Solver, a second-order multistep DPM-Solver++ (2M) for the flow path
  x_t = alpha_t x0 + sigma_t eps with alpha_t = 1 - t, sigma_t = t. The velocity is converted to a data
  estimate x0 = x_t - t v; the linear part of the ODE is integrated exactly in log-SNR
  lambda = log(alpha / sigma) (x_n = sigma_n/sigma_t x_t + sigma_n * int e^lambda x0(lambda) dlambda) and
  x0 is extrapolated linearly through the previous step's estimate. DPM-Solver++ makes x0 linear in
  lambda; lambda is infinite at both ends of the flow (t = 1 and t = 0), where those steps never shrink
  and the order degrades to h^2 log(1/h), so here x0 is linear in t, for which the integral has the
  closed form sigma_n * int e^lambda t(lambda) dlambda = sigma_n log(t / t_n), finite up to t_n = 0.
  One model call per step; only the first step is first order.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from tqdm.auto import tqdm

from .flow import x0_from_velocity

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _t(batch: int, value: float, like: torch.Tensor) -> torch.Tensor:
    return torch.full((batch,), float(value), device=like.device, dtype=torch.float32)


def _steps(timesteps: torch.Tensor, progress: bool, name: str):
    ts = [float(t) for t in timesteps]
    if len(ts) < 2 or any(b >= a for a, b in zip(ts, ts[1:])):
        raise ValueError(f"{name}: timesteps must be a strictly decreasing grid of >= 2 times, got {ts[:5]}...")
    pairs = list(zip(ts[:-1], ts[1:]))
    return tqdm(pairs, desc=name, disable=not progress, leave=False)


@torch.no_grad()
def euler(model_fn: ModelFn, x: torch.Tensor, timesteps: torch.Tensor, progress: bool = False) -> torch.Tensor:
    B = x.shape[0]
    for t, t_next in _steps(timesteps, progress, "euler"):
        x = x + (t_next - t) * model_fn(x, _t(B, t, x))
    return x


@torch.no_grad()
def heun(model_fn: ModelFn, x: torch.Tensor, timesteps: torch.Tensor, progress: bool = False) -> torch.Tensor:
    B = x.shape[0]
    for t, t_next in _steps(timesteps, progress, "heun"):
        h = t_next - t
        v = model_fn(x, _t(B, t, x))
        x_pred = x + h * v
        v_next = model_fn(x_pred, _t(B, t_next, x))
        x = x + 0.5 * h * (v + v_next)
    return x


@torch.no_grad()
def flow_dpm(model_fn: ModelFn, x: torch.Tensor, timesteps: torch.Tensor, progress: bool = False) -> torch.Tensor:
    B = x.shape[0]
    prev_x0, prev_t = None, None
    for t, t_next in _steps(timesteps, progress, "flow_dpm"):
        x0 = x0_from_velocity(x, model_fn(x, _t(B, t, x)), t)  # data estimate at t
        alpha_t, sigma_t = 1.0 - t, t
        alpha_n, sigma_n = 1.0 - t_next, t_next
        # exact integral of the linear part: x_n = (sigma_n/sigma_t) x + sigma_n * int e^lambda x0(lambda) dlambda
        c0 = alpha_n - alpha_t * sigma_n / sigma_t  # sigma_n * int e^lambda dlambda
        x = (sigma_n / sigma_t) * x + c0 * x0
        if prev_x0 is not None:  # second order: x0 linear in t through the previous estimate
            slope = (x0 - prev_x0) / (t - prev_t)
            log_term = sigma_n * math.log(t / t_next) if t_next > 0 else 0.0  # sigma_n log(t/t_n) -> 0 at t_n = 0
            c1 = log_term - t * c0  # sigma_n * int e^lambda (t(lambda) - t) dlambda
            x = x + c1 * slope
        prev_x0, prev_t = x0, t
    return x


SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {"euler": euler, "heun": heun, "flow_dpm": flow_dpm}
SAMPLER_ORDER = {"euler": 1, "heun": 2, "flow_dpm": 2}


def get_sampler(name: str) -> Callable[..., torch.Tensor]:
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; valid samplers: {', '.join(SAMPLERS)}")
    return SAMPLERS[name]
