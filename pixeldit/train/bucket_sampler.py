"""The loader's plan: which samples every optimizer step of a stage trains on (pure numpy, no I/O).

A *global batch* is what one optimizer step consumes over all ranks: G = world_size x micro_batch x grad_accum
samples, all from ONE training bucket, so every rank draws the same bucket (same height, width) at every micro
step. The plan depends on G and never on the world size: rank r of W takes the slice [r*G/W, (r+1)*G/W) of
each global batch, and micro step m of that rank the m-th micro_batch of its slice. A run resumed on another
number of ranks with the same G therefore continues the identical global sample sequence, and the ledger
(which samples steps 1..N trained on) is computed from the plan alone.

Input: a ``PlanTable`` (one entry per sample row: source root, global shard id, position in the shard, ratio
key) and a ``selection`` mask over its rows (rows left out never enter any epoch: held-out splits, metadata
filters). Per stage, once:
 1. training buckets: each ratio key is one bucket (aspect stages) or all are one (fixed stages); a bucket
    with fewer than G selected samples joins the bucket nearest in log aspect ratio, repeated until every
    bucket holds at least one global batch (``merges`` says which joined which, and why);
 2. a fixed random key per row (seeded by seed and salt only): the base order of the rotations below.
Per epoch e, seeded by (seed, salt, e):
 3. mixing: source i contributes k_i = round(w_i / sum(w) * N) draws (N: selected rows of all sources),
    the k_i rows of its base order starting at e * k_i (cyclic): a source drawn below its size cycles
    through all of its samples over the epochs, one drawn above its size repeats whole passes;
 4. per bucket, the same rotating window keeps a multiple of G: the samples left out change every epoch,
    and every sample of a bucket is drawn at least once in any 2 consecutive epochs;
 5. per bucket, shuffling with a bounded working set: shuffle the bucket's shards and cut them into blocks
    of ``block_shards``; inside a block spread each shard's shuffled samples evenly over the block
    (proportional interleave); cut the bucket's sequence into global batches of G and sort each batch by
    shard, so the contiguous slice of a rank (and the ranks of one node) reads few shards;
 6. interleave the buckets' global batches in a random order that keeps each bucket's own batch order, so
    each bucket has about one block of shards open at any time.
The resume state is (epoch, global batch index, micro step): the same on every rank.
"""
from __future__ import annotations

import math
import zlib
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

FIXED_BUCKET = "fixed"


def stable_salt(text: str) -> int:
    """A process-independent integer of a string (Python's hash() is randomised per process)."""
    return zlib.crc32(text.encode())


@dataclass(frozen=True)
class BatchSpec:
    """One micro-batch of one rank: rows of the plan table, the bucket and its (height, width), and where it
    sits in the stream (epoch, global batch, micro step)."""

    rows: tuple[int, ...]
    bucket: str
    height: int
    width: int
    epoch: int = 0
    batch: int = 0
    micro: int = 0
    captions: tuple[int, ...] = ()  # caption_index of each row's draw (empty: 0 for all)


@dataclass
class PlanTable:
    """The samples a plan draws from, one entry per row (rows of several roots concatenated)."""

    source: np.ndarray  # (N,) int64: index into ``weights`` (the stage's dataset roots)
    shard: np.ndarray  # (N,) int64: global shard id
    position: np.ndarray  # (N,) int64: sample index inside its shard
    ratio: np.ndarray  # (N,) int64: index into ``ratio_keys``
    ratio_keys: list[str]
    weights: list[float] = field(default_factory=lambda: [1.0])  # mixing weight per source

    def __len__(self) -> int:
        return len(self.shard)


@dataclass(frozen=True)
class Merge:
    """A ratio-key bucket too small for a global batch, trained inside another bucket (cropped to its size)."""

    ratio_key: str
    into: str
    samples: int


def ratio_value(key: str) -> float:
    """height / width of a ratio key such as "0.50" (data_pipeline.buckets)."""
    return float(key)


def merge_small_buckets(counts: dict[str, int], min_count: int) -> tuple[dict[str, str], list[Merge]]:
    """ratio key -> training bucket, merging buckets below ``min_count`` samples into the nearest bucket in
    log aspect ratio (smallest first; the receiving bucket keeps its size). Deterministic."""
    groups = {k: [k] for k in sorted(counts) if counts[k] > 0}
    total = {k: counts[k] for k in groups}
    merges: list[Merge] = []
    while len(groups) > 1:
        small = [g for g in groups if total[g] < min_count]
        if not small:
            break
        g = min(small, key=lambda k: (total[k], k))
        log_g = math.log(ratio_value(g))
        into = min((h for h in groups if h != g), key=lambda h: (abs(math.log(ratio_value(h)) - log_g), h))
        merges.append(Merge(g, into, counts[g]))
        groups[into] += groups.pop(g)
        total[into] += total.pop(g)
        merges = [Merge(m.ratio_key, into if m.into == g else m.into, m.samples) for m in merges]
    return {k: g for g, keys in groups.items() for k in keys}, merges


def rotating_window(order: np.ndarray, k: int, epoch: int) -> np.ndarray:
    """``k`` entries of ``order`` starting at (epoch * k) mod len, wrapping around (repeats when k > len)."""
    n = len(order)
    if n == 0 or k == 0:
        return order[:0]
    start = (epoch * k) % n
    return order[(start + np.arange(k)) % n]


def mix_counts(sizes: list[int], weights: list[float]) -> list[int]:
    """Draws per source in one epoch: shares ``weights`` of the total size (largest remainders)."""
    total, wsum = sum(sizes), float(sum(weights))
    exact = [w / wsum * total for w in weights]
    counts = [int(math.floor(x)) for x in exact]
    for i in sorted(range(len(exact)), key=lambda i: (counts[i] - exact[i], i))[: total - sum(counts)]:
        counts[i] += 1
    return counts


class EpochPlan:
    """The global batches of one epoch: ``rows`` (num_batches, G) plan-table rows, ``buckets`` (num_batches,)
    bucket index into ``bucket_keys``."""

    def __init__(self, rows: np.ndarray, buckets: np.ndarray, bucket_keys: list[str], epoch: int):
        self.rows, self.buckets, self.bucket_keys, self.epoch = rows, buckets, bucket_keys, epoch

    def __len__(self) -> int:
        return len(self.buckets)

    @property
    def global_batch(self) -> int:
        return self.rows.shape[1]

    def bucket(self, b: int) -> str:
        return self.bucket_keys[int(self.buckets[b])]

    def rank_rows(self, b: int, rank: int, world_size: int) -> np.ndarray:
        """Rows of global batch ``b`` that rank ``rank`` of ``world_size`` trains on (all its micro steps)."""
        per_rank = self.global_batch // world_size
        return self.rows[b, rank * per_rank:(rank + 1) * per_rank]

    def positions(self, b: int, start: int = 0, count: int | None = None) -> np.ndarray:
        """Places in the epoch's global order of entries ``start:start + count`` of global batch ``b``
        (b x G + offset): what a per-draw choice (the caption) is keyed by, the same for any world size."""
        count = self.global_batch - start if count is None else count
        return b * self.global_batch + start + np.arange(count, dtype=np.int64)


class StagePlan:
    """The plan of one stage (see the module docstring). ``sizes``: training bucket -> (height, width);
    ``fixed``: one bucket for all samples (``FIXED_BUCKET``)."""

    def __init__(self, table: PlanTable, sizes: dict[str, tuple[int, int]], *, global_batch: int, seed: int,
                 salt: int, block_shards: int = 16, fixed: bool = False, selection: np.ndarray | None = None):
        if global_batch <= 0 or block_shards <= 0:
            raise ValueError(f"global_batch={global_batch} and block_shards={block_shards} must be positive")
        if len(table.weights) != int(table.source.max(initial=-1)) + 1 or any(w <= 0 for w in table.weights):
            raise ValueError(f"need one positive mixing weight per source, got {table.weights}")
        self.table, self.G, self.seed, self.salt = table, int(global_batch), int(seed), int(salt)
        self.block_shards = int(block_shards)
        selected = np.ones(len(table), dtype=bool) if selection is None else np.asarray(selection, dtype=bool)
        if selected.shape != (len(table),):
            raise ValueError(f"selection has shape {selected.shape}, the table {len(table)} rows")
        self.selected_rows = np.flatnonzero(selected)
        ratio_of = table.ratio[self.selected_rows]
        self.ratio_counts = {k: int(c) for k, c in zip(table.ratio_keys, np.bincount(ratio_of,
                                                                                      minlength=len(table.ratio_keys)))}
        if fixed:
            self.bucket_of_ratio = {k: FIXED_BUCKET for k in table.ratio_keys}
            self.merges: list[Merge] = []
            self.bucket_keys = [FIXED_BUCKET]
        else:
            # mixing can change a bucket's count per epoch; the merge uses the selected counts
            self.bucket_of_ratio, self.merges = merge_small_buckets(self.ratio_counts, self.G)
            self.bucket_keys = sorted(set(self.bucket_of_ratio.values()))
        missing = [b for b in self.bucket_keys if b not in sizes]
        if missing:
            raise ValueError(f"no (height, width) for buckets {missing}")
        self.sizes = {b: sizes[b] for b in self.bucket_keys}
        bucket_index = {b: i for i, b in enumerate(self.bucket_keys)}
        self._bucket_of_ratio_id = np.array([bucket_index.get(self.bucket_of_ratio.get(k, ""), -1)
                                             for k in table.ratio_keys], dtype=np.int64)
        base = np.random.default_rng([self.seed, self.salt, 0x5EED])
        self._key = base.random(len(table))  # fixed per stage: the base order of every rotation
        n_sel = len(self.selected_rows)
        sources = table.source[self.selected_rows]
        self._source_rows = []
        for i in range(len(table.weights)):
            rows = self.selected_rows[sources == i]
            self._source_rows.append(rows[np.argsort(self._key[rows], kind="stable")])
        self.mix = mix_counts([len(r) for r in self._source_rows], list(table.weights)) if n_sel else []
        self._cache: OrderedDict[int, EpochPlan] = OrderedDict()

    @property
    def draw_seed(self) -> int:
        """Seed of per-draw choices (``data_pipeline.captions.draw_caption``): the run seed and the stage."""
        return self.seed * 2**32 + self.salt

    # ---- per epoch -----------------------------------------------------------------------------------------

    def epoch(self, e: int) -> EpochPlan:
        """The plan of epoch ``e`` (the three used last are kept; any other is rebuilt, identically)."""
        if e in self._cache:
            self._cache.move_to_end(e)
            return self._cache[e]
        plan = self._cache[e] = self._build(e)
        while len(self._cache) > 3:
            self._cache.popitem(last=False)
        return plan

    def _build(self, e: int) -> EpochPlan:
        rng = np.random.default_rng([self.seed, self.salt, e])
        drawn = [rotating_window(rows, k, e) for rows, k in zip(self._source_rows, self.mix)]  # 3. mixing
        rows = np.concatenate(drawn) if drawn else np.zeros(0, dtype=np.int64)
        bucket = self._bucket_of_ratio_id[self.table.ratio[rows]]
        batches, labels = [], []
        for g in range(len(self.bucket_keys)):
            members = rows[bucket == g]
            kept = (len(members) // self.G) * self.G
            if kept == 0:
                continue
            order = members[np.argsort(self._key[members], kind="stable")]
            window = rotating_window(order, kept, e)  # 4. rotating tail
            batches.append(self._shuffle_bucket(window, rng))  # 5. blocks of shards
            labels.append(np.full(kept // self.G, g, dtype=np.int64))
        if not batches:
            return EpochPlan(np.zeros((0, self.G), dtype=np.int64), np.zeros(0, dtype=np.int64), self.bucket_keys, e)
        label = np.concatenate(labels)
        perm = rng.permutation(len(label))  # 6. interleave, each bucket's batches in their own order
        order_label = label[perm]
        position = np.empty(len(label), dtype=np.int64)
        for g in np.unique(label):
            position[order_label == g] = np.arange(int((label == g).sum()))
        offsets = np.cumsum([0] + [len(b) for b in batches])[:-1]
        group_slot = {int(lab[0]): i for i, lab in enumerate(labels)}
        stacked = np.concatenate(batches)
        index = np.array([offsets[group_slot[int(g)]] for g in order_label], dtype=np.int64) + position
        return EpochPlan(stacked[index], order_label, self.bucket_keys, e)

    def _shuffle_bucket(self, rows: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """(kept // G, G) global batches of one bucket (step 5 of the module docstring)."""
        shard = self.table.shard[rows]
        shards, shard_idx = np.unique(shard, return_inverse=True)
        shard_pos = rng.permutation(len(shards))[shard_idx]  # position of each row's shard in the shuffled order
        block = shard_pos // self.block_shards
        within = rng.random(len(rows))  # in [0, 1): one float key sorts by shard, then randomly inside it
        by_shard = np.argsort(shard_pos + within)  # each shard's samples in shuffled order
        sorted_pos = shard_pos[by_shard]
        first = np.searchsorted(sorted_pos, sorted_pos, side="left")
        rank_in_shard = np.empty(len(rows), dtype=np.float64)
        rank_in_shard[by_shard] = np.arange(len(rows)) - first
        count = np.bincount(shard_pos, minlength=len(shards))[shard_pos]
        offset = rng.random(len(shards))[shard_pos]
        spread = (rank_in_shard + offset) / count  # in [0, 1): proportional interleave inside the block
        sequence = np.argsort(block + spread)
        batches = rows[sequence].reshape(-1, self.G)
        pos = shard_pos[sequence].reshape(-1, self.G)
        return np.take_along_axis(batches, np.argsort(pos, axis=1, kind="stable"), axis=1)

    # ---- reporting -----------------------------------------------------------------------------------------

    def bucket_counts(self) -> dict[str, int]:
        """Selected samples per training bucket (merges applied; before mixing)."""
        out = {b: 0 for b in self.bucket_keys}
        for k, n in self.ratio_counts.items():
            if n and k in self.bucket_of_ratio:
                out[self.bucket_of_ratio[k]] += n
        return out

    def describe(self) -> list[str]:
        """What the stage start prints: merges and why, per-bucket counts, the share left out per epoch."""
        plan0 = self.epoch(0)
        lines = [f"{m.ratio_key} ({m.samples} samples) trains inside bucket {m.into} (cropped to "
                 f"{self.sizes[m.into][0]}x{self.sizes[m.into][1]}): its bucket holds fewer samples than one "
                 f"global batch of {self.G}" for m in self.merges]
        drawn = np.bincount(plan0.buckets, minlength=len(self.bucket_keys)) * self.G
        total = sum(self.mix)
        counts = self.bucket_counts() if len(self.table.weights) == 1 else None
        for g, b in enumerate(self.bucket_keys):
            h, w = self.sizes[b]
            n = counts[b] if counts is not None else int(drawn[g])
            left = n - int(drawn[g]) if counts is not None else 0
            again = ", drawn in the next epoch" if left else ""
            lines.append(f"bucket {b} ({h}x{w}): {n} samples, {int(drawn[g]) // self.G} global batches of "
                         f"{self.G} per epoch, {left} left out per epoch ({100 * left / max(n, 1):.1f}%{again})")
        used = int(drawn.sum())
        lines.append(f"per epoch: {used} of {total} draws in {len(plan0)} global batches "
                     f"({100 * (total - used) / max(total, 1):.1f}% left out, a different part every epoch; every "
                     f"sample is drawn in any 2 consecutive epochs)")
        return lines
