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
    """``samples`` with every null ``split`` decided (see the module docstring); set splits are kept. Only the
    new rows' keys are hashed; the rest is columnar (an incremental run over 10^8 committed rows stays cheap)."""
    check_holdout(fraction, min_per_bucket)
    c = SAMPLE_COLUMNS
    samples = with_split_column(samples)
    split = samples[c.split]
    new = pc.is_null(split).to_numpy(zero_copy_only=False).astype(bool)
    if not new.any():
        return samples
    new_rows = np.flatnonzero(new)
    u = np.full(samples.num_rows, np.inf)
    u[new_rows] = key_uniform(samples[c.key].take(pa.array(new_rows)).to_pylist())
    held = pc.fill_null(pc.equal(split, SPLIT_HELDOUT), False).to_numpy(zero_copy_only=False).astype(bool)
    held |= u < fraction
    if min_per_bucket:
        codes = pc.dictionary_encode(samples[c.ratio_key]).combine_chunks().indices.to_numpy().astype(np.int64)
        size = np.bincount(codes)
        want = np.minimum(min_per_bucket, size // 2) - np.bincount(codes, weights=held, minlength=len(size))
        for code in np.flatnonzero(want > 0):
            candidates = new_rows[(codes[new_rows] == code) & ~held[new_rows]]
            held[candidates[np.argsort(u[candidates], kind="stable")[:int(want[code])]]] = True
    decided = pa.array(np.where(held[new_rows], SPLIT_HELDOUT, SPLIT_TRAIN).tolist(), pa.string())
    values = pc.replace_with_mask(split.combine_chunks().cast(pa.string()), pa.array(new), decided)
    index = samples.column_names.index(c.split)
    return samples.set_column(index, samples.schema.field(c.split), values)


def split_counts(samples: pa.Table) -> dict[str, int]:
    """{split: rows} of a samples table (null counted as train)."""
    column = pc.fill_null(with_split_column(samples)[SAMPLE_COLUMNS.split], SPLIT_TRAIN)
    return {str(v["values"]): int(v["counts"]) for v in pc.value_counts(column).to_pylist()}
