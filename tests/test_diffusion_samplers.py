"""Samplers converge at their order on a closed-form flow; the closed form is exact; CFG wrapper; generate()."""
from __future__ import annotations

import math

import pytest
import torch

from pixeldit.diffusion import generate, initial_noise
from pixeldit.diffusion.flow import time_grid
from pixeldit.diffusion.guidance import cfg_model_fn
from pixeldit.diffusion.samplers import SAMPLERS, get_sampler
from pixeldit.models import build_model, get_model_args
from tools.sampler_order import GaussianMixture, measure, rk4_solve, single_thread

STEPS = [8, 16, 32, 64, 128]
F64 = torch.float64


@pytest.fixture(scope="module")
def orders():
    return {shift: measure(STEPS, n_points=128, shift=shift, reference_steps=1024) for shift in (1.0, 3.0)}


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("name,lo,hi", [("euler", 0.9, 1.1), ("heun", 1.85, 2.15), ("flow_dpm", 1.85, 2.15)])
def test_sampler_converges_at_its_order(orders, shift, name, lo, hi):
    r = orders[shift][name]
    assert lo < r["order"] < hi, r
    local = [math.log2(a / b) for a, b in zip(r["errors"], r["errors"][1:])]
    assert lo - 0.1 < local[-1] < hi + 0.1, local  # the asymptotic slope too, not only the fit


def test_second_order_samplers_beat_euler_at_equal_model_calls(orders):
    r = orders[1.0]
    for i in range(1, len(STEPS)):  # heun at n steps = 2n calls = euler / flow_dpm at 2n steps
        assert r["heun"]["errors"][i - 1] < r["euler"]["errors"][i] / 5
        assert r["flow_dpm"]["errors"][i] < r["euler"]["errors"][i] / 5


def test_mixture_velocity_is_the_exact_field():
    """E[eps - x0 | x_t] = -(x + t * score) / (1 - t): check against autograd of the log density."""
    gm = GaussianMixture()
    x = torch.randn(64, 2, dtype=F64, generator=torch.Generator().manual_seed(0)) * 2
    for tv in (0.05, 0.3, 0.7, 0.95):
        t = torch.full((64,), tv, dtype=F64)
        xg = x.clone().requires_grad_(True)
        score, = torch.autograd.grad(gm.log_density(xg, t).sum(), xg)
        assert torch.allclose(gm.velocity(x, t), -(x + tv * score) / (1 - tv), atol=1e-10)
    # the marginal at t = 1 is the standard normal, at t = 0 the mixture (density integrates to 1)
    assert torch.allclose(gm.log_density(x, torch.ones(64, dtype=F64)),
                          -0.5 * x.square().sum(1) - math.log(2 * math.pi), atol=1e-10)
    g = torch.linspace(-6, 6, 401, dtype=F64)
    grid = torch.stack(torch.meshgrid(g, g, indexing="ij"), -1).reshape(-1, 2)
    mass = gm.log_density(grid, torch.zeros(len(grid), dtype=F64)).exp().sum() * (g[1] - g[0]) ** 2
    assert abs(float(mass) - 1) < 1e-4


def test_reference_solver_matches_the_analytic_gaussian_endpoint():
    """For one Gaussian N(mu, s^2) the flow map is affine: noise x1 ends at mu + s * x1."""
    mu, s = torch.tensor([[0.7, -1.2]], dtype=F64), 0.4
    gm = GaussianMixture(means=mu, stds=torch.tensor([s], dtype=F64), weights=torch.tensor([1.0], dtype=F64))
    x1 = torch.randn(32, 2, dtype=F64, generator=torch.Generator().manual_seed(1))
    with single_thread():
        assert torch.allclose(rk4_solve(gm.velocity, x1, 256), mu + s * x1, atol=1e-9)
        tolerance = {"euler": 0.15, "heun": 1e-3, "flow_dpm": 1e-2}  # measured 0.079, 1.9e-4, 4.2e-3
        for name, sampler in SAMPLERS.items():  # every sampler lands there too, on a shifted grid
            err = (sampler(gm.velocity, x1, time_grid(64, shift=3.0)) - (mu + s * x1)).abs().max()
            assert err < tolerance[name], (name, float(err))


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_sampler_validates_grid(name):
    with pytest.raises(ValueError, match="strictly decreasing"):
        SAMPLERS[name](lambda x, t: x, torch.zeros(1, 2), torch.tensor([0.0, 1.0]))


def test_unknown_sampler_lists_valid_names():
    with pytest.raises(ValueError, match="valid samplers: euler, heun, flow_dpm"):
        get_sampler("ddim")


def test_cfg_wrapper_interval_and_formula():
    calls = []

    def model(x, t, y):
        calls.append(x.shape[0])
        return x * 0 + y.view(-1, 1).float()  # conditional velocity: y; unconditional (y = 0): 0

    cond, null = {"y": torch.tensor([2, 2])}, {"y": torch.tensor([0])}  # a batch-1 null is broadcast
    fn = cfg_model_fn(model, cond, null, scale=3.0, interval=(0.1, 0.9))
    x = torch.zeros(2, 4)
    assert torch.allclose(fn(x, torch.full((2,), 0.5)), torch.full((2, 4), 6.0))  # 0 + 3 * (2 - 0)
    assert calls[-1] == 4  # one batched forward of [cond; uncond]
    assert torch.allclose(fn(x, torch.full((2,), 0.95)), torch.full((2, 4), 2.0))  # outside: conditional only
    assert calls[-1] == 2
    assert torch.allclose(fn(x, torch.full((2,), 0.1)), torch.full((2, 4), 6.0))  # interval ends included
    with pytest.raises(ValueError, match="needs null_cond"):
        cfg_model_fn(model, cond, None, scale=2.0)
    with pytest.raises(ValueError, match="t_lo <= t_hi"):
        cfg_model_fn(model, cond, null, scale=2.0, interval=(0.9, 0.1))


def test_generate_class_model_with_guidance():
    torch.manual_seed(0)
    model = build_model(get_model_args("debug")).eval()
    with torch.no_grad():
        for p in model.parameters():  # leave the zero-init so the velocity depends on the class
            if p.abs().sum() == 0:
                p.normal_(std=0.05)
    y = torch.tensor([1, 2, 3])
    kw = dict(height=32, width=48, steps=4, cfg_scale=3.0, cfg_interval=(0.1, 1.0), shift=2.0)
    a = generate(model, {"y": y}, model.null_condition(3), seed=7, **kw)
    assert a.shape == (3, 3, 32, 48) and a.dtype == torch.float32 and a.abs().max() <= 1
    assert torch.equal(a, generate(model, {"y": y}, model.null_condition(3), seed=7, **kw))  # seeded
    b = generate(model, {"y": y}, model.null_condition(3), noise=initial_noise(3, 32, 48, seed=7), **kw)
    assert torch.equal(a, b)  # seed = the CPU noise of that seed
    noise = initial_noise(3, 32, 48, seed=7)
    assert torch.equal(a, generate(model, {"y": y}, null_cond=model.null_condition(3), noise=noise, **kw))
    with pytest.raises(TypeError, match="pass the starting noise as noise="):
        generate(model, noise, {"y": y}, **kw)
    unguided = generate(model, {"y": y}, seed=7, **{**kw, "cfg_scale": 1.0})
    assert not torch.allclose(a, unguided)
    for name in ("euler", "heun"):  # flow_dpm (the default) ran above
        out = generate(model, {"y": y}, model.null_condition(3), seed=7, sampler=name, **{**kw, "steps": 2})
        assert out.shape == a.shape and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="multiples of the patch size 16"):
        generate(model, {"y": y}, height=30, width=32)
    with pytest.raises(ValueError, match="height and width"):
        generate(model, {"y": y})
    with pytest.raises(ValueError, match="valid samplers"):
        generate(model, {"y": y}, height=32, width=32, sampler="ddpm")


def test_generate_text_model_fresh_model_returns_noise():
    args = get_model_args("debug-T2I", text_dim=16, text_len=8)
    model = build_model(args).eval()
    emb, mask = torch.randn(2, 8, 16), torch.ones(2, 8, dtype=torch.bool)
    null = {"context": torch.zeros(1, 8, 16), "context_mask": torch.ones(1, 8, dtype=torch.bool)}
    g = torch.Generator().manual_seed(0)
    out = generate(model, {"context": emb, "context_mask": mask}, null, height=32, width=32, steps=3,
                   cfg_scale=2.0, generator=g)
    # a freshly initialised PixelDiT predicts zero velocity (zero-init head): the sample is the noise itself
    assert torch.allclose(out, torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)).clamp(-1, 1))
