"""The held-out split, carved at shard time: which committed samples the trainer never trains on.

A sample is held out when the hash of its key, read as a number u in [0, 1), is below ``fraction``
(``holdout_fraction``): the same key is held out in every root, whatever the order or the batching of the
input, and about ``fraction`` of every bucket is. ``min_per_bucket`` tops a bucket up (new rows with the
smallest u first) until it holds that many, so a tiny dataset still has a validation set; never more than
half of a bucket's rows are held out by the top-up.

A row's split is decided once, when it is committed (``split`` is null until then): an incremental run
carves only its new rows, so a sample that was trained on never moves into the held-out split (the
format: ``dataset_format``, column ``split``).
"""
from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .dataset_format import SAMPLE_COLUMNS, SPLIT_HELDOUT, SPLIT_TRAIN, with_split_column

_SCALE = float(1 << 64)


def key_uniform(keys: list[str]) -> np.ndarray:
    """(N,) float64 in [0, 1): the first 8 bytes of blake2b(key) as a fraction; stable across processes."""
    return np.array([int.from_bytes(hashlib.blake2b(k.encode(), digest_size=8).digest(), "big") / _SCALE
                     for k in keys], dtype=np.float64)


def check_holdout(fraction: float, min_per_bucket: int) -> None:
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"holdout_fraction={fraction} must be in [0, 1) (0: nothing held out)")
    if min_per_bucket < 0:
        raise ValueError(f"holdout_min_per_bucket={min_per_bucket} must be >= 0")


def assign_splits(samples: pa.Table, fraction: float, min_per_bucket: int = 0) -> pa.Table:
    """``samples`` with every null ``split`` decided (see the module docstring); set splits are kept."""
    check_holdout(fraction, min_per_bucket)
    c = SAMPLE_COLUMNS
    samples = with_split_column(samples)
    split = samples[c.split].to_pylist()
    new = np.array([s is None for s in split], dtype=bool)
    if not new.any():
        return samples
    keys = samples[c.key].to_pylist()
    u = np.full(len(split), np.inf)
    u[new] = key_uniform([keys[i] for i in np.flatnonzero(new)])
    held = np.array([s == SPLIT_HELDOUT for s in split], dtype=bool) | (new & (u < fraction))
    if min_per_bucket:
        buckets = np.asarray(samples[c.ratio_key].to_pylist(), dtype=object)
        for bucket in sorted(set(buckets[new])):
            rows = np.flatnonzero(buckets == bucket)
            want = min(min_per_bucket, len(rows) // 2) - int(held[rows].sum())
            candidates = rows[new[rows] & ~held[rows]]
            order = np.lexsort((np.asarray([keys[i] for i in candidates], dtype=object).astype(str), u[candidates]))
            held[candidates[order[:max(0, want)]]] = True
    out = [s if not n else (SPLIT_HELDOUT if h else SPLIT_TRAIN) for s, n, h in zip(split, new, held)]
    index = samples.column_names.index(c.split)
    return samples.set_column(index, samples.schema.field(c.split), pa.array(out, pa.string()))


def split_counts(samples: pa.Table) -> dict[str, int]:
    """{split: rows} of a samples table (null counted as train)."""
    column = pc.fill_null(with_split_column(samples)[SAMPLE_COLUMNS.split], SPLIT_TRAIN)
    return {str(v["values"]): int(v["counts"]) for v in pc.value_counts(column).to_pylist()}
