"""The dataset roots of a stage as one sample table, checked against their manifests (step 1 of loader.py).

``open_sources``: per root of the stage (``stage.data_sources()``, each with a mixing weight),
``read_sample_index`` (data_pipeline.dataset_format), concatenated into a ``SourceSet`` (global row and shard
ids; per-row arrays the plan and the readers use). Before the first step every shard is checked against
manifest.parquet (``check_stage_data``: present, same size, one listing per root): all damaged shards are
named in one error, or, with ``data.skip_damaged_shards``, their samples are left out of the selection and
counted. The curate stage's outputs are plan inputs too (``selection_masks``, ``caption_sets``):
 - near-duplicates that ``data_pipeline.dedupe`` dropped (the root's dedupe.parquet) are left out of the
   selection, so no epoch ever plans them;
 - a stage's row filter (``stages.N.filter``, e.g. ``aesthetic >= 6``: ``data_pipeline.filters.stage_mask`` over
   the metadata columns of samples.parquet) leaves out the rows where it does not hold, so a stage trains on a
   subset of the same shards without re-sharding;
 - a root with several captions per sample (captions.parquet of the score stage, ``data_pipeline.captions``)
   gets one caption per draw, caption i with probability softmax(score / T)_i (``data.caption_temperature``),
   a pure function of (seed, stage, epoch, global position in the epoch, key): ``SourceSet.draw_captions``.
``SourceSet.fingerprints`` (shards, selection, captions) let the ledger refuse a root that changed since it
was trained on.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from data_pipeline.captions import CaptionSets, draw_caption, read_caption_sets
from data_pipeline.dataset_format import (CAPTIONS, MANIFEST, SAMPLES, SampleIndex, ShardProblem, check_shards,
                                          read_manifest, read_sample_index, require_committed)
from data_pipeline.dedupe import keep_mask
from data_pipeline.filters import stage_mask
from pixeldit.errors import DataError
from pixeldit.node_cache import RemoteFile
from pixeldit.storage import exists, is_local, join

from .bucket_sampler import PlanTable
from .config import RunConfig


@dataclass
class SourceSet:
    """The sample indexes of a stage's roots, concatenated: global row r belongs to source
    ``searchsorted(row_offset, r, 'right') - 1``; shards get global ids the same way."""

    roots: list[str]
    weights: list[float]
    indexes: list[SampleIndex]
    storage_options: dict[str, Any]
    left_out: dict[str, list[str]] = field(default_factory=dict)  # root -> damaged shards left out
    caption_sets: list[CaptionSets | None] = field(default_factory=list)  # per root; None: one caption each
    selection: np.ndarray | None = None  # (N,) bool: rows the plan may draw (open_sources sets it)
    heldout_rows: np.ndarray | None = None  # rows of the held-out split (never drawn; the validation loss's)

    def __post_init__(self) -> None:
        ix = self.indexes
        self.row_offset = np.cumsum([0] + [len(i) for i in ix])
        self.shard_offset = np.cumsum([0] + [len(i.shards) for i in ix])
        self.ratio_keys = sorted({k for i in ix for k in i.ratio_keys})
        rid = {k: n for n, k in enumerate(self.ratio_keys)}
        self.source = np.concatenate([np.full(len(i), s, dtype=np.int64) for s, i in enumerate(ix)])
        self.shard = np.concatenate([i.shard_id + self.shard_offset[s] for s, i in enumerate(ix)])
        self.ratio = np.concatenate([np.array([rid[k] for k in i.ratio_keys], dtype=np.int64)[i.ratio_id]
                                     for i in ix])
        self.image_offset = np.concatenate([i.image_offset for i in ix])
        self.image_size = np.concatenate([i.image_size for i in ix])
        self.sample_index = np.concatenate([i.sample_index for i in ix])
        self.label = np.concatenate([i.label for i in ix])
        self.shard_rel = [s for i in ix for s in i.shards]
        self.shard_bytes = np.concatenate([i.shard_bytes for i in ix])
        self.shard_source = np.concatenate([np.full(len(i.shards), s, dtype=np.int64) for s, i in enumerate(ix)])
        self.remote = [not is_local(r) for r in self.roots]
        self.caption_sets = list(self.caption_sets) or [None] * len(ix)

    def __len__(self) -> int:
        return len(self.shard)

    def locate(self, row: int) -> tuple[int, int]:
        s = int(np.searchsorted(self.row_offset, row, side="right") - 1)
        return s, int(row - self.row_offset[s])

    def key(self, row: int) -> str:
        s, r = self.locate(row)
        return self.indexes[s].keys[r].as_py()

    def caption(self, row: int, caption_index: int = 0) -> str:
        """Caption ``caption_index`` of a row (0: the samples.parquet caption)."""
        s, r = self.locate(row)
        sets = self.caption_sets[s]
        if sets is None:
            if caption_index != 0:
                raise IndexError(f"{self.roots[s]} has one caption per sample, not caption_index {caption_index}")
            return self.indexes[s].captions[r].as_py()
        return sets.caption(r, caption_index)

    def draw_captions(self, rows, positions, *, seed: int, epoch: int, temperature: float) -> np.ndarray:
        """(len(rows),) int64: the caption_index each draw uses (``data_pipeline.captions.draw_caption`` of the
        row's scores; 0 for roots without captions.parquet). ``positions``: each draw's place in the epoch's
        global order (global batch x G + offset), so the choice is the same for any world size and resume."""
        out = np.zeros(len(rows), dtype=np.int64)
        for j, (row, pos) in enumerate(zip(rows, positions)):
            s, r = self.locate(int(row))
            sets = self.caption_sets[s]
            if sets is not None and sets.offsets[r + 1] - sets.offsets[r] > 1:
                out[j] = draw_caption(sets.scores_of(r), temperature, seed=seed, epoch=epoch, position=int(pos),
                                      key=self.indexes[s].keys[r].as_py())
        return out

    def shard_url(self, shard: int) -> str:
        return join(self.roots[int(self.shard_source[shard])], self.shard_rel[shard])

    def shard_file(self, shard: int) -> RemoteFile:
        return RemoteFile(self.shard_url(shard), int(self.shard_bytes[shard]))

    def table(self) -> PlanTable:
        return PlanTable(self.source, self.shard, self.sample_index, self.ratio, self.ratio_keys, list(self.weights))

    def fingerprints(self) -> list[dict[str, Any]]:
        """Per root: rows, a digest of its committed shards, of the rows the plan may draw (dedupe, filters,
        shards left out) and of its caption sets (None without captions.parquet): the ledger checks the plan's
        inputs are unchanged."""
        out = []
        selection = np.ones(len(self), dtype=bool) if self.selection is None else self.selection
        for s, (root, ix) in enumerate(zip(self.roots, self.indexes)):
            text = "\n".join(f"{name}\t{b}" for name, b in zip(ix.shards, ix.shard_bytes.tolist()))
            own = selection[self.row_offset[s]:self.row_offset[s + 1]]
            sets = self.caption_sets[s]
            captions = None if sets is None else _digest(sets.offsets.tobytes() + sets.scores.tobytes())
            out.append({"root": root, "samples": len(ix), "digest": _digest(text.encode()),
                        "selected": int(own.sum()), "selection": _digest(np.packbits(own).tobytes()),
                        "captions": captions})
        return out


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def selection_masks(cfg: RunConfig, stage_index: int, root: str, index: SampleIndex) -> list[tuple[str, np.ndarray]]:
    """The plan inputs that leave rows of one root of a stage out: [(what, keep mask over the rows of
    ``index``)]: the near-duplicates ``data_pipeline.dedupe`` dropped (dedupe.parquet; none when the root was
    not deduplicated) and the rows where the stage's row filter (``stages.N.filter``, ``data_pipeline.filters``:
    metadata columns of samples.parquet) does not hold, so a stage trains on a subset of the same shards."""
    stage, options = cfg.stages[stage_index], cfg.data.storage_options
    masks = [("near-duplicates (dedupe)", keep_mask(root, index.keys, options))]
    if stage.filter:
        where = f"stages.{stage_index} ({stage.name}).filter"
        masks.append((f"{where} {stage.filter!r} does not hold",
                      stage_mask(root, stage.filter, options, keys=index.keys, where=where)))
    return [(what, mask) for what, mask in masks if not mask.all()]


def caption_sets(cfg: RunConfig, root: str, index: SampleIndex) -> CaptionSets | None:
    """The caption sets of a root aligned with ``index`` (None without captions.parquet: one caption each)."""
    if not exists(join(root, CAPTIONS), cfg.data.storage_options):
        return None
    return read_caption_sets(root, index.keys, cfg.data.storage_options)


def check_stage_data(cfg: RunConfig, stage_index: int, skip: set[str] = frozenset()) -> dict[str, list[ShardProblem]]:
    """{root: shards that do not match its manifest} for every root of the stage but those in ``skip``
    (one listing per root)."""
    out = {}
    for src in cfg.stages[stage_index].data_sources():
        if src.path in skip:
            continue
        require_committed(src.path, cfg.data.storage_options)
        out[src.path] = check_shards(src.path, read_manifest(src.path, cfg.data.storage_options),
                                     cfg.data.storage_options)
    return out


def _damaged_list(problems: dict[str, list[ShardProblem]]) -> str:
    bad = [(root, p) for root, ps in problems.items() for p in ps]
    listed = "; ".join(f"{join(root, p.shard)}: {p.problem}" for root, p in bad[:20])
    return listed + (f"; and {len(bad) - 20} more" if len(bad) > 20 else "")


def damaged_shards_error(cfg: RunConfig, stage_index: int, problems: dict[str, list[ShardProblem]]) -> str | None:
    """The one-line error naming every damaged shard of a stage (None when there is none)."""
    count = sum(len(ps) for ps in problems.values())
    if not count:
        return None
    stage = cfg.stages[stage_index]
    return (f"stage {stage_index} ({stage.name}): {count} shards do not match {MANIFEST}: {_damaged_list(problems)}. "
            f"Training would stop when a batch needs one: restore them (rerun the sharding), or set "
            f"data.skip_damaged_shards=true to train without their samples")


def open_sources(cfg: RunConfig, stage_index: int, num_classes: int | None = None,
                 problems: dict[str, list[ShardProblem]] | None = None) -> tuple[SourceSet, np.ndarray, list[str]]:
    """(sources, selection mask over their rows, notes to print) of a stage. ``problems``: the result of
    ``check_stage_data`` when the caller already has it (the trainer checks on rank 0 and broadcasts)."""
    stage, options = cfg.stages[stage_index], cfg.data.storage_options
    problems = check_stage_data(cfg, stage_index) if problems is None else problems
    error = damaged_shards_error(cfg, stage_index, problems)
    if error and not cfg.data.skip_damaged_shards:
        raise DataError(error)
    srcs = stage.data_sources()
    indexes = [read_sample_index(s.path, options) for s in srcs]
    sources = SourceSet([s.path for s in srcs], [s.weight for s in srcs], indexes, options,
                        caption_sets=[caption_sets(cfg, s.path, ix) for s, ix in zip(srcs, indexes)])
    if num_classes is not None:
        bad = (sources.label < 0) | (sources.label >= num_classes)
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            root = sources.roots[sources.locate(row)[0]]
            raise ValueError(f"{join(root, SAMPLES)}: sample {sources.key(row)} has label {sources.label[row]} "
                             f"outside 0..{num_classes - 1} ({int(bad.sum())} such rows); a class-conditional model "
                             f"needs a class id for every sample")
    selection = np.ones(len(sources), dtype=bool)
    notes = []
    for s, (src, ix) in enumerate(zip(srcs, indexes)):
        for what, keep in selection_masks(cfg, stage_index, src.path, ix):
            selection[sources.row_offset[s]:sources.row_offset[s + 1]] &= keep
            notes.append(f"{src.path}: leaving out {int((~keep).sum())} of {len(ix)} samples: {what}")
    for src, sets in zip(srcs, sources.caption_sets):
        if sets is not None:
            counts = np.diff(sets.offsets)
            notes.append(f"{src.path}: {len(sets.scores)} captions for {len(counts)} samples (up to "
                         f"{int(counts.max(initial=1))} each), one drawn per use with softmax(score / "
                         f"{cfg.data.caption_temperature:g})")
    if error:
        damaged = {(root, p.shard) for root, ps in problems.items() for p in ps}
        bad_shard = np.array([(sources.roots[int(sources.shard_source[g])], rel) in damaged
                              for g, rel in enumerate(sources.shard_rel)], dtype=bool)
        lost = bad_shard[sources.shard]
        selection &= ~lost
        for root, p in sorted(damaged):
            sources.left_out.setdefault(root, []).append(p)
        notes.append(f"data.skip_damaged_shards: leaving out {int(bad_shard.sum())} damaged shards, "
                     f"{int(lost.sum())} of {len(sources)} samples ({_damaged_list(problems)})")
    heldout = np.concatenate([ix.heldout for ix in indexes])
    sources.heldout_rows = np.flatnonzero(heldout & selection)  # the validation loss reads them (validation.py)
    selection &= ~heldout  # the held-out split is never trained on
    sources.selection = selection
    return sources, selection, notes
