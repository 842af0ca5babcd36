"""Prompt following of a text-to-image release on the synthetic shapes: trained vs random init, side by side.

    result = prompt_following("runs/quickstart/release", PROMPTS, "runs/quickstart/samples", per_prompt=2,
                              text_encoder="/path/to/all-MiniLM-L6-v2")

Samples the prompts (``pixeldit-sample``: image i of the list starts from the noise of seed ``seed + i``) from
- the release, into ``{out}/``, and
- a random-init model of the same architecture (a fresh PixelDiT: zero-initialised modulation and head, so it
  returns its starting noise), into ``{out}/random_init/``, with the same prompts and seeds,
scores both with the colour and shape checks (``synthetic_checks``; chance 1/6 and 1/3), and writes
``{out}/side_by_side.png``: for every prompt, the random-init images on the left and the trained ones on the right.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .synthetic_checks import accuracies_of_folder, read_samples

RANDOM_INIT = "random_init"
SIDE_BY_SIDE = "side_by_side.png"


def random_init_release(release: str | Path, out: str | Path) -> Path:
    """A release folder of a fresh model with the architecture and config of ``release``."""
    from pixeldit.models import build_model
    from pixeldit.release import ReleaseConfig
    from pixeldit.release.writer import save_release

    cfg = ReleaseConfig.load(release)
    return save_release(build_model(cfg.args()).state_dict(), cfg, out)


def sample_prompts(release: str | Path, prompts: list[str], out: str | Path, *, per_prompt: int, seed: int,
                   steps: int, cfg_scale: float, size: int, text_encoder: str) -> Path:
    """``pixeldit-sample`` of every prompt ``per_prompt`` times at size x size into ``out``."""
    from pixeldit.release.sample import run as sample

    args = ["--model", str(release), "--out", str(out), "--steps", str(steps), "--cfg-scale", str(cfg_scale),
            "--height", str(size), "--width", str(size), "--num-per-prompt", str(per_prompt), "--seed", str(seed),
            "--text-encoder", text_encoder]
    for p in prompts:
        args += ["--prompt", p]
    sample(args)
    return Path(out)


def side_by_side(left: str | Path, right: str | Path, out: str | Path, titles: tuple[str, str],
                 scale: int = 3, gap: int = 12) -> Path:
    """One row per prompt: the images of folder ``left``, a gap, those of ``right`` (same prompts.json order),
    each image enlarged ``scale`` times (nearest neighbour), a title above each half."""
    lhs, prompts = read_samples(left)
    rhs, prompts_right = read_samples(right)
    if prompts != prompts_right or not prompts:
        raise ValueError(f"{left} and {right} do not hold the same prompts in the same order")
    per_prompt = next((i for i, p in enumerate(prompts) if p != prompts[0]), len(prompts))
    h, w = lhs[0].shape[0] * scale, lhs[0].shape[1] * scale
    head = 14
    rows = len(prompts) // per_prompt
    half = per_prompt * w
    canvas = Image.new("RGB", (2 * half + gap, head + rows * h), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for k, (images, title) in enumerate(((lhs, titles[0]), (rhs, titles[1]))):
        x0 = k * (half + gap)
        draw.text((x0 + 2, 1), title, fill=(0, 0, 0))
        for i, img in enumerate(images):
            r, c = divmod(i, per_prompt)
            tile = Image.fromarray(np.ascontiguousarray(img)).resize((w, h), Image.NEAREST)
            canvas.paste(tile, (x0 + c * w, head + r * h))
    out = Path(out)
    canvas.save(out)
    return out


def prompt_following(release: str | Path, prompts: list[str], out: str | Path, *, text_encoder: str,
                     per_prompt: int = 2, seed: int = 0, steps: int = 20, cfg_scale: float = 3.0,
                     size: int | None = None) -> dict:
    """Sample, score and compare (module docstring). Returns {"trained": {"colour", "shape"}, "random_init":
    {"colour", "shape"}, "images": count, "samples": folder, "side_by_side": path}."""
    from pixeldit.release import ReleaseConfig

    out = Path(out)
    size = size or ReleaseConfig.load(release).resolution
    kw = dict(per_prompt=per_prompt, seed=seed, steps=steps, cfg_scale=cfg_scale, size=size,
              text_encoder=text_encoder)
    trained = sample_prompts(release, prompts, out, **kw)
    fresh = random_init_release(release, out / f"{RANDOM_INIT}_release")
    baseline = sample_prompts(fresh, prompts, out / RANDOM_INIT, **kw)
    result = {"trained": accuracies_of_folder(trained), "random_init": accuracies_of_folder(baseline),
              "images": len(prompts) * per_prompt}
    grid = side_by_side(baseline, trained, out / SIDE_BY_SIDE, (
        f"random init: colour {result['random_init']['colour']:.0%}, shape {result['random_init']['shape']:.0%}",
        f"trained: colour {result['trained']['colour']:.0%}, shape {result['trained']['shape']:.0%}"))
    return {**result, "samples": str(trained), "side_by_side": str(grid)}
