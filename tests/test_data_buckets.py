"""Unit tests of the shared aspect-ratio bucket tables and nearest-ratio function."""

from __future__ import annotations

import math
import re

import pytest

from data_pipeline.buckets import (
    ASPECT_RATIO_256,
    ASPECT_RATIO_512,
    ASPECT_RATIO_1024,
    RATIO_KEYS,
    bucket_size,
    bucket_table,
    get_bucket_table,
    nearest_ratio_key,
    ratio_value,
)


def test_ratio_keys_span_quarter_to_four_sorted_two_decimals():
    values = [float(k) for k in RATIO_KEYS]
    assert values == sorted(values) and len(set(values)) == len(values)
    assert RATIO_KEYS[0] == "0.25" and RATIO_KEYS[-1] == "4.00" and "1.00" in RATIO_KEYS
    assert all(re.fullmatch(r"\d\.\d\d", k) for k in RATIO_KEYS)


@pytest.mark.parametrize("base,align", [(256, 32), (512, 32), (1024, 32), (64, 16), (128, 16), (512, 64)])
def test_table_sizes_are_aligned_close_in_ratio_and_area(base, align):
    table = bucket_table(base, align)
    assert list(table) == list(RATIO_KEYS)
    for key, (h, w) in table.items():
        assert h % align == 0 and w % align == 0 and h > 0 and w > 0
        if base >= 256:  # at tiny sizes the grid is too coarse for a tight ratio
            assert abs(math.log(h / w / float(key))) < 0.08, (key, h, w)
            assert 0.75 * base**2 <= h * w <= 1.25 * base**2, (key, h, w)


def test_1024_table_is_exactly_double_512_and_predefined_tables_match():
    assert all(ASPECT_RATIO_1024[k] == (2 * ASPECT_RATIO_512[k][0], 2 * ASPECT_RATIO_512[k][1]) for k in RATIO_KEYS)
    assert ASPECT_RATIO_512["1.00"] == (512, 512) and ASPECT_RATIO_1024["1.00"] == (1024, 1024)
    assert ASPECT_RATIO_256 == bucket_table(256) and get_bucket_table(512) == ASPECT_RATIO_512
    assert all(h > w for k, (h, w) in ASPECT_RATIO_512.items() if float(k) >= 1.07)
    assert all(h < w for k, (h, w) in ASPECT_RATIO_512.items() if float(k) <= 0.94)


@pytest.mark.parametrize(
    "h,w,key",
    [(512, 512, "1.00"), (300, 600, "0.50"), (600, 300, "2.00"), (1024, 256, "4.00"), (256, 1024, "0.25"),
     (100, 10_000, "0.25"), (10_000, 100, "4.00"), (480, 640, "0.78"), (1080, 1920, "0.57"), (1920, 1080, "1.75")],
)  # fmt: skip
def test_nearest_ratio_key_known_cases(h, w, key):
    assert nearest_ratio_key(h, w) == key


@pytest.mark.parametrize("ratio", [0.3, 0.45, 0.77, 1.0, 1.3, 2.2, 3.3])
def test_nearest_is_log_symmetric_and_minimal(ratio):
    key = nearest_ratio_key(ratio * 1000, 1000)
    best = min(abs(math.log(float(k) / ratio)) for k in RATIO_KEYS)
    assert abs(math.log(float(key) / ratio)) == pytest.approx(best)
    # the transposed image lands on the mirrored bucket when the mirrored key exists
    mirrored = nearest_ratio_key(1000, ratio * 1000)
    assert abs(math.log(float(mirrored)) + math.log(float(key))) < 0.1


def test_nearest_restricted_to_a_table_subset_and_independent_of_sizes():
    subset = {"0.50": (1, 1), "1.00": (1, 1), "2.00": (1, 1)}
    assert nearest_ratio_key(700, 1000, subset) == "0.50"
    assert nearest_ratio_key(720, 1000, subset) == "1.00"
    assert nearest_ratio_key(480, 640, bucket_table(64, 16)) == nearest_ratio_key(480, 640, ASPECT_RATIO_1024)
    assert bucket_size(600, 300, ASPECT_RATIO_512) == ("2.00", ASPECT_RATIO_512["2.00"])


@pytest.mark.parametrize(
    "call,match",
    [(lambda: nearest_ratio_key(0, 10), "positive"), (lambda: bucket_table(500, 32), "multiple of align"),
     (lambda: bucket_table(-64, 16), "positive"), (lambda: get_bucket_table(300), "valid: 256, 512, 1024"),
     (lambda: ratio_value("0.3"), "valid keys"), (lambda: nearest_ratio_key(1, 1, {}), "empty")],
)  # fmt: skip
def test_errors_are_specific(call, match):
    with pytest.raises(ValueError, match=match):
        call()
