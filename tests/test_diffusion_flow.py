"""Time convention, timestep sampling with the resolution shift, and the training objective."""
from __future__ import annotations

import pytest
import torch

from pixeldit.diffusion import ObjectiveConfig, compute_loss
from pixeldit.diffusion.flow import (RESOLUTION_SHIFT, interpolate, noise_from_velocity, sample_timesteps,
                                     shift_time, time_grid, velocity_target, x0_from_velocity)
from pixeldit.models import build_model, get_model_args


def test_time_convention_roundtrip():
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(4, 3, 8, 8, generator=g), torch.randn(4, 3, 8, 8, generator=g)
    t = torch.tensor([0.0, 0.3, 0.7, 1.0])
    xt = interpolate(x0, noise, t)
    assert torch.allclose(xt[0], x0[0]) and torch.allclose(xt[3], noise[3])  # t = 0 data, t = 1 noise
    v = velocity_target(x0, noise)
    assert torch.allclose(v, noise - x0)
    eps = 1e-3  # v is the time derivative of the path
    assert torch.allclose((interpolate(x0, noise, t + eps) - xt) / eps, v, atol=1e-3)
    assert torch.allclose(x0_from_velocity(xt, v, t), x0, atol=1e-6)
    assert torch.allclose(noise_from_velocity(xt, v, t), noise, atol=1e-6)
    assert torch.allclose(x0_from_velocity(xt[1:2], v[1:2], 0.3), x0[1:2], atol=1e-6)  # float time


def test_shift_maps_the_ends_and_moves_towards_noise():
    t = torch.linspace(0, 1, 11)
    assert torch.allclose(shift_time(t, 1.0), t)
    s3 = shift_time(t, 3.0)
    assert s3[0] == 0 and s3[-1] == 1 and torch.all(s3[1:-1] > t[1:-1])
    assert torch.isclose(shift_time(torch.tensor(0.5), 3.0), torch.tensor(0.75))  # 3 * 0.5 / (1 + 2 * 0.5)
    assert RESOLUTION_SHIFT == {256: 1.0, 512: 3.0, 1024: 4.0}
    with pytest.raises(ValueError, match="shift must be > 0"):
        shift_time(t, 0.0)


@pytest.mark.parametrize("mean,std,shift", [(0.0, 1.0, 1.0), (0.0, 1.0, 3.0), (-0.5, 1.4, 4.0)])
def test_logit_normal_timesteps_with_shift(mean, std, shift):
    ts = sample_timesteps(40000, mean=mean, std=std, shift=shift, generator=torch.Generator().manual_seed(0))
    assert ts.shape == (40000,) and 0 < ts.min() and ts.max() < 1
    # undo the shift (t = s u / (1 + (s - 1) u) <=> u = t / (s - (s - 1) t)), then the logit is N(mean, std)
    u = ts / (shift - (shift - 1) * ts)
    logit = torch.log(u / (1 - u))
    assert abs(logit.mean().item() - mean) < 0.03 and abs(logit.std().item() - std) < 0.03
    assert torch.equal(ts, sample_timesteps(40000, mean, std, shift, generator=torch.Generator().manual_seed(0)))


def test_time_grid():
    grid = time_grid(10, shift=3.0)
    assert grid.dtype == torch.float64 and grid.shape == (11,)
    assert grid[0] == 1 and grid[-1] == 0 and torch.all(grid[1:] < grid[:-1])
    assert torch.allclose(grid, shift_time(torch.linspace(1, 0, 11, dtype=torch.float64), 3.0))
    with pytest.raises(ValueError, match="steps must be >= 1"):
        time_grid(0)


def _randomise(model):
    with torch.no_grad():  # leave the zero-init so the prediction depends on the inputs
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.normal_(std=0.05)
    return model


def test_flow_loss_is_velocity_mse_and_reproducible():
    torch.manual_seed(0)
    args = get_model_args("debug")
    model = _randomise(build_model(args))
    x0 = torch.rand(4, 3, 32, 32) * 2 - 1
    y = torch.arange(4)
    cfg = ObjectiveConfig(t_mean=0.0, t_std=1.0, shift=3.0, repa_weight=0.5, cond_drop_prob=0.0)
    out = compute_loss(model, x0, {"y": y}, cfg, null_cond=model.null_condition(4),
                       generator=torch.Generator().manual_seed(1))
    assert out["repa"] == 0 and torch.equal(out["loss"], out["flow"])  # no projector/teacher: flow only
    g = torch.Generator().manual_seed(1)  # replay: t, noise (drop mask last)
    t = sample_timesteps(4, 0.0, 1.0, 3.0, generator=g)
    noise = torch.randn(x0.shape, generator=g)
    with torch.no_grad():
        v = model(interpolate(x0, noise, t), t, y=y)
    assert torch.allclose(out["flow"], (v - (noise - x0)).square().mean(), atol=1e-6)
    again = compute_loss(model, x0, {"y": y}, cfg, null_cond=model.null_condition(4),
                         generator=torch.Generator().manual_seed(1))
    assert torch.equal(again["loss"], out["loss"])
    out["loss"].backward()
    assert model.head.linear.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("p,expect", [(1.0, "all"), (0.0, "none"), (0.5, "some")])
def test_condition_dropout_class_and_text(p, expect):
    args = get_model_args("debug")
    model = build_model(args)
    seen = []
    model.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["y"].clone()), with_kwargs=True)
    B = 64
    x0 = torch.zeros(B, 3, 16, 16)
    compute_loss(model, x0, {"y": torch.zeros(B, dtype=torch.long)}, ObjectiveConfig(cond_drop_prob=p),
                 null_cond=model.null_condition(B), generator=torch.Generator().manual_seed(0))
    dropped = int((seen[-1] == args.num_classes).sum())
    assert {"all": dropped == B, "none": dropped == 0, "some": 16 < dropped < 48}[expect]

    targs = get_model_args("debug-T2I", text_dim=8, text_len=4)
    tmodel = build_model(targs)
    ctx = []
    tmodel.register_forward_pre_hook(lambda m, a, kw: ctx.append((kw["context"], kw["context_mask"])),
                                     with_kwargs=True)
    emb, mask = torch.ones(B, 4, 8), torch.ones(B, 4, dtype=torch.bool)
    null = {"context": torch.zeros(1, 4, 8), "context_mask": torch.tensor([[True, False, False, False]])}
    compute_loss(tmodel, x0, {"context": emb, "context_mask": mask}, ObjectiveConfig(cond_drop_prob=p),
                 null_cond=null, generator=torch.Generator().manual_seed(0))
    c, m = ctx[-1]
    rows = c.abs().sum((1, 2)) == 0  # (B,) the null rows
    assert torch.equal(rows, ~m[:, 1]) and int(rows.sum()) == dropped  # same draws as the class model


def test_objective_config_validation():
    with pytest.raises(ValueError, match="t_std=0.0 must be > 0; cond_drop_prob=1.5 must be in"):
        ObjectiveConfig(t_std=0.0, cond_drop_prob=1.5)
    with pytest.raises(ValueError, match="repa_weight=-1"):
        ObjectiveConfig(repa_weight=-1)
