"""Does a generated image show the colour and the shape its prompt asks for? Simple checks of prompt following.

    python -m pixeldit.evaluation.synthetic_checks --images runs/quickstart/samples

The synthetic quickstart set (data_pipeline.synthetic) draws one circle, axis-aligned square or upright
isosceles triangle (apex at the top, base 2r, height 2r) in one of six colours on a plain background.

Colour: the background colour is the median of the image's border pixels; the shape is every pixel far from
it (Euclidean RGB distance > ``min_distance``); the dominant colour is the palette colour (the six shape
colours) nearest to the median of the shape pixels. Chance is 1/6.

Shape:
1. the shape mask: pixels far from the background and nearer to the shape colour than to the background,
   cleaned by a 3x3 median filter (speckle), its largest 4-connected blob, holes filled; a blob smaller than
   ``min_fraction`` of the image or narrower than 4 pixels is no shape;
2. two features of the blob in its bounding box: ``fill`` = blob area / box area and ``top`` = the share of
   the blob's area in the upper half of the box;
3. the nearest prototype: triangle (fill 1/2, top 1/4), circle (pi/4, 1/2), square (1, 1/2).
Chance is 1/3.

An image with too few shape pixels has no colour and no shape and counts as wrong. Accuracy = fraction of
images whose colour (shape) is the prompt's. On the synthetic set's own images, at every aspect ratio and
JPEG-compressed, both are 100% (tests/test_check_colours.py).
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from data_pipeline.synthetic import COLOURS, SHAPES
from pixeldit.errors import CliParser, cli_main

PALETTE_NAMES = tuple(COLOURS)
PALETTE = np.array([COLOURS[n] for n in PALETTE_NAMES], dtype=np.float32)  # (6, 3)
# (fill, top) of the ideal shapes drawn by data_pipeline.synthetic.draw_shape, one per SHAPES entry
PROTOTYPES: dict[str, tuple[float, float]] = {"circle": (math.pi / 4, 0.5), "square": (1.0, 0.5),
                                              "triangle": (0.5, 0.25)}


def _first_named(prompt: str, names: tuple[str, ...] | dict, what: str) -> str:
    for w in prompt.lower().replace(",", " ").split():
        if w in names:
            return w
    raise ValueError(f"prompt {prompt!r} names none of the {what} {', '.join(names)}")


def prompt_colour(prompt: str) -> str:
    """The first palette colour named in the prompt."""
    return _first_named(prompt, PALETTE_NAMES, "colours")


def prompt_shape(prompt: str) -> str:
    """The first shape named in the prompt."""
    return _first_named(prompt, SHAPES, "shapes")


def background_and_shape(image: np.ndarray, min_distance: float = 60.0,
                         min_fraction: float = 0.01) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """(background RGB (3,), shape RGB (3,) or None when no shape stands out, far mask (H, W)) of an
    (H, W, 3) uint8 image: background = median of the border pixels, far = pixels further than
    ``min_distance`` from it, shape RGB = median of the far pixels."""
    img = image.astype(np.float32)
    border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])  # (2H + 2W, 3)
    background = np.median(border, axis=0)
    far = np.linalg.norm(img - background, axis=-1) > min_distance  # (H, W)
    if far.mean() < min_fraction:
        return background, None, far
    return background, np.median(img[far], axis=0), far


def dominant_colour(image: np.ndarray, min_distance: float = 60.0, min_fraction: float = 0.01) -> str | None:
    """Palette name of the shape in an (H, W, 3) uint8 image, or None when no shape stands out."""
    _, shape_rgb, _ = background_and_shape(image, min_distance, min_fraction)
    if shape_rgb is None:
        return None
    return PALETTE_NAMES[int(np.argmin(np.linalg.norm(PALETTE - shape_rgb, axis=-1)))]


def shape_mask(image: np.ndarray, min_distance: float = 60.0, min_fraction: float = 0.01) -> np.ndarray | None:
    """(H, W) bool mask of the shape's blob in an (H, W, 3) uint8 image, or None when no shape stands out."""
    background, shape_rgb, far = background_and_shape(image, min_distance, min_fraction)
    if shape_rgb is None:
        return None
    img = image.astype(np.float32)
    nearer = np.linalg.norm(img - shape_rgb, axis=-1) < np.linalg.norm(img - background, axis=-1)  # (H, W)
    mask = ndimage.median_filter((far & nearer).astype(np.uint8), size=3, mode="constant") > 0
    labels, count = ndimage.label(mask)  # 4-connected blobs
    if count == 0:
        return None
    sizes = np.bincount(labels.ravel())[1:]
    blob = ndimage.binary_fill_holes(labels == 1 + int(np.argmax(sizes)))
    ys, xs = np.nonzero(blob)
    if blob.sum() < min_fraction * blob.size or min(np.ptp(ys), np.ptp(xs)) + 1 < 4:
        return None
    return blob


def shape_features(mask: np.ndarray) -> tuple[float, float]:
    """(fill, top) of a blob mask (H, W): area / bounding-box area, share of the area in the box's upper half."""
    ys, xs = np.nonzero(mask)
    top, bottom = ys.min(), ys.max() + 1
    box_area = (bottom - top) * (xs.max() + 1 - xs.min())
    middle = (top + bottom) / 2
    upper = np.clip(middle - ys, 0.0, 1.0).sum()  # rows fully above the middle count 1, a split row its part
    return float(len(ys) / box_area), float(upper / len(ys))


def classify_shape(image: np.ndarray) -> str | None:
    """The shape (circle / square / triangle) in an (H, W, 3) uint8 image, or None when no shape stands out."""
    mask = shape_mask(image)
    if mask is None:
        return None
    fill, top = shape_features(mask)
    return min(PROTOTYPES, key=lambda s: math.hypot(fill - PROTOTYPES[s][0], top - PROTOTYPES[s][1]))


def _accuracy(classify, named, images: list[np.ndarray], prompts: list[str]) -> float:  # type: ignore[no-untyped-def]
    if len(images) != len(prompts) or not images:
        raise ValueError(f"need as many images as prompts (got {len(images)} images, {len(prompts)} prompts)")
    return float(np.mean([classify(img) == named(p) for img, p in zip(images, prompts)]))


def colour_accuracy(images: list[np.ndarray], prompts: list[str]) -> float:
    return _accuracy(dominant_colour, prompt_colour, images, prompts)


def shape_accuracy(images: list[np.ndarray], prompts: list[str]) -> float:
    return _accuracy(classify_shape, prompt_shape, images, prompts)


def read_samples(folder: str | Path, prompts_file: str | Path | None = None) -> tuple[list[np.ndarray], list[str]]:
    """(images (H, W, 3) uint8, prompts) listed in ``prompts.json`` (written by pixeldit-sample) of a folder."""
    folder = Path(folder)
    entries = json.loads(Path(prompts_file or folder / "prompts.json").read_text())
    return ([np.asarray(Image.open(folder / e["file"]).convert("RGB")) for e in entries],
            [e["prompt"] for e in entries])


def accuracies_of_folder(folder: str | Path, prompts_file: str | Path | None = None) -> dict[str, float]:
    """{"colour": accuracy, "shape": accuracy} over the images listed in a folder's ``prompts.json``."""
    images, prompts = read_samples(folder, prompts_file)
    return {"colour": colour_accuracy(images, prompts), "shape": shape_accuracy(images, prompts)}


def colour_accuracy_of_folder(folder: str | Path, prompts_file: str | Path | None = None) -> float:
    return colour_accuracy(*read_samples(folder, prompts_file))


PROG = "python -m pixeldit.evaluation.synthetic_checks"


def _main(argv: list[str]) -> None:
    ap = CliParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", required=True, help="folder of PNGs written by pixeldit-sample")
    ap.add_argument("--prompts", default=None, help="JSON list of {file, prompt} (default: {images}/prompts.json)")
    a = ap.parse_args(argv)
    acc = accuracies_of_folder(a.images, a.prompts)
    print(f"colour accuracy: {acc['colour']:.1%} (chance {1 / len(PALETTE_NAMES):.1%}); "
          f"shape accuracy: {acc['shape']:.1%} (chance {1 / len(SHAPES):.1%})")


def main(argv: list[str] | None = None) -> int:
    return cli_main(PROG, _main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
