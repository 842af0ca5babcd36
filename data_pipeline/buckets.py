"""Aspect-ratio buckets: the ONE shared bucket table and nearest-ratio function.

Buckets are keyed by a ratio key string, the height/width ratio with two decimals ("0.25" ... "4.00"),
Sana/PixArt style. Shards on disk are grouped by ratio key only, so the same shards serve any base
resolution: a training stage maps ratio key -> (height, width) with its own table.

    >>> table = bucket_table(512)
    >>> table["1.00"], table["2.00"]
    ((512, 512), (704, 352))
    >>> nearest_ratio_key(height=600, width=300)
    '2.00'

Tables
------
``bucket_table(base_res, align)`` gives, for every ratio key r, a (height, width) with area close to
``base_res**2``, both sides multiples of ``align``::

    height ~ base_res * sqrt(r),  width ~ base_res / sqrt(r)
    (of the 4 surrounding grid points, the one whose h/w is closest to r; then closest area)

Resolutions that are a multiple of 512 are the 512 grid scaled up: ``bucket_table(1024)`` is exactly
``2 * bucket_table(512)`` for every key, so an image bucketed at 512 is resized by exactly 2x at 1024.
Predefined tables: ``ASPECT_RATIO_256``, ``ASPECT_RATIO_512``, ``ASPECT_RATIO_1024`` (``align=32``).
Tiny tables for CPU tests come from the same function, e.g. ``bucket_table(64, align=16)``; at such
small sizes several keys may share one (height, width), which is harmless.

Nearest ratio
-------------
``nearest_ratio_key`` compares ratios on a log scale (|log(h/w) - log(r)|), so a 2:1 tall image and a
1:2 wide image are treated symmetrically. It depends on the ratio keys only, never on the sizes of a
table, so the bucket of a sample is the same whatever table is used. Ties go to the smaller key.
"""

from __future__ import annotations

import bisect
import math
from typing import Mapping

# Height/width ratios of the Sana/PixArt bucket lists, two decimals. The ONE list of ratio keys.
RATIO_KEYS: tuple[str, ...] = (
    "0.25", "0.26", "0.27", "0.28", "0.32", "0.33", "0.35", "0.40", "0.42", "0.48",
    "0.50", "0.52", "0.57", "0.60", "0.68", "0.72", "0.78", "0.82", "0.88", "0.94",
    "1.00", "1.07", "1.13", "1.21", "1.29", "1.38", "1.46", "1.67", "1.75", "2.00",
    "2.09", "2.40", "2.50", "2.89", "3.00", "3.11", "3.62", "3.75", "3.88", "4.00",
)  # fmt: skip
MIN_RATIO = float(RATIO_KEYS[0])
MAX_RATIO = float(RATIO_KEYS[-1])

_LOG_RATIOS: tuple[float, ...] = tuple(math.log(float(k)) for k in RATIO_KEYS)
# Midpoints between neighbouring log-ratios: bucket i covers (_BOUNDS[i-1], _BOUNDS[i]].
_BOUNDS: tuple[float, ...] = tuple((a + b) / 2 for a, b in zip(_LOG_RATIOS, _LOG_RATIOS[1:]))

BucketTable = dict[str, tuple[int, int]]


def ratio_value(key: str) -> float:
    """The float height/width ratio of a ratio key; raises ValueError for an unknown key."""
    if key not in _KEY_INDEX:
        raise ValueError(f"unknown ratio key {key!r}; valid keys: {', '.join(RATIO_KEYS)}")
    return float(key)


def _fit(base_res: int, align: int, ratio: float) -> tuple[int, int]:
    """(height, width), multiples of `align`, h/w close to `ratio`, area close to base_res**2.

    Of the four grid points around (base_res * sqrt(r), base_res / sqrt(r)) pick the one whose h/w is
    closest to r (log scale); ties go to the area closest to base_res**2.
    """
    root = math.sqrt(ratio)
    h0, w0 = base_res * root / align, base_res / root / align
    candidates = [
        (align * max(1, h), align * max(1, w))
        for h in (math.floor(h0), math.ceil(h0))
        for w in (math.floor(w0), math.ceil(w0))
    ]
    return min(
        candidates,
        key=lambda hw: (round(abs(math.log(hw[0] / hw[1] / ratio)), 9), abs(hw[0] * hw[1] - base_res**2)),
    )


def bucket_table(base_res: int, align: int = 32) -> BucketTable:
    """Map every ratio key to (height, width) at `base_res` with both sides multiples of `align`.

    A base_res that is k * 512 (k >= 2) returns the 512 table (same align) scaled by k, so the
    1024 table is exactly the doubles of the 512 table. Raises ValueError for non-positive inputs or
    a base_res that is not a multiple of align.
    """
    if base_res <= 0 or align <= 0:
        raise ValueError(f"bucket_table: base_res ({base_res}) and align ({align}) must be positive")
    if base_res % align:
        raise ValueError(f"bucket_table: base_res {base_res} is not a multiple of align {align}")
    scale = base_res // 512 if base_res % 512 == 0 and base_res > 512 else 1
    ref = base_res // scale
    return {k: tuple(scale * s for s in _fit(ref, align, float(k))) for k in RATIO_KEYS}  # type: ignore[misc]


ASPECT_RATIO_256: BucketTable = bucket_table(256)
ASPECT_RATIO_512: BucketTable = bucket_table(512)
ASPECT_RATIO_1024: BucketTable = bucket_table(1024)
PREDEFINED_TABLES: dict[int, BucketTable] = {256: ASPECT_RATIO_256, 512: ASPECT_RATIO_512, 1024: ASPECT_RATIO_1024}

_KEY_INDEX = {k: i for i, k in enumerate(RATIO_KEYS)}


def min_bucket_side(table: Mapping[str, tuple[int, int]]) -> int:
    """The shortest side of any bucket of ``table`` (256 at 512, 512 at 1024): an image with a shorter side is
    upscaled in whichever bucket it lands, so the shard stage drops such images by default."""
    return min(min(hw) for hw in table.values())


def get_bucket_table(base_res: int) -> BucketTable:
    """A copy of a predefined table (256, 512 or 1024); ValueError lists the valid resolutions."""
    if base_res not in PREDEFINED_TABLES:
        valid = ", ".join(str(r) for r in PREDEFINED_TABLES)
        raise ValueError(
            f"no predefined bucket table for {base_res}; valid: {valid} (or call bucket_table({base_res}, align))"
        )
    return dict(PREDEFINED_TABLES[base_res])


def nearest_ratio_key(height: int | float, width: int | float, table: Mapping[str, object] | None = None) -> str:
    """The ratio key whose ratio is nearest to height/width on a log scale.

    `table` restricts the choice to its keys (any mapping keyed by ratio keys, e.g. a bucket table or a
    subset of one); None means all RATIO_KEYS. Ratios outside 0.25..4.0 clamp to the end buckets;
    filtering extreme ratios is the caller's job. Raises ValueError for non-positive sides.
    """
    if not (height > 0 and width > 0):
        raise ValueError(f"nearest_ratio_key: height and width must be positive, got {height}x{width}")
    log_r = math.log(height / width)
    if table is None or len(table) == len(RATIO_KEYS) and all(k in table for k in RATIO_KEYS):
        return RATIO_KEYS[bisect.bisect_left(_BOUNDS, log_r)]
    if not table:
        raise ValueError("nearest_ratio_key: table is empty")
    best_key, best_dist = "", math.inf
    for key in sorted(table, key=lambda k: float(k)):
        dist = abs(math.log(ratio_value(key)) - log_r)
        if dist < best_dist:
            best_key, best_dist = key, dist
    return best_key


def bucket_size(
    height: int | float, width: int | float, table: Mapping[str, tuple[int, int]]
) -> tuple[str, tuple[int, int]]:
    """(ratio key, (bucket_height, bucket_width)) of an image in `table`."""
    key = nearest_ratio_key(height, width, table)
    return key, table[key]
