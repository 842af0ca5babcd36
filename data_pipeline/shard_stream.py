"""The shard stream: ``ShardConfig`` and the stages every input row goes through on its way into a shard.

Each stage is a generator over the previous one (``STAGES``); every row a stage drops is counted under one
``Skip`` reason in the ``StreamState`` of the pass. ``SCREEN`` (the cheap metadata stages) also runs over all new
rows when a build is planned (shard.py), so the plan's duplicate verdicts see exactly the rows the tasks see.
"""
from __future__ import annotations

import collections
import tarfile
from dataclasses import dataclass, fields
from typing import Any, Callable, Iterable, Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pixeldit.storage import fs_and_path, join, local_copy

from .buckets import bucket_table, min_bucket_side, nearest_ratio_key
from .filters import RowFilter, parse_filter
from .holdout import check_holdout
from .normalize import VERIFY_LEVELS, Limits, Verified, VerifyLevel, orientation_from_exif_json, verify_batch
from .reasons import Skip, classify_decode_error, classify_download_error
from .records import Row, Sample

_IMAGE_EXTS = ("jpg", "png", "webp")
_BATCH = 32


@dataclass(frozen=True)
class ShardConfig:
    samples_per_shard: int = 1000
    max_shard_bytes: int = 1 << 30  # a shard is also closed once its images reach this many bytes
    # shorter (displayed) side must be >= this; None: the shortest bucket side of the base_res table (256 at
    # 512), since a smaller image is upscaled in every bucket; 0 keeps every size
    min_side: int | None = None
    max_aspect_ratio: float = 4.0  # max(h, w) / min(h, w) must be <= this; 0 = no limit
    min_caption_chars: int = 1  # 0 keeps samples without caption (caption "")
    max_caption_chars: int = 0  # 0 = no limit
    dedupe_url: bool = True
    dedupe_hash: bool = True
    verify: VerifyLevel = "structure"
    jpeg_quality: int = 95  # for images that normalisation re-encodes
    workers: int = 1  # processes for verify/normalise (1 = in this process)
    base_res: int = 512  # bucket table for the manifest's informational bucket_height/width
    align: int = 32
    filter: str = ""  # keep only rows where this holds over their metadata columns (data_pipeline.filters)
    progress: bool = True
    holdout_fraction: float = 0.005  # of the keys held out of training (data_pipeline.holdout); 0: none
    holdout_min_per_bucket: int = 0  # top a bucket's held-out split up to this many (at most half of it)

    def __post_init__(self) -> None:
        if self.verify not in VERIFY_LEVELS:
            raise ValueError(f"ShardConfig.verify={self.verify!r}; valid: {', '.join(VERIFY_LEVELS)}")
        if self.samples_per_shard < 1 or self.workers < 1 or self.max_shard_bytes < 1:
            raise ValueError("ShardConfig: samples_per_shard, workers and max_shard_bytes must be >= 1")
        if self.min_side is not None and self.min_side < 0:
            raise ValueError(f"ShardConfig.min_side must be >= 0 (or None), got {self.min_side}")
        bucket_table(self.base_res, self.align)  # validates base_res / align
        check_holdout(self.holdout_fraction, self.holdout_min_per_bucket)
        if self.filter:
            parse_filter(self.filter)

    @property
    def shortest_side(self) -> int:
        """The min_side in effect: min_side, or the shortest bucket side of the base_res table."""
        return min_bucket_side(bucket_table(self.base_res, self.align)) if self.min_side is None else self.min_side

    @property
    def limits(self) -> Limits:
        return Limits(self.shortest_side, self.max_aspect_ratio, self.verify, self.jpeg_quality)

    def output_settings(self) -> dict[str, Any]:
        """The settings that decide what the root holds (a build's fingerprint)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("workers", "progress")}


class StreamState:
    """Mutable state of one pass over a slice, shared by the stages (single thread)."""

    def __init__(self, cfg: ShardConfig, meta: pa.Schema, source_ids: dict[str, int],
                 duplicates: dict[tuple[str, str], str] | None = None, columns: list[str] | None = None):
        self.cfg = cfg
        self.skipped: collections.Counter[str] = collections.Counter()
        self.fixes: collections.Counter[str] = collections.Counter()
        self.rows_by_root: collections.Counter[str] = collections.Counter()
        self.meta = meta  # metadata columns (name, type) of the build
        self.row_filter: RowFilter | None = parse_filter(cfg.filter) if cfg.filter else None
        self.source_ids = source_ids  # ingest root -> number used in sample keys
        self.duplicates = duplicates or {}  # (ingest root/shard, key) -> Skip value, from the plan
        self.columns = columns  # img2dataset parquet columns to read (None: all)
        self.pool: Any = None
        self.bar: Any = None

    def skip(self, reason: Skip) -> None:
        self.skipped[reason.value] += 1


# ---- stages: each takes the stream of the previous one ------------------------------------------


def read_metadata(sources: Iterable[tuple[str, str]], run: StreamState) -> Iterator[Row]:
    """(ingest root, shard name) -> Row for every URL of that shard, in key order (``passes_filter`` set)."""
    for root, name in sources:
        fs, path = fs_and_path(join(root, f"{name}.parquet"))
        with fs.open(path, "rb") as f:
            present = pq.read_schema(f).names
            wanted = present if run.columns is None else [c for c in present if c in run.columns]
            table = pq.read_table(f, columns=wanted)
        table = table.take(pc.sort_indices(table, [("key", "ascending")]))
        meta = pa.table({m.name: (table.column(m.name).cast(m.type) if m.name in table.column_names
                                  else pa.nulls(table.num_rows, m.type)) for m in run.meta}) if len(run.meta) else None
        selected = run.row_filter.mask(meta) if run.row_filter is not None else None
        meta_rows = meta.to_pylist() if meta is not None and run.columns is None else None
        for i, r in enumerate(table.to_pylist()):
            run.rows_by_root[root] += 1
            if run.bar is not None:
                run.bar.update(1)
            label = r.get("label")
            yield Row(
                source=f"{root}/{name}", key=str(r["key"]), sample_key=f"{run.source_ids[root]:03d}-{r['key']}",
                url=r.get("url") or "", caption=r.get("caption"),
                status=r.get("status") or "", error=r.get("error_message"), width=r.get("width"),
                height=r.get("height"), exif_orientation=orientation_from_exif_json(r.get("exif")),
                sha256=r.get("sha256"), label=None if label is None else int(label),
                caption_fix=r.get("caption_fix") or "", meta=meta_rows[i] if meta_rows is not None else {},
                original_size=(r.get("original_width"), r.get("original_height")),
                passes_filter=True if selected is None else bool(selected[i]),
            )  # fmt: skip


def drop_failed(rows: Iterable[Row], run: StreamState) -> Iterator[Row]:
    """Row -> Row that img2dataset downloaded (and, in max-side mode, decoded)."""
    for row in rows:
        if row.status == "success":
            yield row
        elif row.status == "failed_to_download":
            run.skip(classify_download_error(row.error))
        else:
            run.skip(classify_decode_error(row.error))


def filter_captions(rows: Iterable[Row], run: StreamState) -> Iterator[Row]:
    """Row -> Row whose stripped caption has min..max characters."""
    lo, hi = run.cfg.min_caption_chars, run.cfg.max_caption_chars
    for row in rows:
        text = (row.caption or "").strip()
        if lo > 0 and row.caption is None:
            run.skip(Skip.CAPTION_MISSING)
        elif lo > 0 and not text:
            run.skip(Skip.CAPTION_EMPTY)
        elif len(text) < lo or (hi and len(text) > hi):
            run.skip(Skip.CAPTION_LENGTH)
        else:
            row.caption = text
            yield row


def filter_rows(rows: Iterable[Row], run: StreamState) -> Iterator[Row]:
    """Row -> Row for which the --filter expression over its metadata columns holds."""
    for row in rows:
        if row.passes_filter:
            yield row
        else:
            run.skip(Skip.FILTERED)


def drop_duplicates(rows: Iterable[Row], run: StreamState) -> Iterator[Row]:
    """Row -> Row that the plan did not find to repeat an earlier URL or content hash (``plan_duplicates``)."""
    for row in rows:
        reason = run.duplicates.get((row.source, row.key))
        if reason is None:
            yield row
        else:
            run.skip(Skip(reason))


def filter_recorded_size(rows: Iterable[Row], run: StreamState) -> Iterator[Row]:
    """Row -> Row passing min side / max aspect on img2dataset's recorded size (when it has one)."""
    cfg, min_side = run.cfg, run.cfg.shortest_side
    for row in rows:
        w, h = row.width, row.height
        if w and h and min(w, h) < min_side:
            run.skip(Skip.TOO_SMALL)
        elif w and h and cfg.max_aspect_ratio and max(w, h) / min(w, h) > cfg.max_aspect_ratio:
            run.skip(Skip.ASPECT_RATIO)
        else:
            yield row


def attach_bytes(rows: Iterable[Row], run: StreamState) -> Iterator[Row]:
    """Row -> Row with `payload`: the image bytes read from its ingest tar (one tar open at a time)."""
    current, members, tar, ctx = "", {}, None, None
    try:
        for row in rows:
            if row.source != current:
                if ctx is not None:
                    tar.close()
                    ctx.__exit__(None, None, None)
                current = row.source
                ctx = local_copy(current + ".tar")
                tar = tarfile.open(ctx.__enter__(), mode="r:")
                members = {m.name: m for m in tar.getmembers() if m.isfile()}
            member = next((members[n] for n in (f"{row.key}.{e}" for e in _IMAGE_EXTS) if n in members), None)
            if member is None:
                run.skip(Skip.INGEST_INCOMPLETE)
                continue
            row.payload = tar.extractfile(member).read()
            yield row
    finally:
        if ctx is not None:
            tar.close()
            ctx.__exit__(None, None, None)


def verify(rows: Iterable[Row], run: StreamState) -> Iterator[Sample]:
    """Row -> Sample: payload verified and normalised (normalize.py), in `workers` processes."""
    limits = run.cfg.limits
    size = _BATCH if run.pool is not None else 1  # batches amortise the pool's IPC; in-process, rows stream one by one

    def batches() -> Iterator[list[Row]]:
        batch: list[Row] = []
        for row in rows:
            batch.append(row)
            if len(batch) == size:
                yield batch
                batch = []
        if batch:
            yield batch

    def emit(batch: list[Row], results: list[Verified | Skip]) -> Iterator[Sample]:
        for row, res in zip(batch, results):
            if isinstance(res, Skip):
                run.skip(res)
            else:
                yield Sample(row, res)

    work = lambda b: [(r.payload, r.exif_orientation) for r in b]  # noqa: E731
    if run.pool is None:
        for batch in batches():
            yield from emit(batch, verify_batch(work(batch), limits))
        return
    window: collections.deque = collections.deque()
    for batch in batches():
        window.append((batch, run.pool.apply_async(verify_batch, (work(batch), limits))))
        if len(window) >= 2 * run.cfg.workers:
            b, res = window.popleft()
            yield from emit(b, res.get())
    while window:
        b, res = window.popleft()
        yield from emit(b, res.get())


def assign_bucket(samples: Iterable[Sample], run: StreamState) -> Iterator[Sample]:
    """Sample -> Sample with the ratio key nearest to its displayed height/width."""
    for s in samples:
        s.ratio_key = nearest_ratio_key(s.image.height, s.image.width)
        run.fixes.update(s.image.fixes)
        if s.row.caption_fix:
            run.fixes[s.row.caption_fix] += 1
        yield s


# what every row goes through before the deduplication, in the plan and in the tasks alike
SCREEN = [
    read_metadata,  # (ingest root, shard) -> Row: every URL of the slice's ingest shards, key order
    drop_failed,  # Row downloaded by img2dataset (failures counted by reason)
    filter_captions,  # Row with a usable caption (missing / empty / length counted)
    filter_rows,  # Row whose metadata passes --filter
]
STAGES: list[Callable[[Iterable[Any], StreamState], Iterator[Any]]] = SCREEN + [
    drop_duplicates,  # Row that is the first of its URL and content hash (the plan's verdicts)
    filter_recorded_size,  # Row passing min side / aspect on img2dataset's recorded size, if any
    attach_bytes,  # Row + image bytes from the ingest tar
    verify,  # Sample: verified, normalised 8-bit RGB, displayed size (header only unless normalised)
    assign_bucket,  # Sample + ratio key
]  # sink: BucketSink -> the task's part: shards/{ratio_key}/*.tar + samples.parquet; the commit merges parts
