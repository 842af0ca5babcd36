"""Rank-aligned bucket batches: the epoch plan of the training loader (pure numpy, no I/O).

Every micro step, ALL ranks draw a micro-batch from the SAME bucket (same (height, width)), and every rank
gets exactly the same number of micro-batches per epoch, so no rank runs out first and hangs the others
(HunyuanDiT's rank-aligned sampler; not Sana's per-rank bucketing).

Plan of epoch e, seeded by (seed, salt, e) only, so every rank computes the same global structure:
 1. group samples by bucket (ratio key, or one group for fixed-size stages);
 2. per bucket: shuffle the shard order, shuffle samples inside each shard, concatenate; drop the tail so
    the count is a multiple of world_size * micro_batch; split it into world_size contiguous spans
    (rank r gets span r: whole shards except at span edges) and shuffle inside each span;
 3. a bucket with n samples per rank gives n // micro_batch micro-batches on every rank;
 4. shuffle the order of all (bucket, micro-batch) pairs with the shared RNG.
The loader position inside an epoch is just the index into that list, so resuming mid-epoch is exact.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class BatchSpec:
    """One micro-batch of one rank: rows of samples.parquet and the bucket's (height, width)."""

    rows: tuple[int, ...]
    bucket: str
    height: int
    width: int


def stable_salt(text: str) -> int:
    """A process-independent integer of a string (Python's hash() is randomised per process)."""
    return zlib.crc32(text.encode())


class EpochPlan:
    """The micro-batches of one rank in one epoch (see the module docstring).

    groups: bucket -> row indices; shard_of: row -> shard id (int); position_in_shard: row -> sample_index;
    sizes: bucket -> (height, width).
    """

    def __init__(self, groups: dict[str, np.ndarray], shard_of: np.ndarray, position_in_shard: np.ndarray,
                 sizes: dict[str, tuple[int, int]], *, seed: int, salt: int, epoch: int, world_size: int,
                 rank: int, micro_batch: int):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside 0..{world_size - 1}")
        self.micro_batch, self.sizes = micro_batch, sizes
        shared = np.random.default_rng([seed, salt, epoch])
        self.spans: dict[str, np.ndarray] = {}
        order: list[tuple[str, int]] = []
        for k, bucket in enumerate(sorted(groups)):
            local = np.random.default_rng([seed, salt, epoch, k, rank])
            span = self._bucket_span(groups[bucket], shard_of, position_in_shard, shared, world_size, rank,
                                     micro_batch, local)
            self.spans[bucket] = span
            order.extend((bucket, i) for i in range(len(span) // micro_batch))
        perm = shared.permutation(len(order))
        self.order = [order[i] for i in perm]

    @staticmethod
    def _bucket_span(rows: np.ndarray, shard_of: np.ndarray, position_in_shard: np.ndarray,
                     rng: np.random.Generator, world_size: int, rank: int, micro_batch: int,
                     local: np.random.Generator) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64)
        shards = np.unique(shard_of[rows])
        shard_rank = np.empty(shards.max() + 1 if len(shards) else 0, dtype=np.int64)
        shard_rank[shards] = rng.permutation(len(shards))
        within = rng.random(len(rows))  # shuffle inside each shard
        # sort by (shuffled shard order, random key, sample index) -> deterministic total order
        idx = np.lexsort((position_in_shard[rows], within, shard_rank[shard_of[rows]]))
        ordered = rows[idx]
        per_rank = len(ordered) // (world_size * micro_batch) * micro_batch
        span = ordered[rank * per_rank:(rank + 1) * per_rank]
        return span[local.permutation(len(span))]

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, i: int) -> BatchSpec:
        bucket, b = self.order[i]
        rows = self.spans[bucket][b * self.micro_batch:(b + 1) * self.micro_batch]
        h, w = self.sizes[bucket]
        return BatchSpec(tuple(int(r) for r in rows), bucket, h, w)

    def buckets(self) -> list[str]:
        """Bucket of every micro-batch in order (identical on all ranks)."""
        return [b for b, _ in self.order]


class PlanSampler:
    """Sampler over an EpochPlan from ``start`` on; yields BatchSpec (DataLoader with batch_size=None)."""

    def __init__(self, plan: EpochPlan, start: int = 0):
        self.plan, self.start = plan, start

    def __iter__(self):
        for i in range(self.start, len(self.plan)):
            yield self.plan[i]

    def __len__(self) -> int:
        return max(0, len(self.plan) - self.start)
