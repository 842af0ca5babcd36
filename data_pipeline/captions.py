"""Several captions per image: where they come from, how they are ordered, and the per-draw caption choice.

Sources of a sample's captions (its *caption set*), in ``caption_index`` order:
  0. ``caption`` of samples.parquet (the original alt text; kept even when empty, as the pipeline kept it);
  1. columns ``caption_<source>`` of samples.parquet, when the input carried them (null / empty: none);
  2. side files keyed by sample: JSONL lines or parquet rows ``{"key", "source", "caption"[, "score"]}``.
Sources 1 and 2 are ordered by source name. ``source`` matches ``[A-Za-z0-9_-]+`` and is not ``caption``
(reserved for 0); one caption per (key, source); a given ``score`` must be on the CLIP cosine scale
(it replaces the CLIP score of that caption in the draw). Side rows whose key is not in the dataset are
counted and left out (side files usually cover a superset of what survived sharding). A malformed row is an
error naming the file and the JSONL line / parquet row (1-based).

The score stage (data_pipeline/score.py) scores every caption against its image and writes captions.parquet
(``CaptionRow``: key, shard, sample_index, caption_index, source, caption, clip_score, score).

The draw (the official recipe): each time the loader uses a sample it picks caption i with probability
softmax(score / T)_i, T = 0.1 by default (``DEFAULT_CAPTION_TEMPERATURE``; scores are cosines, so T = 0.1 turns a
0.05 cosine gap into a factor e^0.5 = 1.65). ``draw_caption`` is a pure function of (scores, T, seed, epoch,
global position in the epoch's order, key): the same on every rank, any world size, and after a resume. The
uniform number is the first 53 bits of BLAKE2b(seed, epoch, position, key); the caption is the inverse CDF at it.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import math
import re
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pixeldit.errors import DataError
from pixeldit.storage import fs_and_path

from .dataset_format import CAPTIONS, SAMPLES, read_captions

PRIMARY_SOURCE = "caption"  # the samples.parquet column; caption_index 0
COLUMN_PREFIX = "caption_"  # samples.parquet columns caption_<source>
SIDE_COLUMNS = ("key", "source", "caption", "score")  # score optional
DEFAULT_CAPTION_TEMPERATURE = 0.1
_SOURCE = re.compile(r"[A-Za-z0-9_-]+")
_DRAW_PERSON = b"pixeldit-capdraw"  # BLAKE2b personalisation: draws never collide with other hashes


# ---- side files ----------------------------------------------------------------------------------------------


def _check_side_row(url: str, where: str, row: Any) -> tuple[str, str, str, float | None]:
    if not isinstance(row, dict):
        raise DataError(f"{url} {where}: not an object with key, source, caption[, score]")
    unknown = sorted(set(row) - set(SIDE_COLUMNS))
    if unknown:
        raise DataError(f"{url} {where}: unknown field(s) {unknown}; a side caption has {', '.join(SIDE_COLUMNS)}")
    for name in ("key", "source", "caption"):
        if not isinstance(row.get(name), str):
            raise DataError(f"{url} {where}: {name!r} must be a string, got {row.get(name)!r}")
    key, source, caption, score = row["key"], row["source"], row["caption"], row.get("score")
    if not key:
        raise DataError(f"{url} {where}: empty key")
    if not _SOURCE.fullmatch(source) or source == PRIMARY_SOURCE:
        raise DataError(f"{url} {where}: source {source!r} must match [A-Za-z0-9_-]+ and not be {PRIMARY_SOURCE!r} "
                        f"(the {SAMPLES} caption)")
    if not caption.strip():
        raise DataError(f"{url} {where}: empty caption for key {key!r} source {source!r}")
    if score is not None:
        if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
            raise DataError(f"{url} {where}: score must be a finite number, got {score!r}")
        score = float(score)
    return key, source, caption, score


def _side_rows(url: str, storage_options: dict[str, Any] | None) -> tuple[list[tuple], list[str], str]:
    """(rows (key, source, caption, score), where each row came from, SHA-256 of the file) of one side file."""
    fs, path = fs_and_path(url, storage_options)
    if not fs.exists(path):
        raise FileNotFoundError(f"side caption file {url} not found")
    data = fs.cat_file(path)
    digest = hashlib.sha256(data).hexdigest()
    rows, where = [], []
    if path.endswith(".parquet"):
        table = pq.read_table(io.BytesIO(data))
        missing = [c for c in SIDE_COLUMNS[:3] if c not in table.column_names]
        if missing:
            raise DataError(f"{url}: missing column(s) {missing}; a side caption file has {', '.join(SIDE_COLUMNS)}")
        for n, row in enumerate(table.to_pylist(), start=1):
            if row.get("score", 0) is None:  # a null score: none given
                del row["score"]
            rows.append(_check_side_row(url, f"row {n}", row))
            where.append(f"{url} row {n}")
    elif path.endswith((".jsonl", ".jsonl.gz")):
        text = gzip.decompress(data) if path.endswith(".gz") else data
        for n, line in enumerate(text.split(b"\n"), start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise DataError(f"{url} line {n}: not valid JSON ({err})") from None
            rows.append(_check_side_row(url, f"line {n}", obj))
            where.append(f"{url} line {n}")
    else:
        raise ValueError(f"side caption file {url}: unknown format; use .jsonl, .jsonl.gz or .parquet")
    return rows, where, digest


# ---- caption sets --------------------------------------------------------------------------------------------


@dataclass
class CaptionSources:
    """Every caption of the samples, ordered (shard, sample_index, caption_index), before scoring."""

    table: pa.Table  # key, shard, sample_index, caption_index, source, caption, given_score (null: use CLIP's)
    side_unknown_keys: int  # side rows whose key is not among ``dataset_keys`` (left out)
    sources: list[str]  # every source present, caption_index order of precedence
    side_digest: str  # SHA-256 over the side files' bytes (in the order given)


def collect_captions(samples: pa.Table, side_files: Sequence[str] = (), dataset_keys: pa.Array | None = None,
                     storage_options: dict[str, Any] | None = None) -> CaptionSources:
    """The caption set of every sample of ``samples`` (rows of samples.parquet, e.g. those of some shards) from the
    sources of the module docstring. Side rows of keys not in ``samples`` are left out; those not in
    ``dataset_keys`` (default: samples' keys) are counted as unknown."""
    base = samples.select(["key", "shard", "sample_index"])
    parts: list[dict[str, list]] = []
    origins: list[str] = []  # per caption row, for error messages

    def add(table: pa.Table, source: str | list[str], caption: pa.ChunkedArray, given, origin: list[str]) -> None:
        n = table.num_rows
        parts.append({"key": table["key"].to_pylist(), "shard": table["shard"].to_pylist(),
                      "sample_index": table["sample_index"].to_pylist(),
                      "source": [source] * n if isinstance(source, str) else source,
                      "caption": [c or "" for c in caption.to_pylist()], "given_score": given or [None] * n})
        origins.extend(origin)

    add(base, PRIMARY_SOURCE, samples["caption"], None, [f"{SAMPLES} caption"] * base.num_rows)
    column_sources = sorted(c[len(COLUMN_PREFIX):] for c in samples.column_names if c.startswith(COLUMN_PREFIX))
    for src in column_sources:
        col = samples[COLUMN_PREFIX + src]
        keep = pc.and_(pc.is_valid(col), pc.greater(pc.utf8_length(pc.fill_null(col, "")), 0))
        sub = samples.filter(keep)
        add(sub, src, sub[COLUMN_PREFIX + src], None, [f"{SAMPLES} column {COLUMN_PREFIX}{src}"] * sub.num_rows)
    unknown = 0
    side_hash = hashlib.sha256()
    where_of_key = {k: (s, i) for k, s, i in zip(*(base[c].to_pylist() for c in ("key", "shard", "sample_index")))}
    for url in side_files:
        rows, where, digest = _side_rows(url, storage_options)
        side_hash.update(digest.encode())
        known = [(r, w) for r, w in zip(rows, where) if r[0] in where_of_key]
        if dataset_keys is None:
            unknown += len(rows) - len(known)
        else:
            unknown += int(pc.sum(pc.invert(pc.is_in(pa.array([r[0] for r in rows], pa.string()),
                                                     value_set=dataset_keys))).as_py() or 0)
        parts.append({"key": [r[0] for r, _ in known], "shard": [where_of_key[r[0]][0] for r, _ in known],
                      "sample_index": [where_of_key[r[0]][1] for r, _ in known], "source": [r[1] for r, _ in known],
                      "caption": [r[2] for r, _ in known], "given_score": [r[3] for r, _ in known]})
        origins.extend(w for _, w in known)
    cols = {name: [v for p in parts for v in p[name]] for name in parts[0]}
    sources = [PRIMARY_SOURCE] + sorted(set(cols["source"]) - {PRIMARY_SOURCE})
    rank = {s: n for n, s in enumerate(sources)}
    order_key = np.array([rank[s] for s in cols["source"]], dtype=np.int64)
    keys = np.array(cols["key"], dtype=object)
    # one caption per (key, source): find a repeat, name both origins
    by_pair = np.lexsort((order_key, keys)) if len(keys) else np.array([], dtype=np.int64)
    same = (keys[by_pair][1:] == keys[by_pair][:-1]) & (order_key[by_pair][1:] == order_key[by_pair][:-1])
    if same.any():
        a, b = by_pair[int(np.flatnonzero(same)[0])], by_pair[int(np.flatnonzero(same)[0]) + 1]
        first, second = sorted((a, b))
        raise DataError(f"{origins[second]}: sample {keys[a]!r} already has a caption from source "
                        f"{cols['source'][a]!r} ({origins[first]}); one caption per (key, source)")
    shard, index = np.array(cols["shard"], dtype=object), np.array(cols["sample_index"], dtype=np.int64)
    order = np.lexsort((order_key, index, shard)) if len(keys) else np.array([], dtype=np.int64)
    # caption_index: position inside the (shard, sample_index) group
    s_sorted, i_sorted = shard[order], index[order]
    new_group = np.ones(len(order), dtype=bool)
    new_group[1:] = (s_sorted[1:] != s_sorted[:-1]) | (i_sorted[1:] != i_sorted[:-1])
    starts = np.flatnonzero(new_group)
    group_start = starts[np.cumsum(new_group) - 1]
    caption_index = np.arange(len(order)) - group_start
    table = pa.table({
        "key": pa.array(keys[order].tolist(), pa.string()), "shard": pa.array(s_sorted.tolist(), pa.string()),
        "sample_index": pa.array(i_sorted, pa.int32()), "caption_index": pa.array(caption_index, pa.int32()),
        "source": pa.array([cols["source"][i] for i in order], pa.string()),
        "caption": pa.array([cols["caption"][i] for i in order], pa.string()),
        "given_score": pa.array([cols["given_score"][i] for i in order], pa.float32()),
    })  # fmt: skip
    return CaptionSources(table=table, side_unknown_keys=unknown, sources=sources, side_digest=side_hash.hexdigest())


# ---- the draw ------------------------------------------------------------------------------------------------


def caption_probabilities(scores: Sequence[float] | np.ndarray, temperature: float) -> np.ndarray:
    """softmax(scores / temperature) in float64 (max subtracted first)."""
    if not temperature > 0:
        raise ValueError(f"caption temperature must be > 0, got {temperature}")
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 1 or len(s) == 0 or not np.isfinite(s).all():
        raise ValueError(f"caption scores must be a non-empty 1-d array of finite numbers, got {s!r}")
    z = np.exp((s - s.max()) / temperature)
    return z / z.sum()


def draw_uniform(seed: int, epoch: int, position: int, key: str) -> float:
    """A uniform number in [0, 1) determined by (seed, epoch, position, key) alone (53 bits of BLAKE2b)."""
    text = f"{int(seed)}\x1f{int(epoch)}\x1f{int(position)}\x1f{key}".encode()
    digest = hashlib.blake2b(text, digest_size=8, person=_DRAW_PERSON).digest()
    return (int.from_bytes(digest, "little") >> 11) / float(1 << 53)


def draw_caption(scores: Sequence[float] | np.ndarray, temperature: float, *, seed: int, epoch: int,
                 position: int, key: str) -> int:
    """The caption_index to use for one draw of sample ``key`` at ``position`` of epoch ``epoch``'s global order:
    caption i with probability softmax(scores / temperature)_i (module docstring). Pure and deterministic."""
    if len(scores) == 1:
        return 0
    cdf = np.cumsum(caption_probabilities(scores, temperature))
    u = draw_uniform(seed, epoch, position, key) * cdf[-1]
    return int(min(np.searchsorted(cdf, u, side="right"), len(cdf) - 1))


@dataclass
class CaptionSets:
    """captions.parquet aligned with a sample index (the loader's view): row r of the index has captions
    ``offsets[r]:offsets[r + 1]`` of the flat arrays, in caption_index order."""

    offsets: np.ndarray  # (N + 1,) int64
    scores: np.ndarray  # (C,) float64: the draw's score per caption
    captions: pa.Array  # (C,) string

    def scores_of(self, row: int) -> np.ndarray:
        return self.scores[self.offsets[row]:self.offsets[row + 1]]

    def caption(self, row: int, caption_index: int) -> str:
        n = int(self.offsets[row + 1] - self.offsets[row])
        if not 0 <= caption_index < n:
            raise IndexError(f"caption_index {caption_index} outside the {n} captions of index row {row}")
        return self.captions[int(self.offsets[row]) + caption_index].as_py()

    def draw(self, row: int, temperature: float, *, seed: int, epoch: int, position: int, key: str) -> int:
        """``draw_caption`` for index row ``row``."""
        return draw_caption(self.scores_of(row), temperature, seed=seed, epoch=epoch, position=position, key=key)


def read_caption_sets(root: str, keys: pa.Array, storage_options: dict[str, Any] | None = None) -> CaptionSets:
    """captions.parquet of ``root`` ordered like ``keys`` (e.g. ``SampleIndex.keys``); every key must have its
    caption set there (else the score stage is older than the samples: rerun it)."""
    table = read_captions(root, storage_options, columns=["key", "caption_index", "score", "caption"]).combine_chunks()
    pos = pc.index_in(table["key"], value_set=keys)
    known = pc.is_valid(pos)
    table, pos = table.filter(known), pc.filter(pos, known)
    row = pos.to_numpy(zero_copy_only=False).astype(np.int64)
    cidx = table["caption_index"].to_numpy().astype(np.int64)
    order = np.lexsort((cidx, row))
    row, cidx = row[order], cidx[order]
    counts = np.bincount(row, minlength=len(keys))
    if (counts == 0).any():
        first = int(np.flatnonzero(counts == 0)[0])
        raise DataError(f"{root}: sample {keys[first].as_py()!r} has no caption in {CAPTIONS} "
                        f"({int((counts == 0).sum())} such samples); rerun `pixeldit-data score {root}`")
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    if not np.array_equal(cidx, np.arange(len(cidx)) - offsets[row]):
        bad = int(np.flatnonzero(cidx != np.arange(len(cidx)) - offsets[row])[0])
        raise DataError(f"{root}: captions of sample {keys[int(row[bad])].as_py()!r} in {CAPTIONS} do not have "
                        "caption_index 0..k-1; rerun the score stage")
    scores = table["score"].to_numpy(zero_copy_only=False).astype(np.float64)[order]
    return CaptionSets(offsets=offsets, scores=scores, captions=table["caption"].take(pa.array(order)).combine_chunks()
                       if table.num_rows else pa.array([], pa.string()))
