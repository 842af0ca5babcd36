"""Does a generated image show the colour its prompt asks for? A simple check of prompt following.

    python -m pixeldit.evaluation.synthetic_checks --images runs/quickstart/samples

The synthetic quickstart set (data_pipeline.synthetic) shows one coloured shape on a plain background.
For an image, the background colour is the median of its border pixels; the shape is every pixel far from
it (Euclidean RGB distance > ``min_distance``); the dominant colour is the palette colour (the six shape
colours) nearest to the median of the shape pixels. An image with too few shape pixels has no dominant
colour and counts as wrong. Accuracy = fraction of images whose dominant colour is the prompt's colour;
chance is 1/6.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image

from data_pipeline.synthetic import COLOURS
from pixeldit.errors import CliParser, cli_main

PALETTE_NAMES = tuple(COLOURS)
PALETTE = np.array([COLOURS[n] for n in PALETTE_NAMES], dtype=np.float32)  # (6, 3)


def prompt_colour(prompt: str) -> str:
    """The first palette colour named in the prompt."""
    words = prompt.lower().replace(",", " ").split()
    for w in words:
        if w in COLOURS:
            return w
    raise ValueError(f"prompt {prompt!r} names none of the colours {', '.join(PALETTE_NAMES)}")


def dominant_colour(image: np.ndarray, min_distance: float = 60.0, min_fraction: float = 0.01) -> str | None:
    """Palette name of the shape in an (H, W, 3) uint8 image, or None when no shape stands out."""
    img = image.astype(np.float32)
    border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])  # (2H + 2W, 3)
    background = np.median(border, axis=0)
    far = np.linalg.norm(img - background, axis=-1) > min_distance  # (H, W)
    if far.mean() < min_fraction:
        return None
    shape_rgb = np.median(img[far], axis=0)  # (3,)
    return PALETTE_NAMES[int(np.argmin(np.linalg.norm(PALETTE - shape_rgb, axis=-1)))]


def colour_accuracy(images: list[np.ndarray], prompts: list[str]) -> float:
    if len(images) != len(prompts) or not images:
        raise ValueError(f"need as many images as prompts (got {len(images)} images, {len(prompts)} prompts)")
    hits = [dominant_colour(img) == prompt_colour(p) for img, p in zip(images, prompts)]
    return float(np.mean(hits))


def colour_accuracy_of_folder(folder: str | Path, prompts_file: str | Path | None = None) -> float:
    """Accuracy over the images listed in ``prompts.json`` (written by pixeldit-sample) of a folder."""
    folder = Path(folder)
    entries = json.loads(Path(prompts_file or folder / "prompts.json").read_text())
    images = [np.asarray(Image.open(folder / e["file"]).convert("RGB")) for e in entries]
    return colour_accuracy(images, [e["prompt"] for e in entries])


PROG = "python -m pixeldit.evaluation.synthetic_checks"


def _main(argv: list[str]) -> None:
    ap = CliParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", required=True, help="folder of PNGs written by pixeldit-sample")
    ap.add_argument("--prompts", default=None, help="JSON list of {file, prompt} (default: {images}/prompts.json)")
    a = ap.parse_args(argv)
    acc = colour_accuracy_of_folder(a.images, a.prompts)
    print(f"colour accuracy: {acc:.1%} (chance {1 / len(PALETTE_NAMES):.1%})")


def main(argv: list[str] | None = None) -> int:
    return cli_main(PROG, _main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
