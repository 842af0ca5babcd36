"""Measure each sampler's order of convergence on a flow whose exact velocity is known in closed form.

    python -m tools.sampler_order

Data: a 2-D Gaussian mixture (3 components, std 0.5). Under the linear path x_t = (1 - t) x0 + t eps,
component k of x_t is N((1 - t) mu_k, V_k(t) I) with V_k = (1 - t)^2 s_k^2 + t^2, and the exact velocity
E[eps - x0 | x_t] is the posterior-weighted sum of the per-component fields
(t - (1 - t) s_k^2) / V_k (x - (1 - t) mu_k) - mu_k. The reference endpoint for each starting noise is a
fine solve (classical RK4, 2048 steps); each sampler's error is the mean distance of its endpoint to the
reference, and its order the slope of log error against log steps (least squares).
"""
from __future__ import annotations

import argparse
import math

import torch

from pixeldit.diffusion.flow import time_grid
from pixeldit.diffusion.samplers import SAMPLER_ORDER, SAMPLERS

MEANS = torch.tensor([[-1.5, 0.0], [1.5, 0.5], [0.0, -1.5]], dtype=torch.float64)
STDS = torch.tensor([0.5, 0.5, 0.5], dtype=torch.float64)
WEIGHTS = torch.tensor([0.3, 0.4, 0.3], dtype=torch.float64)


def mixture_velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Exact velocity of the Gaussian-mixture flow at points x (N, 2), time t (N,)."""
    t = t.to(x.dtype).view(-1, 1, 1)  # (N, 1, 1)
    m = (1 - t) * MEANS[None]  # (N, K, 2)
    var = ((1 - t) ** 2 * STDS.view(1, -1, 1) ** 2 + t ** 2)  # (N, K, 1)
    diff = x[:, None, :] - m  # (N, K, 2)
    logp = -0.5 * (diff ** 2).sum(-1) / var[..., 0] - torch.log(var[..., 0]) + torch.log(WEIGHTS)[None]  # (N, K)
    w = torch.softmax(logp, dim=1)[..., None]  # (N, K, 1)
    v_k = (t - (1 - t) * STDS.view(1, -1, 1) ** 2) / var * diff - MEANS[None]  # (N, K, 2)
    return (w * v_k).sum(1)  # (N, 2)


def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return mixture_velocity(x, t)


@torch.no_grad()
def rk4_reference(x: torch.Tensor, steps: int = 2048) -> torch.Tensor:
    ts = time_grid(steps)
    for t, tn in zip(ts[:-1].tolist(), ts[1:].tolist()):
        h = tn - t
        n = x.shape[0]
        full = lambda v: torch.full((n,), v, dtype=torch.float64)  # noqa: E731
        k1 = model_fn(x, full(t))
        k2 = model_fn(x + 0.5 * h * k1, full(t + 0.5 * h))
        k3 = model_fn(x + 0.5 * h * k2, full(t + 0.5 * h))
        k4 = model_fn(x + h * k3, full(tn))
        x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return x


def measure(steps_list: list[int], n_points: int = 512, seed: int = 0) -> dict[str, dict]:
    """Endpoint error per sampler and step count, and the fitted order (slope)."""
    g = torch.Generator().manual_seed(seed)
    x1 = torch.randn(n_points, 2, generator=g, dtype=torch.float64)
    ref = rk4_reference(x1.clone())
    out: dict[str, dict] = {}
    for name, sampler in SAMPLERS.items():
        errors = []
        for steps in steps_list:
            x0 = sampler(model_fn, x1.clone(), time_grid(steps))
            errors.append(float((x0 - ref).norm(dim=-1).mean()))
        logs = torch.tensor([math.log(s) for s in steps_list], dtype=torch.float64)
        loge = torch.tensor([math.log(e) for e in errors], dtype=torch.float64)
        slope = -float(((logs - logs.mean()) * (loge - loge.mean())).sum() / ((logs - logs.mean()) ** 2).sum())
        out[name] = {"errors": errors, "order": slope, "expected": SAMPLER_ORDER[name]}
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, nargs="+", default=[16, 32, 64, 128, 256])
    ap.add_argument("--points", type=int, default=512)
    a = ap.parse_args(argv)
    res = measure(a.steps, a.points)
    print("| sampler | " + " | ".join(f"err @{s}" for s in a.steps) + " | measured order | expected |")
    print("|---" * (len(a.steps) + 3) + "|")
    for name, r in res.items():
        errs = " | ".join(f"{e:.2e}" for e in r["errors"])
        print(f"| {name} | {errs} | {r['order']:.2f} | {r['expected']} |")


if __name__ == "__main__":
    main()
