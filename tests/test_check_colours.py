"""The prompt-following check: right on real synthetic images, chance-level on noise."""
from __future__ import annotations

import random

import numpy as np
import pytest

from data_pipeline.synthetic import BACKGROUNDS, COLOURS, SHAPES, draw_shape
from pixeldit.evaluation.synthetic_checks import colour_accuracy, dominant_colour, prompt_colour


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


def test_noise_and_blank_images_score_low():
    rng = np.random.default_rng(0)
    noise = [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(60)]
    prompts = [f"a {c} circle" for c in COLOURS] * 10
    assert colour_accuracy(noise, prompts) < 0.5
    assert dominant_colour(np.full((32, 32, 3), 128, np.uint8)) is None


def test_prompt_without_colour_is_an_error():
    with pytest.raises(ValueError, match="names none of the colours"):
        prompt_colour("a circle")
