"""ODE samplers for the rectified flow, all with one signature.

    sample(model_fn, x, timesteps, progress=False) -> x at timesteps[-1]

``model_fn(x, t) -> v`` with t a (B,) float32 tensor (every sample at the same time); ``timesteps`` a
strictly decreasing 1-D grid from the noise end, e.g. ``flow.time_grid(steps, shift)``; ``x`` the state at
``timesteps[0]`` (pure noise at t = 1). Time convention: ``pixeldit.diffusion.flow`` (t = 1 noise, t = 0
data, v = noise - x0). Classifier-free guidance is a wrapper around ``model_fn`` (``guidance.py``).
``SAMPLERS`` is the one list of sampler names (CLIs, release defaults and the run config read it);
``model_calls(name, steps)`` counts model calls, ``SAMPLER_ORDER`` holds the orders the tests assert.

- ``euler``: first order, one model call per step.
- ``heun``: second order (explicit trapezoid), two model calls per step, except a last step that ends at
  t = 0: there it is an Euler step (one call), as in EDM. The correction would evaluate the model at
  t = 0 itself, where for data on a low-dimensional set the learnt velocity has no smooth limit; the
  last step's O(h^2) local error keeps the global order 2. (On the Gaussian-mixture check, whose
  velocity is smooth up to t = 0, the dropped correction was worth its call: 8 steps at shift 1, 7.4e-3
  with it (16 calls) vs 1.5e-2 without (15 calls).)
- ``flow_dpm``: FlowDPM-Solver, a second-order multistep exponential integrator of the DPM-Solver++(2M)
  family written in the flow's own time, one model call per step (only the first step is first order).
- ``flow_unipc``: third-order predictor-corrector of the UniPC family in the same form as FlowDPM-Solver,
  one model call per step.

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

Both forms are one equation in a variable a (a = t in the data form, a = 1 - t in the noise form, e the
data resp. noise estimate): dx/da = (x - e(a)) / a, whose exact solution over [a, a_n] is

    x_n = (a_n / a) x - a_n * integral_a^a_n e(s) / s^2 ds.

With e interpolated by a polynomial through estimates at earlier (or later) times, the integral is a
weighted sum of those estimates (``_step_weights``: Lagrange basis in powers of (s - a) times the
closed-form moments ``_moment``), so any order is one linear combination of stored tensors.

FlowUniPC (``flow_unipc``). Each step t -> t_n: (predictor) the estimate is the quadratic through the
last three estimates (an exponential Adams-Bashforth step, local error O(h^4)); the model is called once
at the predicted point; (corrector) the step is redone from x with the cubic through that new estimate
and the last three (an Adams-Moulton step, local error O(h^5)). The estimate at the predicted point is
kept as the next step's history, so every step costs one model call (UniPC's structure; the
interpolation is in t, the forms split at t = 1/2 as in FlowDPM). The first steps use the estimates
there are (orders 1 -> 2 -> 3); the last step has no corrector (it would cost a call at t = 0) and a
linear predictor: a quadratic extrapolated over the last, largest step to t = 0 was worse at 8 and 16
steps. The last step's O(h^3) local error makes the global order 3 (4 inside). Gaussian-mixture check,
shift 1 (``tools/BENCHMARKS.md``): fitted order 3.2 over 8-256 calls (3.0 asymptotically), at 16 model
calls 5.3x below FlowDPM, below it at every budget from 8 to 256 calls at shifts 1 and 3. Rejected
variants (same check, 8/16/32 steps): predictor order 2 + corrector order 3 (UniPC-2: 2.2e-3 at 16
calls, only 2x below FlowDPM); predictor order 3 without corrector (order 1.9: its first-order first
step is never corrected); the quadratic last step (2x worse at 8 steps, and worse than FlowDPM at 8
steps, shift 3); the next step's estimate refreshed at the corrected state with the predicted velocity (better
at shift 1, worse than FlowDPM at 8 steps, shift 3). Under classifier-free guidance (scale 4 and 7.5,
``python -m tools.sampler_order --cfg-scale S``) it is 8-50x more accurate than FlowDPM from 16 calls and
on par at 8, but at 6 calls or fewer the extrapolation amplifies the stiff guided field: 2-10x worse than
FlowDPM there (Euler is the most accurate at such budgets).
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
    """Explicit trapezoid: Euler predictor, average of the two slopes; a last step to t = 0 is Euler only."""
    for t, t_next in _steps(timesteps, progress, "heun"):
        h = t_next - t
        v = model_fn(x, _t(t, x))
        if t_next == 0:  # no correction at the data end (module docstring)
            x = x + h * v
            break
        v_next = model_fn(x + h * v, _t(t_next, x))
        x = x + 0.5 * h * (v + v_next)
    return x


def _moment(k: int, a: float, a_next: float) -> float:
    """-a_n * integral_a^a_n (s - a)^k / s^2 ds, in closed form (finite at a_n = 0; a > 0).

    Expanding (s - a)^k = sum_j C(k, j) s^j (-a)^(k - j), the j = 0 term integrates to 1/a - 1/a_n, j = 1
    to log(a_n / a), j >= 2 to (a_n^(j-1) - a^(j-1)) / (j - 1). k = 0: 1 - a_n / a; k = 1: the FlowDPM
    coefficient a_n log(a / a_n) - (a - a_n). The terms cancel to O(h^(k+1)); in float64 the absolute
    error stays ~1e-16 a^k, far below the solver's.
    """
    total = 0.0
    for j in range(k + 1):
        if j == 0:
            term = 1.0 - a_next / a
        elif j == 1:
            term = -a_next * math.log(a_next / a) if a_next > 0 else 0.0
        else:
            term = -a_next * (a_next ** (j - 1) - a ** (j - 1)) / (j - 1)
        total += math.comb(k, j) * (-a) ** (k - j) * term
    return total


def _step_weights(nodes: list[float], a: float, a_next: float) -> list[float]:
    """Weights b_j with -a_n * integral_a^a_n P(s) / s^2 ds = sum_j b_j P(nodes[j]) for every polynomial P
    of degree < len(nodes): b_j = sum_k _moment(k) * [(s - a)^k] L_j, L_j the Lagrange basis of the nodes."""
    weights = []
    for j, aj in enumerate(nodes):
        poly = [1.0]  # coefficients of L_j in powers of y = s - a
        for m, am in enumerate(nodes):
            if m == j:
                continue
            # multiply by (s - a_m) / (a_j - a_m) = (y + a - a_m) / (a_j - a_m)
            shifted = [0.0] + poly
            for i, c in enumerate(poly):
                shifted[i] += c * (a - am)
            poly = [c / (aj - am) for c in shifted]
        weights.append(sum(c * _moment(k, a, a_next) for k, c in enumerate(poly)))
    return weights


def _exp_step(x: torch.Tensor, history: list[tuple[float, torch.Tensor, torch.Tensor]], t: float,
              t_next: float) -> torch.Tensor:
    """One exponential-integrator step t -> t_next with the estimate interpolated through ``history``
    ([(time, x0, eps)], any order): the data form on the noise half (t >= 1/2), the noise form below."""
    if 0.5 * (t + t_next) >= 0.5:  # data form, a = t (t > 0 on this half)
        a, a_next, which = t, t_next, 1
        nodes = [s for s, _, _ in history]
    else:  # noise form, a = 1 - t (t < 1 on this half)
        a, a_next, which = 1.0 - t, 1.0 - t_next, 2
        nodes = [1.0 - s for s, _, _ in history]
    x_next = (a_next / a) * x
    for w, entry in zip(_step_weights(nodes, a, a_next), history):
        x_next = x_next + w * entry[which]
    return x_next


def _estimates(x: torch.Tensor, v: torch.Tensor, t: float) -> tuple[float, torch.Tensor, torch.Tensor]:
    return t, x0_from_velocity(x, v, t), noise_from_velocity(x, v, t)


@torch.no_grad()
def flow_dpm(model_fn: ModelFn, x: torch.Tensor, timesteps: torch.Tensor, progress: bool = False) -> torch.Tensor:
    """FlowDPM-Solver (module docstring): one model call per step, second order from the second step."""
    history: list[tuple[float, torch.Tensor, torch.Tensor]] = []  # (t, x0, eps), newest last
    for t, t_next in _steps(timesteps, progress, "flow_dpm"):
        history = history[-1:] + [_estimates(x, model_fn(x, _t(t, x)), t)]
        x = _exp_step(x, history, t, t_next)  # the estimate linear in t through this and the previous step
    return x


@torch.no_grad()
def flow_unipc(model_fn: ModelFn, x: torch.Tensor, timesteps: torch.Tensor, progress: bool = False) -> torch.Tensor:
    """FlowUniPC (module docstring): predictor order 3, corrector order 4, one model call per step; third
    order overall (the last step, to t = 0 without a corrector, is second order)."""
    n = len(timesteps) - 1
    history: list[tuple[float, torch.Tensor, torch.Tensor]] = []  # (t, x0, eps), newest last
    for i, (t, t_next) in enumerate(_steps(timesteps, progress, "flow_unipc")):
        if not history:
            history = [_estimates(x, model_fn(x, _t(t, x)), t)]
        if i == n - 1:  # last step: linear predictor, no corrector
            x = _exp_step(x, history[-2:], t, t_next)
            break
        x_pred = _exp_step(x, history[-3:], t, t_next)  # (B, ...)
        history = history[-3:] + [_estimates(x_pred, model_fn(x_pred, _t(t_next, x)), t_next)]
        x = _exp_step(x, history, t, t_next)  # corrector through the new estimate and up to three before
    return x


SAMPLERS: dict[str, Sampler] = {"euler": euler, "heun": heun, "flow_dpm": flow_dpm, "flow_unipc": flow_unipc}
SamplerName = Literal[tuple(SAMPLERS)]  # the names of SAMPLERS as a type (run config: logging.image_sampler)
SAMPLER_ORDER: dict[str, int] = {"euler": 1, "heun": 2, "flow_dpm": 2, "flow_unipc": 3}  # expected convergence order
_CALLS_PER_STEP: dict[str, int] = {"euler": 1, "heun": 2, "flow_dpm": 1, "flow_unipc": 1}


def model_calls(name: str, steps: int, to_zero: bool = True) -> int:
    """Model calls of sampler ``name`` over ``steps`` steps (a grid ending at t = 0 unless ``to_zero`` is
    False: Heun then also corrects its last step)."""
    get_sampler(name)
    return _CALLS_PER_STEP[name] * steps - (1 if name == "heun" and to_zero else 0)


def get_sampler(name: str) -> Sampler:
    """The sampler called ``name``; ValueError listing the valid names otherwise."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; valid samplers: {', '.join(SAMPLERS)}")
    return SAMPLERS[name]
