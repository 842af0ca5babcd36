"""The sink of the shard stage: per-bucket shard writers, crash cleanup and the final commit.

BucketSink keeps at most one open shard per ratio key; a shard is committed (renamed / uploaded
whole) when it holds `samples_per_shard` samples or `max_shard_bytes` of images, and the rest are
committed by close(). commit_root() then writes the merged samples with the committed and the new
shards and the updated counters (dataset_format.write_index: samples, stats, then the manifest last).
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from pixeldit.storage import fs_and_path, is_tmp, join, tmp_target

from .dataset_format import (
    NO_LABEL,
    SHARDS_DIR,
    SampleRow,
    ShardRow,
    parse_shard_name,
    rows_to_table,
    shard_name,
    table_rows,
    write_index,
)
from .holdout import assign_splits, split_counts
from .records import Sample
from .tarshard import ShardWriter


@dataclass
class _OpenShard:
    name: str  # relative to the root
    writer: ShardWriter
    rows: list[SampleRow] = field(default_factory=list)
    meta: list[dict[str, Any]] = field(default_factory=list)
    widths: list[int] = field(default_factory=list)
    heights: list[int] = field(default_factory=list)


class BucketSink:
    """Route samples to one open shard per ratio key; numbering continues after the committed shards."""

    def __init__(
        self,
        root: str,
        table: dict[str, tuple[int, int]],
        samples_per_shard: int,
        max_shard_bytes: int,
        manifest: pa.Table | None,
        scratch_dir: str,
        meta_schema: pa.Schema | None = None,
    ) -> None:
        self.root, self.table, self.scratch = root, table, scratch_dir
        self.meta_schema = meta_schema if meta_schema is not None else pa.schema([])
        self.samples_per_shard, self.max_shard_bytes = samples_per_shard, max_shard_bytes
        self.next_n: dict[str, int] = collections.defaultdict(int)
        for committed in table_rows(manifest, ShardRow) if manifest is not None else []:
            parsed = parse_shard_name(committed.shard)
            if parsed:
                self.next_n[parsed[0]] = max(self.next_n[parsed[0]], parsed[1] + 1)
        self.open: dict[str, _OpenShard] = {}
        self.manifest_rows: list[ShardRow] = []
        self.sample_rows: list[SampleRow] = []
        self.sample_meta: list[dict[str, Any]] = []
        self.samples_written = 0
        self.shards_written = 0

    def add(self, sample: Sample) -> None:
        key, row, img = sample.ratio_key, sample.row, sample.image
        shard = self.open.get(key)
        if shard is None:
            name = shard_name(key, self.next_n[key])
            self.next_n[key] += 1
            shard = self.open[key] = _OpenShard(name, ShardWriter(join(self.root, name), self.scratch))
        data = img.data if img.data is not None else row.payload
        meta: dict[str, Any] = {
            "key": row.sample_key, "url": row.url, "caption": row.caption, "width": img.width, "height": img.height,
            "ratio_key": key, "sha256": row.sha256,
        }  # fmt: skip
        if row.label is not None:
            meta["label"] = row.label
        if img.fixes or row.caption_fix:
            meta["normalised"] = list(img.fixes) + ([row.caption_fix] if row.caption_fix else [])
        if any(v is not None for v in row.original_size):
            meta["original_width"], meta["original_height"] = row.original_size
        if row.meta:
            meta["meta"] = row.meta
        span = shard.writer.add(row.sample_key, data, img.ext, row.caption or "", meta, row.label)
        shard.rows.append(SampleRow(
            key=row.sample_key, shard=shard.name, ratio_key=key, sample_index=len(shard.rows),
            image_offset=span.offset, image_size=span.size, image_ext=img.ext, caption=row.caption or "",
            width=img.width, height=img.height, label=NO_LABEL if row.label is None else row.label, url=row.url,
            sha256=row.sha256,
        ))  # fmt: skip
        shard.meta.append(row.meta)
        shard.widths.append(img.width)
        shard.heights.append(img.height)
        if len(shard.rows) >= self.samples_per_shard or shard.writer.payload_bytes >= self.max_shard_bytes:
            self._commit(key)

    def _commit(self, key: str) -> None:
        shard = self.open.pop(key)
        size = shard.writer.commit()
        bh, bw = self.table[key]
        self.manifest_rows.append(ShardRow(
            shard=shard.name, ratio_key=key, bucket_height=bh, bucket_width=bw, num_samples=len(shard.rows),
            bytes=size, min_width=min(shard.widths), max_width=max(shard.widths),
            min_height=min(shard.heights), max_height=max(shard.heights),
        ))  # fmt: skip
        self.sample_rows.extend(shard.rows)
        self.sample_meta.extend(shard.meta)
        self.samples_written += len(shard.rows)
        self.shards_written += 1

    def close(self) -> None:
        for key in sorted(self.open):
            self._commit(key)

    def abort(self) -> None:
        for shard in self.open.values():
            shard.writer.abort()
        self.open.clear()

    def samples_table(self) -> pa.Table:
        """The committed shards' samples: SampleRow columns, then the metadata columns (``meta_schema``)."""
        table = rows_to_table(self.sample_rows, SampleRow)
        for f in self.meta_schema:
            table = table.append_column(f, pa.array([m.get(f.name) for m in self.sample_meta], f.type))
        return table


def cleanup_orphans(root: str, manifest: pa.Table | None) -> list[str]:
    """Delete shard files under {root}/shards that the committed manifest does not list, and staging files.

    Only names this package writes are touched: shard names (dataset_format.shard_name) and the temp names
    (pixeldit.storage.tmp_path) of shard names. Returns the deleted paths, relative to the root.
    """
    fs, path = fs_and_path(join(root, SHARDS_DIR))
    fs.invalidate_cache()
    if not fs.exists(path):
        return []
    committed = {r.shard for r in table_rows(manifest, ShardRow)} if manifest is not None else set()
    base = fs_and_path(root)[1].rstrip("/") + "/"
    removed = []
    for p in fs.find(path):
        rel = p[len(base) :] if p.startswith(base) else p
        staging = is_tmp(rel)
        if parse_shard_name(tmp_target(rel) if staging else rel) and (staging or rel not in committed):
            fs.rm_file(p)
            removed.append(rel)
    return removed


@dataclass
class RunCounts:
    """What one build_shards call counted, to be merged into the committed state."""

    skipped: collections.Counter[str]
    fixes: collections.Counter[str]
    rows_by_root: collections.Counter[str]
    ingest: collections.Counter[str]
    consumed: dict[str, list[str]]
    prepare: dict[str, dict[str, Any]]  # ingest root -> its _input/prepare_stats.json
    sources: list[str]  # ingest roots in order of first use (their index prefixes sample keys)


def commit_root(
    root: str, old_manifest: pa.Table | None, samples: pa.Table, new_shards: list[ShardRow], state: dict[str, Any],
    counts: RunCounts, table_info: dict[str, int], holdout: tuple[float, int] = (0.0, 0),
) -> dict[str, Any]:  # fmt: skip
    """Commit ``root``: ``samples`` (every committed row), the manifest (old shards + ``new_shards``), the counters
    (old + ``counts``) and stats; samples, stats, manifest last (dataset_format.write_index). Returns stats.
    ``holdout``: (fraction, min per bucket) carving the split of rows that have none yet (``data_pipeline.holdout``)."""
    shards = table_rows(old_manifest, ShardRow) if old_manifest is not None else []
    shards = sorted(shards + new_shards, key=lambda r: r.shard)
    samples = assign_splits(samples, *holdout)
    old = state.get("counts", {})
    skipped = collections.Counter(old.get("skipped", {})) + counts.skipped
    fixes = collections.Counter(old.get("normalised", {})) + counts.fixes
    rows_by_root = collections.Counter(old.get("rows_by_root", {})) + counts.rows_by_root
    ingest = collections.Counter(old.get("ingest", {})) + counts.ingest
    new_state = {
        "sources": counts.sources,
        "consumed": counts.consumed,
        "prepare": counts.prepare,
        "counts": {
            "skipped": dict(skipped), "normalised": dict(fixes),
            "rows_by_root": dict(rows_by_root), "ingest": dict(ingest),
        },  # fmt: skip
    }
    all_skipped = collections.Counter(skipped)
    total = 0
    for r in set(rows_by_root) | set(counts.prepare):
        prep = counts.prepare.get(r)
        if prep is not None:
            all_skipped.update(prep.get("skipped", {}))
            total += int(prep.get("input_rows", 0))
        else:
            total += rows_by_root[r]
    per_bucket: collections.Counter[str] = collections.Counter()
    for r in shards:
        per_bucket[r.ratio_key] += r.num_samples
    ok = sum(r.num_samples for r in shards)
    stats = {
        "total": total,
        "ok": ok,
        "skipped": dict(sorted((k, v) for k, v in all_skipped.items() if v)),
        "normalised": dict(sorted((k, v) for k, v in fixes.items() if v)),
        "buckets": dict(sorted(per_bucket.items(), key=lambda kv: float(kv[0]))),
        "pending": total - ok - sum(all_skipped.values()),
        "shards": len(shards),
        "bytes": sum(r.bytes for r in shards),
        "ingest": dict(ingest),
        "table": table_info,
        "splits": split_counts(samples),
    }
    write_index(root, samples, stats, rows_to_table(shards, ShardRow), new_state)
    return stats
