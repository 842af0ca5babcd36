"""Near-duplicate removal over a scored root: perceptual hashes and CLIP image embeddings -> dedupe.parquet.

Two kinds of pair, both from the score stage's outputs (scores.parquet pHash, the parts' image embeddings):
  * ``phash``: Hamming distance of the 64-bit pHashes <= ``phash_distance`` (resized / re-encoded copies are
    typically 0-4 bits apart; unrelated photos ~32). Search: multi-index hashing -- the 64 bits are cut into
    ``phash_distance + 1`` bands, and two hashes within that distance agree exactly on at least one band
    (pigeonhole), so candidates are pairs with an equal band value (sort each band, pair equal neighbours),
    then verified exactly. Cost O(B N log N) for the sorts plus the candidates, about B N^2 / 2^(64/B) for
    uniformly spread hashes (B = bands): ~2 x 10^8 checks at N = 10^6 with the default 4 bits. Flat or
    blank images all hash alike (pHash's blind spot) and land in one band group: their pairs grow as its
    size squared;
  * ``embedding``: cosine of the unit-norm CLIP image embeddings >= ``min_similarity``: an exact blocked
    search, rows ``block`` at a time against the rows after them (``E[i:i+b] @ E[i:].T`` on ``device``, GPU
    when given): N^2 D / 2 multiply-adds, O(block x N) memory, full recall by construction.

Which sample stays: samples are ranked by preference (more pixels first, then key); in rank order a sample is
dropped when it pairs with a better-ranked sample that is kept, and that kept sample is its representative
(pairs: pHash before embedding, then the smaller distance). So every dropped sample is within the threshold
of its own representative (no chains), and a representative is never dropped. Undecodable samples (NaN
clip_score) are left out of both searches.

dedupe.parquet (``DedupeRow``: key, representative, reason, distance) is written atomically; the loader leaves
its keys out through ``keep_mask``.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pixeldit.storage import join

from .dataset_format import (DEDUPE, DEDUPE_SCHEMA, SAMPLE_COLUMNS, SCORES, committed_samples, curation_metadata,
                             read_dedupe, read_manifest, read_score_part, read_scores, write_table)

REASONS = ("phash", "embedding")  # preference order when a pair qualifies both ways


@dataclass(frozen=True)
class DedupeConfig:
    phash_distance: int | None = 4  # max Hamming distance of pHashes (bits); None: no pHash dedupe
    min_similarity: float | None = 0.95  # min cosine of image embeddings; None: no embedding dedupe
    block: int = 4096
    device: str = "cpu"
    storage_options: dict[str, Any] | None = None


@dataclass
class DedupeSummary:
    root: str
    samples: int
    dropped: int
    by_reason: dict[str, int]
    candidate_pairs: int
    seconds: float


def _bands(max_distance: int) -> list[tuple[int, int]]:
    """(shift, bits) of max_distance + 1 contiguous bands covering 64 bits."""
    count = max_distance + 1
    widths = [64 // count + (1 if b < 64 % count else 0) for b in range(count)]
    shifts = np.concatenate([[0], np.cumsum(widths)[:-1]]).tolist()
    return [(int(s), int(w)) for s, w in zip(shifts, widths)]


def phash_pairs(hashes: np.ndarray, max_distance: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All pairs (i < j) of 64-bit hashes within ``max_distance`` bits: (i, j, distance) int64 arrays."""
    if not 0 <= max_distance <= 31:
        raise ValueError(f"phash distance {max_distance} must be in 0..31 (bits of a 64-bit hash)")
    h = np.asarray(hashes, dtype=np.uint64)
    found_i, found_j = [], []
    for shift, bits in _bands(max_distance):
        band = (h >> np.uint64(shift)) & np.uint64((1 << bits) - 1)
        order = np.argsort(band, kind="stable")
        sorted_band = band[order]
        d = 1
        while d < len(order):  # equal values are contiguous: pair each with the ones d places further
            same = np.flatnonzero(sorted_band[d:] == sorted_band[:-d])
            if len(same) == 0:
                break
            found_i.append(order[same])
            found_j.append(order[same + d])
            d += 1
    if not found_i:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, empty
    a, b = np.concatenate(found_i), np.concatenate(found_j)
    i, j = np.minimum(a, b).astype(np.int64), np.maximum(a, b).astype(np.int64)
    pair = np.unique(i * len(h) + j)  # a pair agreeing on several bands is found once per band
    i, j = pair // len(h), pair % len(h)
    dist = np.bitwise_count(h[i] ^ h[j]).astype(np.int64)
    keep = dist <= max_distance
    return i[keep], j[keep], dist[keep]


def embedding_pairs(embeddings: np.ndarray, min_similarity: float, block: int = 4096,
                    device: str = "cpu") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All pairs (i < j) of unit-norm rows with cosine >= ``min_similarity``: (i, j, 1 - cosine)."""
    import torch

    if not -1.0 <= min_similarity <= 1.0:
        raise ValueError(f"min_similarity {min_similarity} must be a cosine in [-1, 1]")
    dev = torch.device(device)
    dtype = torch.float16 if dev.type == "cuda" else torch.float32
    emb = torch.from_numpy(np.ascontiguousarray(embeddings)).to(dev).float()  # (N, D)
    emb = torch.nn.functional.normalize(emb, dim=-1).to(dtype)  # unit norm again after fp16 storage
    out_i, out_j, out_d = [], [], []
    for s in range(0, len(emb), block):
        sims = emb[s:s + block] @ emb[s:].T  # (b, N - s)
        r, c = torch.nonzero(sims.float() >= min_similarity, as_tuple=True)
        upper = c > r  # column s + c after row s + r
        r, c = r[upper], c[upper]
        out_i.append((r + s).cpu().numpy())
        out_j.append((c + s).cpu().numpy())
        out_d.append((1.0 - sims[r, c].float()).clamp(min=0).cpu().numpy())
    if not out_i:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float64)
    return (np.concatenate(out_i).astype(np.int64), np.concatenate(out_j).astype(np.int64),
            np.concatenate(out_d).astype(np.float64))


def choose_representatives(rank: np.ndarray, pairs: list[tuple[np.ndarray, np.ndarray, np.ndarray]]
                           ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Greedy leader selection (module docstring). ``rank``: (N,) preference, lower is better (a permutation);
    ``pairs[k]``: (i, j, distance) of reason REASONS[k]. Returns (dropped, representative, reason code, distance)."""
    a = np.concatenate([p[0] for p in pairs]) if pairs else np.zeros(0, np.int64)
    b = np.concatenate([p[1] for p in pairs]) if pairs else np.zeros(0, np.int64)
    dist = np.concatenate([p[2] for p in pairs]).astype(np.float64) if pairs else np.zeros(0)
    reason = np.concatenate([np.full(len(p[0]), k) for k, p in enumerate(pairs)]) if pairs else np.zeros(0, np.int64)
    better = np.where(rank[a] < rank[b], a, b)
    worse = np.where(rank[a] < rank[b], b, a)
    order = np.lexsort((dist, reason, rank[worse]))
    kept = np.ones(len(rank), dtype=bool)
    dropped, reps, codes, dists = [], [], [], []
    for k in order.tolist():
        x, y = int(worse[k]), int(better[k])
        if kept[x] and kept[y]:  # y's own decision is final: it ranks before x
            kept[x] = False
            dropped.append(x), reps.append(y), codes.append(int(reason[k])), dists.append(float(dist[k]))
    return (np.array(dropped, np.int64), np.array(reps, np.int64), np.array(codes, np.int64),
            np.array(dists, np.float64))


def read_embeddings(root: str, keys: pa.Array, storage_options: dict[str, Any] | None = None) -> np.ndarray:
    """(N, D) float16 image embeddings of ``keys`` from the score parts of their shards."""
    scores = read_scores(root, storage_options).select(["key", "shard"])
    shards = sorted(set(scores.filter(pc.is_in(scores["key"], value_set=keys))["shard"].to_pylist()))
    table = pa.concat_tables([read_score_part(root, s, storage_options, columns=["key", "image_embedding"])
                              for s in shards]).combine_chunks()
    raw = table["image_embedding"].chunk(0) if table.num_rows else pa.array([], pa.binary())
    offsets = np.frombuffer(raw.buffers()[1], dtype=np.int32, count=len(raw) + 1, offset=raw.offset * 4)
    widths = np.diff(offsets)
    if len(raw) and (widths != widths[0]).any():
        raise ValueError(f"{root}: score parts hold image embeddings of different sizes; rerun the score stage")
    data = np.frombuffer(raw.buffers()[2], dtype=np.uint8)[offsets[0]:offsets[-1]] if len(raw) else np.zeros(0)
    emb = data.view("<f2").reshape(len(raw), -1)
    pos = pc.index_in(keys, value_set=table["key"])
    if pos.null_count:
        raise ValueError(f"{root}: {pos.null_count} keys have no score part row; rerun the score stage")
    return emb[pos.to_numpy(zero_copy_only=False).astype(np.int64)]


def dedupe_dataset(root: str, cfg: DedupeConfig = DedupeConfig()) -> DedupeSummary:
    """Find near-duplicates among the scored samples of ``root`` and write dedupe.parquet."""
    start = time.perf_counter()
    options = cfg.storage_options
    scores = read_scores(root, options)
    meta = curation_metadata(scores.schema, join(root, SCORES))
    samples = committed_samples(root, read_manifest(root, options))
    c = SAMPLE_COLUMNS
    size = samples.select([c.key, c.width, c.height])
    scores = scores.filter(pc.is_valid(pc.index_in(scores["key"], value_set=size[c.key])))  # committed only
    scores = scores.filter(pc.invert(pc.is_nan(scores["clip_score"])))  # decodable only
    n = scores.num_rows
    keys = scores["key"].combine_chunks()
    at = pc.index_in(keys, value_set=size[c.key]).to_numpy(zero_copy_only=False).astype(np.int64)
    pixels = (size[c.width].to_numpy().astype(np.int64) * size[c.height].to_numpy().astype(np.int64))[at]
    key_order = np.argsort(np.array(keys.to_pylist(), dtype=object), kind="stable")
    key_rank = np.empty(n, np.int64)
    key_rank[key_order] = np.arange(n)
    preference = np.lexsort((key_rank, -pixels))
    rank = np.empty(n, np.int64)
    rank[preference] = np.arange(n)
    pairs = []
    if cfg.phash_distance is not None:
        pairs.append(phash_pairs(scores["phash"].to_numpy(), cfg.phash_distance))
    else:
        pairs.append((np.zeros(0, np.int64),) * 3)
    if cfg.min_similarity is not None:
        emb = read_embeddings(root, keys, options)
        pairs.append(embedding_pairs(emb, cfg.min_similarity, cfg.block, cfg.device))
    candidate_pairs = sum(len(p[0]) for p in pairs)
    dropped, reps, codes, dists = choose_representatives(rank, pairs)
    table = pa.table({"key": keys.take(pa.array(dropped)), "representative": keys.take(pa.array(reps)),
                      "reason": pa.array([REASONS[k] for k in codes.tolist()], pa.string()),
                      "distance": pa.array(dists, pa.float32())})
    table = table.sort_by("key")
    run = {"phash_distance": cfg.phash_distance, "min_similarity": cfg.min_similarity, "scores_run": meta.get("run")}
    write_table(join(root, DEDUPE), table, DEDUPE_SCHEMA, run, options)
    by_reason = {r: int((codes == k).sum()) for k, r in enumerate(REASONS)}
    return DedupeSummary(root=root, samples=n, dropped=len(dropped), by_reason=by_reason,
                         candidate_pairs=candidate_pairs, seconds=time.perf_counter() - start)


def keep_mask(root: str, keys: pa.Array, storage_options: dict[str, Any] | None = None) -> np.ndarray:
    """(N,) bool over ``keys`` (e.g. ``SampleIndex.keys``): False for samples dedupe.parquet drops; all True when
    dedupe has not run on ``root``."""
    table = read_dedupe(root, storage_options)
    if table is None:
        return np.ones(len(keys), dtype=bool)
    dropped = pc.is_in(keys, value_set=table["key"].combine_chunks())
    return ~dropped.to_numpy(zero_copy_only=False).astype(bool)
