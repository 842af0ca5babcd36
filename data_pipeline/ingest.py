"""Ingest: URL list -> img2dataset webdataset shards (+ per-shard parquet and stats), local or S3.

    summary = ingest("urls.parquet", "work/ingest", IngestConfig(processes=4, label_col="label"))

Layout of the ingest folder (img2dataset's own, plus `_input/`):
    _input/urls.parquet          the cleaned URL list handed to img2dataset (see inputs.py)
    _input/prepare_stats.json    rows read, rows dropped before download (by reason)
    {shard:05d}.tar / .parquet   img2dataset output; the parquet has one row per URL with status,
                                 error_message, width/height, exif, sha256, caption, label, ...
    {shard:05d}_stats.json       written by img2dataset when a shard is finished

Incremental: a shard whose `_stats.json` exists is finished and is skipped by a re-run
(img2dataset's incremental_mode); the cleaned list is deterministic, so shard ids are stable.

Resize modes (the original aspect ratio always survives):
  * "off" (default): img2dataset stores the downloaded bytes untouched (disable_all_reencoding).
    Nothing is decoded at ingest; img2dataset records no width/height, so the shard stage reads them
    from the image header (no pixel decode), verifies the bytes and normalises modes itself.
  * "max-side": img2dataset decodes with OpenCV and shrinks images whose longer side exceeds
    `max_side` (keep_ratio_largest, only if bigger), re-encoding those (and non-`encode_format`
    images) to `encode_format`, and records width/height in its parquet. Caveats of that path
    (img2dataset/OpenCV, not ours): alpha is composited by img2dataset, EXIF is dropped from
    re-encoded bytes (the shard stage re-applies the orientation recorded in the parquet exif
    column) and 16-bit RGB PNGs are saturated by OpenCV; prefer "off" when such inputs matter.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Literal

import pyarrow as pa
import pyarrow.parquet as pq

from pixeldit.storage import exists, join, list_files, normalise_root, read_bytes, write_bytes_atomic, write_json_atomic

from .inputs import InputFormat, prepare_url_list

ResizeMode = Literal["off", "max-side"]
RESIZE_MODES = ("off", "max-side")
ENCODE_FORMATS = ("jpg", "png", "webp")
INPUT_DIR = "_input"
PREPARED_LIST = "urls.parquet"  # in INPUT_DIR
PREPARE_STATS = "prepare_stats.json"  # in INPUT_DIR
SHARD_STATS_SUFFIX = "_stats.json"  # img2dataset's marker of a finished shard


@dataclass(frozen=True)
class IngestConfig:
    url_col: str = "url"
    caption_col: str = "caption"
    label_col: str | None = None  # class id column -> "label" (class-conditional data)
    extra_cols: tuple[str, ...] = ()  # kept per sample (in {key}.json "extra")
    input_format: InputFormat = "auto"
    resize: ResizeMode = "off"
    max_side: int = 1024  # only for resize="max-side"
    encode_format: str = "jpg"  # only for resize="max-side"
    processes: int = 1
    threads: int = 32
    samples_per_shard: int = 10_000
    timeout: int = 10
    retries: int = 0

    def __post_init__(self) -> None:
        if self.resize not in RESIZE_MODES:
            raise ValueError(f"IngestConfig.resize={self.resize!r}; valid: {', '.join(RESIZE_MODES)}")
        if self.encode_format not in ENCODE_FORMATS:
            raise ValueError(f"IngestConfig.encode_format={self.encode_format!r}; valid: {', '.join(ENCODE_FORMATS)}")
        for name in ("max_side", "processes", "threads", "samples_per_shard", "timeout"):
            if getattr(self, name) < 1:
                raise ValueError(f"IngestConfig.{name} must be >= 1, got {getattr(self, name)}")


@dataclass
class IngestSummary:
    out: str
    input_rows: int
    rows_to_download: int
    skipped_before_download: dict[str, int]
    shards_total: int
    shards_skipped: int  # already finished before this run (incremental)
    shards_done: int  # finished by this run
    success: int  # over all finished shards
    failed_to_download: int
    failed_to_resize: int
    seconds: float
    errors: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def prepared_list_url(out: str) -> str:
    """The cleaned URL list of the ingest folder `out` (what img2dataset was given)."""
    return join(out, INPUT_DIR, PREPARED_LIST)


def read_prepare_stats(out: str) -> dict | None:
    """Rows read and dropped before download by the ingest into `out`; None if it has not run there."""
    url = join(out, INPUT_DIR, PREPARE_STATS)
    return json.loads(read_bytes(url)) if exists(url) else None


def finished_shards(out: str) -> dict[int, str]:
    """{shard id: shard name} of finished img2dataset shards in `out` (those with a *_stats.json)."""
    found = {}
    for p in list_files(out, f"*{SHARD_STATS_SUFFIX}"):
        name = os.path.basename(p).removesuffix(SHARD_STATS_SUFFIX)
        if name.isdigit():
            found[int(name)] = name
    return found


def started_shards(out: str) -> set[str]:
    """Names of img2dataset shards that have a parquet (finished or still being written)."""
    names = (os.path.basename(p).removesuffix(".parquet") for p in list_files(out, "*.parquet"))
    return {n for n in names if n.isdigit()}


def read_shard_stats(out: str, name: str) -> dict:
    return json.loads(read_bytes(join(out, f"{name}{SHARD_STATS_SUFFIX}")))


def _write_prepared(out: str, cfg: IngestConfig, url_list: str) -> tuple[str, dict]:
    prepared = prepare_url_list(
        url_list,
        url_col=cfg.url_col,
        caption_col=cfg.caption_col,
        label_col=cfg.label_col,
        extra_cols=cfg.extra_cols,
        input_format=cfg.input_format,
    )
    target = prepared_list_url(out)
    sink = pa.BufferOutputStream()
    pq.write_table(prepared.table, sink)
    write_bytes_atomic(target, sink.getvalue().to_pybytes())
    stats = {
        "input_rows": prepared.input_rows, "rows": prepared.table.num_rows,
        "skipped": prepared.skipped, "files": prepared.files,
    }  # fmt: skip
    write_json_atomic(join(out, INPUT_DIR, PREPARE_STATS), stats)
    return target, stats


def ingest(url_list: str, out: str, config: IngestConfig | None = None) -> IngestSummary:
    """Download every URL of `url_list` into img2dataset shards under `out` (local path or s3://...).

    Re-running with the same list skips finished shards. Never raises for bad URLs or payloads:
    img2dataset records them per row (status / error_message) for the shard stage to count.
    """
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations would check PyPI on import
    from img2dataset import download  # heavy import (OpenCV, albumentations): only when ingesting

    cfg = config or IngestConfig()
    out = normalise_root(out)
    start = time.time()
    prepared_path, prep = _write_prepared(out, cfg, url_list)
    n_rows = prep["rows"]
    shards_total = -(-n_rows // cfg.samples_per_shard)
    before = set(finished_shards(out))
    extra = ["row", "caption_fix"] + (["label"] if cfg.label_col else []) + list(cfg.extra_cols)
    if n_rows and not set(range(shards_total)) <= before:  # all finished: skip img2dataset's process start-up
        resize = (
            dict(resize_mode="no", disable_all_reencoding=True, image_size=cfg.max_side)
            if cfg.resize == "off"
            else dict(resize_mode="keep_ratio_largest", image_size=cfg.max_side, resize_only_if_bigger=True,
                      skip_reencode=True)
        )
        download(
            url_list=prepared_path,
            output_folder=out,
            input_format="parquet",
            url_col="url",
            caption_col="caption",
            save_additional_columns=extra,
            output_format="webdataset",
            encode_format=cfg.encode_format,
            processes_count=cfg.processes,
            thread_count=cfg.threads,
            number_sample_per_shard=cfg.samples_per_shard,
            timeout=cfg.timeout,
            retries=cfg.retries,
            compute_hash="sha256",
            extract_exif=True,
            incremental_mode="incremental",
            enable_wandb=False,
            **resize,
        )
    done = finished_shards(out)
    totals = {"successes": 0, "failed_to_download": 0, "failed_to_resize": 0}
    errors: dict[str, int] = {}
    for name in done.values():
        st = read_shard_stats(out, name)
        for k in totals:
            totals[k] += int(st.get(k, 0))
        for msg, n in (st.get("status_dict") or {}).items():
            if msg != "success":
                errors[msg] = errors.get(msg, 0) + int(n)
    return IngestSummary(
        out=out,
        input_rows=prep["input_rows"],
        rows_to_download=n_rows,
        skipped_before_download=prep["skipped"],
        shards_total=shards_total,
        shards_skipped=len(before & set(done)),
        shards_done=len(set(done) - before),
        success=totals["successes"],
        failed_to_download=totals["failed_to_download"],
        failed_to_resize=totals["failed_to_resize"],
        seconds=time.time() - start,
        errors=errors,
    )
