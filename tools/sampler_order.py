"""Measure each sampler's order of convergence on a flow whose exact velocity is known in closed form.

    python -m tools.sampler_order [--calls 8 16 32 64 128 256] [--points 512] [--shift 1 3] [--ablations]
                                  [--cfg-scale S]

Data: a 2-D Gaussian mixture (3 components, std 0.5, unequal weights). Under the linear path
x_t = (1 - t) x0 + t eps (``pixeldit.diffusion.flow``), component k of x_t is N((1 - t) mu_k, V_k(t) I)
with V_k = (1 - t)^2 s_k^2 + t^2, and the exact velocity E[eps - x0 | x_t] is the posterior-weighted sum
of the per-component fields ((t - (1 - t) s_k^2) / V_k) (x - (1 - t) mu_k) - mu_k. For each starting noise
the reference endpoint (t = 0) is a fine classical RK4 solve (2048 uniform steps; its own error is
< 1e-10, far below the samplers' errors); a sampler's error is the mean distance of its endpoint to the
reference, and its order the least-squares slope of log error against log model calls. Samplers are
compared at equal model calls: each gets the most steps whose calls fit the budget
(``pixeldit.diffusion.samplers.model_calls``; Heun's last step to t = 0 costs one call, so at an even
budget N it runs N / 2 steps = N - 1 calls). ``--cfg-scale S`` measures the guided field
v_uncond + S (v_cond - v_uncond), the condition being the first mixture component (its own Gaussian
flow), against its own RK4 reference (4096 steps): the stiff regime of strong classifier-free guidance.
"""
from __future__ import annotations

import argparse
import contextlib
import math
from dataclasses import dataclass, field

import torch

from pixeldit.diffusion.flow import time_grid
from pixeldit.diffusion.samplers import SAMPLER_ORDER, SAMPLERS, model_calls

F64 = torch.float64


def _t64(x):
    return torch.tensor(x, dtype=F64)


@dataclass(frozen=True)
class GaussianMixture:
    """Isotropic Gaussian mixture data distribution; the exact flow velocity in closed form."""

    means: torch.Tensor = field(default_factory=lambda: _t64([[-1.5, 0.0], [1.5, 0.5], [0.0, -1.5]]))  # (K, D)
    stds: torch.Tensor = field(default_factory=lambda: _t64([0.5, 0.5, 0.5]))  # (K,)
    weights: torch.Tensor = field(default_factory=lambda: _t64([0.3, 0.4, 0.3]))  # (K,)

    def _components(self, x: torch.Tensor, t: torch.Tensor):
        t = t.to(x.dtype).reshape(-1, 1)  # (N, 1)
        var = (1 - t) ** 2 * self.stds[None] ** 2 + t ** 2  # (N, K)
        diff = x[:, None, :] - (1 - t)[..., None] * self.means[None]  # (N, K, D)
        d = x.shape[-1]
        logp = (-0.5 * diff.square().sum(-1) / var - 0.5 * d * torch.log(2 * math.pi * var)
                + torch.log(self.weights)[None])  # (N, K): log w_k N(x; (1-t) mu_k, V_k I)
        return t, var, diff, logp

    def log_density(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """log p_t(x) of the marginal at time t. x (N, D), t (N,) -> (N,)."""
        return torch.logsumexp(self._components(x, t)[3], dim=1)

    def velocity(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Exact E[eps - x0 | x_t = x]. x (N, D), t (N,) -> (N, D)."""
        t, var, diff, logp = self._components(x, t)
        w = torch.softmax(logp, dim=1)[..., None]  # (N, K, 1) posterior of the component
        coef = (t - (1 - t) * self.stds[None] ** 2) / var  # (N, K)
        v_k = coef[..., None] * diff - self.means[None]  # (N, K, D)
        return (w * v_k).sum(1)  # (N, D)


@contextlib.contextmanager
def single_thread():
    """Tiny tensors: one intra-op thread is ~50x faster than two on a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@torch.no_grad()
def rk4_solve(model_fn, x: torch.Tensor, steps: int) -> torch.Tensor:
    """Classical RK4 from t = 1 to t = 0 on a uniform grid (the reference solution)."""
    ts = time_grid(steps).tolist()
    for t, tn in zip(ts[:-1], ts[1:]):
        h = tn - t
        full = lambda v: torch.full((x.shape[0],), v, dtype=x.dtype)  # noqa: E731
        k1 = model_fn(x, full(t))
        k2 = model_fn(x + 0.5 * h * k1, full(t + 0.5 * h))
        k3 = model_fn(x + 0.5 * h * k2, full(t + 0.5 * h))
        k4 = model_fn(x + h * k3, full(tn))
        x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return x


# Ablations of FlowDPM-Solver's design, measured with ``--ablations`` (see pixeldit/diffusion/samplers.py).
@torch.no_grad()
def dpmpp_2m_lambda(model_fn, x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """Textbook DPM-Solver++(2M) on the flow (alpha = 1 - t, sigma = t): data estimate linear in
    lambda = log(alpha / sigma); first order at the first (lambda = -inf) and last (lambda = +inf) step."""
    ts = timesteps.tolist()
    lam = [math.log((1 - t) / t) if 0 < t < 1 else (-math.inf if t >= 1 else math.inf) for t in ts]
    prev_x0, h_prev = None, math.inf
    for i, (t, tn) in enumerate(zip(ts[:-1], ts[1:])):
        x0 = x - t * model_fn(x, torch.full((x.shape[0],), t, dtype=x.dtype))
        h = lam[i + 1] - lam[i]
        if tn == 0:
            x = x0  # lower_order_final: sigma_n = 0
            break
        d = x0
        if prev_x0 is not None and math.isfinite(h_prev):
            r = h_prev / h
            d = (1 + 0.5 / r) * x0 - (0.5 / r) * prev_x0
        x = (tn / t) * x - (1 - tn) * math.expm1(-h) * d
        prev_x0, h_prev = x0, h
    return x


@torch.no_grad()
def data_form_2m(model_fn, x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """FlowDPM-Solver's data form on the whole path (no switch to the noise form at t = 1/2)."""
    ts = timesteps.tolist()
    prev = None
    for t, tn in zip(ts[:-1], ts[1:]):
        x0 = x - t * model_fn(x, torch.full((x.shape[0],), t, dtype=x.dtype))
        x_next = (tn / t) * x + (1 - tn / t) * x0
        if prev is not None:
            slope = (x0 - prev[1]) / (t - prev[0])
            x_next = x_next + ((tn * math.log(t / tn) if tn > 0 else 0.0) - (t - tn)) * slope
        prev, x = (t, x0), x_next
    return x


ABLATIONS = {"dpmpp_2m_lambda": dpmpp_2m_lambda, "data_form_2m": data_form_2m}


def fit_order(calls_list: list[int], errors: list[float]) -> float:
    """Least-squares slope of -log(error) against log(model calls)."""
    ls = torch.tensor([math.log(s) for s in calls_list], dtype=F64)
    le = torch.tensor([math.log(e) for e in errors], dtype=F64)
    return -float(((ls - ls.mean()) * (le - le.mean())).sum() / (ls - ls.mean()).square().sum())


def steps_within(name: str, budget: int) -> int:
    """The most steps of sampler ``name`` whose model calls (grid to t = 0) fit ``budget``; ablations: 1 call/step."""
    if name not in SAMPLERS:
        return budget
    steps = budget
    while steps > 1 and model_calls(name, steps) > budget:
        steps -= 1
    return steps


def guided_velocity(target: GaussianMixture, scale: float):
    """Classifier-free guidance on the mixture: v_u + scale (v_c - v_u), the condition = component 0."""
    cond = GaussianMixture(means=target.means[:1], stds=target.stds[:1], weights=torch.ones(1, dtype=F64))

    def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        v_u = target.velocity(x, t)
        return v_u + scale * (cond.velocity(x, t) - v_u)

    return velocity


def measure(calls_list: list[int], n_points: int = 512, shift: float = 1.0, seed: int = 0,
            reference_steps: int = 2048, target: GaussianMixture | None = None,
            ablations: bool = False, cfg_scale: float = 1.0) -> dict[str, dict]:
    """Endpoint errors per sampler and model-call budget on the ``shift``-ed grid, and the fitted order.

    Returns {sampler: {"errors": [...], "calls": [...] (actual), "order": slope, "expected": int}}; with
    ``ablations`` also the rejected FlowDPM-Solver designs (``ABLATIONS``); ``cfg_scale`` != 1 measures the
    guided field (``guided_velocity``).
    """
    target = target or GaussianMixture()
    velocity = target.velocity if cfg_scale == 1.0 else guided_velocity(target, cfg_scale)
    g = torch.Generator().manual_seed(seed)
    x1 = torch.randn(n_points, 2, generator=g, dtype=F64)  # starting noise at t = 1
    out: dict[str, dict] = {}
    with single_thread():
        ref = rk4_solve(velocity, x1, reference_steps)
        for name, sampler in {**SAMPLERS, **(ABLATIONS if ablations else {})}.items():
            errors, calls = [], []
            for budget in calls_list:
                steps = steps_within(name, budget)
                x0 = sampler(velocity, x1, time_grid(steps, shift))
                errors.append(float((x0 - ref).norm(dim=-1).mean()))
                calls.append(model_calls(name, steps) if name in SAMPLERS else steps)
            out[name] = {"errors": errors, "calls": calls, "order": fit_order(calls, errors),
                         "expected": SAMPLER_ORDER.get(name, 2)}
    return out


def format_table(calls_list: list[int], res: dict[str, dict]) -> str:
    lines = ["| sampler | " + " | ".join(f"err @{c} calls" for c in calls_list) + " | measured order | expected |",
             "|---" * (len(calls_list) + 3) + "|"]
    for name, r in res.items():
        errs = " | ".join(f"{e:.2e}" + ("" if c == b else f" ({c})") for e, c, b in zip(r["errors"], r["calls"],
                                                                                     calls_list))
        lines.append(f"| {name} | {errs} | {r['order']:.2f} | {r['expected']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, nargs="+", default=[8, 16, 32, 64, 128, 256], help="model-call budgets")
    ap.add_argument("--points", type=int, default=512, help="starting noise samples")
    ap.add_argument("--shift", type=float, nargs="+", default=[1.0, 3.0], help="time-grid shifts to measure")
    ap.add_argument("--ablations", action="store_true",
                    help="also measure the rejected FlowDPM-Solver designs (ABLATIONS)")
    ap.add_argument("--cfg-scale", type=float, default=1.0, help="measure the guided field at this scale")
    a = ap.parse_args(argv)
    for shift in a.shift:
        guided = f", CFG scale {a.cfg_scale:g}" if a.cfg_scale != 1.0 else ""
        print(f"\nshift {shift:g}{guided} ({a.points} points; error = mean |x_sampler(0) - x_ref(0)|; "
              f"(n): actual model calls where fewer than the budget):\n")
        print(format_table(a.calls, measure(a.calls, a.points, shift=shift, ablations=a.ablations,
                                            cfg_scale=a.cfg_scale,
                                            reference_steps=2048 if a.cfg_scale == 1.0 else 4096)))


if __name__ == "__main__":
    main()
