"""Bucketing + sharding: img2dataset output -> aspect-ratio-bucketed webdataset shards + manifest.

    summary = build_shards("work/ingest", "s3://bucket/data", ShardConfig(min_side=256, workers=4))

The stream is a declared list of stages (STAGES below); each stage is a generator over the previous
one, and every row it drops is counted under one `Skip` reason. Bucket assignment uses width/height
that are already known without decoding pixels: img2dataset's parquet when it recorded them
(resize="max-side"), otherwise the image header read by the verify stage (see normalize.py for what
is decoded when). Output layout and commit order: dataset_format.py.

Incremental: ingest shards already consumed by a committed run are skipped; new shards get the next
free shard numbers per bucket; samples, stats and manifest are rewritten (manifest last). Shards or
staging files left by a crashed run (not in the committed manifest) are deleted first.
"""

from __future__ import annotations

import collections
import multiprocessing
import tarfile
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Iterator

import pyarrow.parquet as pq
from tqdm import tqdm

from pixeldit.storage import exists, fs_and_path, join, local_copy, normalise_root

from .buckets import bucket_table, nearest_ratio_key
from .dataset_format import SAMPLE_COLUMNS, committed_samples, read_manifest, read_state, read_stats
from .holdout import check_holdout
from .ingest import finished_shards, prepared_list_url, read_prepare_stats, read_shard_stats, started_shards
from .normalize import VERIFY_LEVELS, Limits, Verified, VerifyLevel, orientation_from_exif_json, verify_batch
from .reasons import Skip, classify_decode_error, classify_download_error
from .records import Row, Sample
from .shard_sink import BucketSink, RunCounts, cleanup_orphans, finish_run

_IMAGE_EXTS = ("jpg", "png", "webp")
_BATCH = 32


@dataclass(frozen=True)
class ShardConfig:
    samples_per_shard: int = 1000
    max_shard_bytes: int = 1 << 30  # a shard is also closed once its images reach this many bytes
    min_side: int = 0  # shorter (displayed) side must be >= this
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
    progress: bool = True
    holdout_fraction: float = 0.005  # of the keys held out of training (data_pipeline.holdout); 0: none
    holdout_min_per_bucket: int = 0  # top a bucket's held-out split up to this many (at most half of it)

    def __post_init__(self) -> None:
        if self.verify not in VERIFY_LEVELS:
            raise ValueError(f"ShardConfig.verify={self.verify!r}; valid: {', '.join(VERIFY_LEVELS)}")
        if self.samples_per_shard < 1 or self.workers < 1 or self.max_shard_bytes < 1:
            raise ValueError("ShardConfig: samples_per_shard, workers and max_shard_bytes must be >= 1")
        bucket_table(self.base_res, self.align)  # validates base_res / align
        check_holdout(self.holdout_fraction, self.holdout_min_per_bucket)

    @property
    def limits(self) -> Limits:
        return Limits(self.min_side, self.max_aspect_ratio, self.verify, self.jpeg_quality)


@dataclass
class ShardSummary:
    root: str
    up_to_date: bool  # nothing new to shard
    ingest_shards_new: int
    ingest_shards_pending: int  # started by img2dataset but not finished (no *_stats.json)
    samples_written: int  # by this run
    shards_written: int  # by this run
    seconds: float
    rows_per_second: float  # input rows of the new ingest shards processed per second
    stats: dict[str, Any] = field(default_factory=dict)  # stats.json content (cumulative)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Run:
    """Mutable state of one build_shards call, shared by the stages (single thread)."""

    def __init__(self, cfg: ShardConfig, seen_urls: set[str], seen_hashes: set[str], extra_cols: list[str]):
        self.cfg = cfg
        self.skipped: collections.Counter[str] = collections.Counter()
        self.fixes: collections.Counter[str] = collections.Counter()
        self.rows_by_root: collections.Counter[str] = collections.Counter()
        self.seen_urls, self.seen_hashes = seen_urls, seen_hashes
        self.extra_cols = extra_cols
        self.source_ids: dict[str, int] = {}  # ingest root -> number used in sample keys
        self.pool: Any = None
        self.bar: Any = None

    def skip(self, reason: Skip) -> None:
        self.skipped[reason.value] += 1


# ---- stages: each takes the stream of the previous one ------------------------------------------


def read_metadata(sources: Iterable[tuple[str, str]], run: _Run) -> Iterator[Row]:
    """(ingest root, shard name) -> Row for every URL of that shard, in key order."""
    for root, name in sources:
        fs, path = fs_and_path(join(root, f"{name}.parquet"))
        with fs.open(path, "rb") as f:
            rows = pq.read_table(f).to_pylist()
        for r in sorted(rows, key=lambda r: r["key"]):
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
                caption_fix=r.get("caption_fix") or "", extra={c: r.get(c) for c in run.extra_cols},
                original_size=(r.get("original_width"), r.get("original_height")),
            )  # fmt: skip


def drop_failed(rows: Iterable[Row], run: _Run) -> Iterator[Row]:
    """Row -> Row that img2dataset downloaded (and, in max-side mode, decoded)."""
    for row in rows:
        if row.status == "success":
            yield row
        elif row.status == "failed_to_download":
            run.skip(classify_download_error(row.error))
        else:
            run.skip(classify_decode_error(row.error))


def filter_captions(rows: Iterable[Row], run: _Run) -> Iterator[Row]:
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


def dedupe(rows: Iterable[Row], run: _Run) -> Iterator[Row]:
    """Row -> Row whose URL and downloaded-bytes sha256 were not seen before (earlier rows, committed runs)."""
    for row in rows:
        if run.cfg.dedupe_url and row.url in run.seen_urls:
            run.skip(Skip.DUPLICATE_URL)
            continue
        if run.cfg.dedupe_hash and row.sha256 and row.sha256 in run.seen_hashes:
            run.skip(Skip.DUPLICATE_HASH)
            continue
        run.seen_urls.add(row.url)
        if row.sha256:
            run.seen_hashes.add(row.sha256)
        yield row


def filter_recorded_size(rows: Iterable[Row], run: _Run) -> Iterator[Row]:
    """Row -> Row passing min side / max aspect on img2dataset's recorded size (when it has one)."""
    cfg = run.cfg
    for row in rows:
        w, h = row.width, row.height
        if w and h and min(w, h) < cfg.min_side:
            run.skip(Skip.TOO_SMALL)
        elif w and h and cfg.max_aspect_ratio and max(w, h) / min(w, h) > cfg.max_aspect_ratio:
            run.skip(Skip.ASPECT_RATIO)
        else:
            yield row


def attach_bytes(rows: Iterable[Row], run: _Run) -> Iterator[Row]:
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


def verify(rows: Iterable[Row], run: _Run) -> Iterator[Sample]:
    """Row -> Sample: payload verified and normalised (normalize.py), in `workers` processes."""
    limits = run.cfg.limits

    def batches() -> Iterator[list[Row]]:
        batch: list[Row] = []
        for row in rows:
            batch.append(row)
            if len(batch) == _BATCH:
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


def assign_bucket(samples: Iterable[Sample], run: _Run) -> Iterator[Sample]:
    """Sample -> Sample with the ratio key nearest to its displayed height/width."""
    for s in samples:
        s.ratio_key = nearest_ratio_key(s.image.height, s.image.width)
        run.fixes.update(s.image.fixes)
        if s.row.caption_fix:
            run.fixes[s.row.caption_fix] += 1
        yield s


STAGES: list[Callable[[Iterable[Any], _Run], Iterator[Any]]] = [
    read_metadata,  # (ingest root, shard) -> Row: every URL of the new ingest shards, key order
    drop_failed,  # Row downloaded by img2dataset (failures counted by reason)
    filter_captions,  # Row with a usable caption (missing / empty / length counted)
    dedupe,  # Row with a new URL and new content hash
    filter_recorded_size,  # Row passing min side / aspect on img2dataset's recorded size, if any
    attach_bytes,  # Row + image bytes from the ingest tar
    verify,  # Sample: verified, normalised 8-bit RGB, displayed size (header only unless normalised)
    assign_bucket,  # Sample + ratio key
]  # sink: BucketSink -> shards/{ratio_key}/*.tar, then samples.parquet, stats.json, manifest.parquet


def _extra_columns(ingest_root: str) -> list[str]:
    """Columns of an ingest root's cleaned URL list beyond the ones the pipeline itself uses."""
    url = prepared_list_url(ingest_root)
    if not exists(url):
        return []
    fs, path = fs_and_path(url)
    with fs.open(path, "rb") as f:
        names = pq.read_schema(f).names
    return [n for n in names if n not in ("url", "caption", "caption_fix", "row", "label")]


def build_shards(ingested: str | list[str], out: str, config: ShardConfig | None = None) -> ShardSummary:
    """Bucket and shard every finished, not yet consumed img2dataset shard of `ingested` into `out`.

    `ingested` is one ingest folder or a list of them; `out` a local folder or s3://bucket/prefix.
    """
    cfg = config or ShardConfig()
    start = time.time()
    roots = [normalise_root(r) for r in ([ingested] if isinstance(ingested, str) else ingested)]
    out = normalise_root(out)
    manifest = read_manifest(out)
    state = read_state(manifest)
    cleanup_orphans(out, manifest)
    consumed: dict[str, list[str]] = {k: list(v) for k, v in state.get("consumed", {}).items()}
    todo: list[tuple[str, str]] = []
    pending = expected_rows = 0
    for root in roots:
        if not exists(root):
            raise FileNotFoundError(f"ingest folder {root!r} does not exist: run `pixeldit-data ingest` into it first")
        done = set(finished_shards(root).values())
        pending += len(started_shards(root) - done)
        for name in sorted(done - set(consumed.get(root, []))):
            todo.append((root, name))
            expected_rows += int(read_shard_stats(root, name).get("count", 0))
    prepare = {**state.get("prepare", {}), **{r: p for r in roots if (p := read_prepare_stats(r)) is not None}}
    if not todo and manifest is not None:
        return ShardSummary(out, True, 0, pending, 0, 0, time.time() - start, 0.0, stats=read_stats(out))

    previous = committed_samples(out, manifest) if manifest is not None else None
    seen_urls = set(previous.column(SAMPLE_COLUMNS.url).to_pylist()) if previous is not None else set()
    seen_hashes = set(previous.column(SAMPLE_COLUMNS.sha256).to_pylist()) - {None} if previous is not None else set()
    run = _Run(cfg, seen_urls, seen_hashes, sorted({c for r in roots for c in _extra_columns(r)}))
    sources = list(state.get("sources", []))
    sources += [r for r in roots if r not in sources]
    run.source_ids = {r: i for i, r in enumerate(sources)}
    table = bucket_table(cfg.base_res, cfg.align)
    with tempfile.TemporaryDirectory(prefix="pixeldit-shards-") as scratch:
        sink = BucketSink(out, table, cfg.samples_per_shard, cfg.max_shard_bytes, manifest, scratch)
        if cfg.workers > 1:
            run.pool = multiprocessing.get_context("spawn").Pool(cfg.workers)
        run.bar = tqdm(total=expected_rows, desc="shard", unit="row", disable=not cfg.progress)
        try:
            stream: Iterable[Any] = todo
            for stage in STAGES:
                stream = stage(stream, run)
            for sample in stream:
                sink.add(sample)
            sink.close()
        except BaseException:
            sink.abort()
            raise
        finally:
            run.bar.close()
            if run.pool is not None:
                run.pool.terminate()
                run.pool.join()
    ingest_totals: collections.Counter[str] = collections.Counter()
    for root, name in todo:
        consumed.setdefault(root, []).append(name)
        st = read_shard_stats(root, name)
        ingest_totals.update({k: int(st.get(k, 0)) for k in ("successes", "failed_to_download", "failed_to_resize")})
    counts = RunCounts(run.skipped, run.fixes, run.rows_by_root, ingest_totals, consumed, prepare, sources)
    stats = finish_run(out, manifest, previous, sink, state, counts, {"base_res": cfg.base_res, "align": cfg.align},
                       (cfg.holdout_fraction, cfg.holdout_min_per_bucket))
    seconds = time.time() - start
    rows = sum(run.rows_by_root.values())
    return ShardSummary(
        out, False, len(todo), pending, sink.samples_written, sink.shards_written, seconds,
        rows / seconds if seconds > 0 else 0.0, stats=stats,
    )  # fmt: skip
