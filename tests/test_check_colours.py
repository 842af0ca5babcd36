"""The prompt-following checks (colour and shape): right on real synthetic images, chance-level on noise."""
from __future__ import annotations

import io
import json
import math
import random

import numpy as np
import pytest
from PIL import Image

from data_pipeline.synthetic import ASPECTS, BACKGROUNDS, COLOURS, SHAPES, _size_for, draw_shape, make_synthetic_dataset
from pixeldit.evaluation.prompt_following import side_by_side
from pixeldit.evaluation.synthetic_checks import (PROTOTYPES, classify_shape, colour_accuracy, dominant_colour,
                                                  prompt_colour, prompt_shape, shape_accuracy, shape_features)


def test_synthetic_images_are_classified_correctly():
    rng = random.Random(0)
    images, prompts = [], []
    for colour in COLOURS:
        for shape in SHAPES:
            for background in BACKGROUNDS:
                img, caption = draw_shape(96, 64, shape, colour, background, rng)
                images.append(np.asarray(img))
                prompts.append(caption)
    assert colour_accuracy(images, prompts) == 1.0
    assert shape_accuracy(images, prompts) == 1.0


def test_noise_and_blank_images_score_low():
    rng = np.random.default_rng(0)
    noise = [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(60)]
    prompts = [f"a {c} circle" for c in COLOURS] * 10
    assert colour_accuracy(noise, prompts) < 0.5
    assert dominant_colour(np.full((32, 32, 3), 128, np.uint8)) is None
    assert classify_shape(np.full((32, 32, 3), 128, np.uint8)) is None


def test_prompt_without_colour_or_shape_is_an_error():
    with pytest.raises(ValueError, match="names none of the colours"):
        prompt_colour("a circle")
    with pytest.raises(ValueError, match="names none of the shapes"):
        prompt_shape("a red blob")


def test_shape_prototypes_cover_the_synthetic_shapes():
    assert set(PROTOTYPES) == set(SHAPES)


@pytest.mark.parametrize("base", [48, 64])
def test_shape_check_is_exact_on_the_synthetic_set_as_stored(base):
    """Every aspect ratio, size, colour and background, JPEG-compressed like the set's files: 100%."""
    rng = random.Random(base)
    images, prompts = [], []
    for i in range(200):
        w, h = _size_for(ASPECTS[i % len(ASPECTS)], base)
        img, caption = draw_shape(w, h, rng.choice(SHAPES), rng.choice(tuple(COLOURS)),
                                  rng.choice(tuple(BACKGROUNDS)), rng)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=95)
        images.append(np.asarray(Image.open(buf).convert("RGB")))
        prompts.append(caption)
    assert shape_accuracy(images, prompts) == 1.0


def test_shape_features_of_ideal_masks():
    yy, xx = np.mgrid[0:200, 0:200]
    disc = (yy - 99.5) ** 2 + (xx - 99.5) ** 2 < 100**2
    square = np.ones((50, 80), bool)
    triangle = np.abs(xx - 99.5) <= (yy + 0.5) / 2  # apex at the top, base 200 at the bottom
    for mask, (fill, top) in ((disc, PROTOTYPES["circle"]), (square, PROTOTYPES["square"]),
                              (triangle, PROTOTYPES["triangle"])):
        got = shape_features(mask)
        assert got == pytest.approx((fill, top), abs=0.01)
    assert math.isclose(PROTOTYPES["circle"][0], math.pi / 4)


def test_speckled_shape_is_still_recognised():
    """Salt-and-pepper speckle on a generated-looking image does not change the answer."""
    rng = random.Random(3)
    noise = np.random.default_rng(3)
    for shape in SHAPES:
        img, _ = draw_shape(64, 64, shape, "blue", "white", rng)
        arr = np.asarray(img).copy()
        flip = noise.random(arr.shape[:2]) < 0.05
        arr[flip] = noise.integers(0, 256, (int(flip.sum()), 3))
        assert classify_shape(arr) == shape


def test_one_shape_size_keeps_the_rest_of_the_set():
    """sizes=("large",) changes only the sizes: same shapes, colours, backgrounds in the same order."""
    both = [draw_shape(64, 48, "circle", "red", "white", random.Random(i))[1] for i in range(40)]
    large = [draw_shape(64, 48, "circle", "red", "white", random.Random(i), sizes=("large",))[1] for i in range(40)]
    assert {c.split()[1] for c in both} == {"large", "small"} and {c.split()[1] for c in large} == {"large"}
    assert [c.split()[2:] for c in both] == [c.split()[2:] for c in large]
    with pytest.raises(ValueError, match="valid sizes: large, small"):
        make_synthetic_dataset("unused", sizes=("huge",))


def test_side_by_side_puts_each_folder_in_its_half(tmp_path):
    prompts = ["a large red circle", "a large red circle", "a large blue square", "a large blue square"]
    for name, value in (("left", 0), ("right", 255)):
        folder = tmp_path / name
        folder.mkdir()
        for i in range(len(prompts)):
            Image.fromarray(np.full((16, 16, 3), value, np.uint8)).save(folder / f"{i:04d}.png")
        (folder / "prompts.json").write_text(json.dumps([{"file": f"{i:04d}.png", "prompt": p}
                                                         for i, p in enumerate(prompts)]))
    grid = np.asarray(Image.open(side_by_side(tmp_path / "left", tmp_path / "right", tmp_path / "pair.png",
                                              ("random init", "trained"), scale=2, gap=4)))
    assert grid.shape == (14 + 2 * 32, 2 * 2 * 32 + 4, 3)  # title, 2 prompts x (2 images of 32 px) per half
    assert (grid[14:, :64] == 0).all() and (grid[14:, 68:] == 255).all()
