"""Generate images from a PixelDiT: starting noise + sampler + classifier-free guidance + time grid in one call.

    images = generate(model, {"y": labels}, model.null_condition(len(labels)), height=256, width=256,
                      steps=100, sampler="flow_dpm", cfg_scale=3.25, cfg_interval=(0.0, 0.9), seed=0)

This is the library function behind the sampling CLI and the training previews.
"""
from __future__ import annotations


import numpy as np
import torch
from torch import nn

from .flow import time_grid
from .guidance import Cond, cfg_model_fn
from .samplers import get_sampler


def _batch_size(cond: Cond) -> int:
    if not cond:
        raise ValueError("cond is empty: pass the model's condition kwargs, e.g. {'y': labels} or "
                         "{'context': emb, 'context_mask': mask}")
    sizes = {k: v.shape[0] for k, v in cond.items()}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"cond tensors disagree on the batch size: {sizes}")
    return next(iter(sizes.values()))


def initial_noise(batch: int, height: int, width: int, *, seed: int | None = None,
                  generator: torch.Generator | None = None, device: torch.device | str = "cpu") -> torch.Tensor:
    """Starting noise (batch, 3, height, width) on ``device``.

    With ``seed`` the noise is drawn on the CPU and moved, so a seed gives the same images on any device;
    with ``generator`` it is drawn on the generator's device; with neither, from the global RNG.
    """
    if seed is not None and generator is not None:
        raise ValueError("pass seed or generator, not both")
    if seed is not None:
        generator = torch.Generator().manual_seed(int(seed))
    gen_device = generator.device if generator is not None else device
    noise = torch.randn(batch, 3, height, width, generator=generator, device=gen_device)
    return noise.to(device)  # (B, 3, H, W)


@torch.no_grad()
def generate(
    model: nn.Module,
    cond: Cond,
    null_cond: Cond | None = None,
    *,
    height: int | None = None,
    width: int | None = None,
    steps: int = 25,
    sampler: str = "flow_dpm",
    cfg_scale: float = 1.0,
    cfg_interval: tuple[float, float] = (0.0, 1.0),
    shift: float = 1.0,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Sample B images (B = batch of ``cond``) by integrating the flow from t = 1 to t = 0.

    model: ``model(x, t, **cond) -> v`` (a PixelDiT; put it in eval mode and on its device first).
    cond / null_cond: the model's condition kwargs, e.g. {"y": (B,)} / ``model.null_condition(B)``, or
        {"context": (B, T, C), "context_mask": (B, T)} / the text encoder's ``encode_null(B)``.
        null_cond is needed only when cfg_scale != 1.
    height, width: image size (multiples of the patch size); the starting noise is drawn from ``seed``
        (device-independent), ``generator`` or the global RNG, unless ``noise`` (B, 3, H, W) is given.
    steps / sampler / shift: ``time_grid(steps, shift)`` integrated by ``samplers.get_sampler(sampler)``.
    cfg_scale / cfg_interval: classifier-free guidance and the t-interval where it applies.
    Returns float32 images (B, 3, H, W) clamped to [-1, 1], on the model's device.
    """
    if torch.is_tensor(cond):
        raise TypeError("generate(model, cond, null_cond, ...): cond is a dict of condition tensors; pass the "
                        "starting noise as noise=")
    B = _batch_size(cond)
    params = next(model.parameters(), None) if isinstance(model, nn.Module) else None
    device = params.device if params is not None else next(iter(cond.values())).device
    if noise is None:
        if height is None or width is None:
            raise ValueError("generate needs height and width (or an explicit noise tensor)")
        patch = getattr(getattr(model, "args", None), "patch_size", 1)
        if height % patch or width % patch:
            raise ValueError(f"height {height} and width {width} must be multiples of the patch size {patch}")
        noise = initial_noise(B, height, width, seed=seed, generator=generator, device=device)
    elif noise.shape[0] != B:
        raise ValueError(f"noise batch {noise.shape[0]} != cond batch {B}")
    sample = get_sampler(sampler)
    fn = cfg_model_fn(model, cond, null_cond, scale=cfg_scale, interval=cfg_interval)
    x = sample(fn, noise.to(device), time_grid(steps, shift), progress=progress)  # (B, 3, H, W)
    return x.float().clamp(-1, 1)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8: the one rounding of samples, grids, previews and evals."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def image_grid(images: torch.Tensor, nrow: int) -> torch.Tensor:
    """(N, 3, H, W) -> (3, rows * H, nrow * W), empty cells black (-1)."""
    n, c, h, w = images.shape
    rows = -(-n // nrow)
    grid = torch.full((c, rows * h, nrow * w), -1.0, dtype=images.dtype)
    for i, img in enumerate(images):
        r, col = divmod(i, nrow)
        grid[:, r * h:(r + 1) * h, col * w:(col + 1) * w] = img
    return grid
