"""Ingest: URL list -> img2dataset webdataset shards (+ per-shard parquet and stats), local or S3.

    summary = ingest("urls.parquet", "work/ingest", IngestConfig(processes=4, label_col="label"))

Layout of the ingest folder (img2dataset's own, plus `_input/`):
    _input/urls.parquet          the cleaned URL list handed to img2dataset (see inputs.py): url, caption,
                                 caption_fix, row[, label], then the metadata columns; one row group
                                 per ingest shard
    _input/prepare_stats.json    rows read, rows dropped before download (by reason)
    {shard:05d}.tar / .parquet   img2dataset output; the parquet has one row per URL with status,
                                 error_message, width/height, exif, sha256, caption, label, ...
    {shard:05d}_stats.json       written by img2dataset when a shard is finished
    _work/                       scratch folders of tasks running (or killed) now
    _build/                      the build plan, task records and logs (build.py)

Incremental: a shard whose `_stats.json` exists is finished and is skipped by a re-run; the cleaned list
is deterministic and shard i holds its rows [i * samples_per_shard, (i + 1) * samples_per_shard), so shard
ids (and the img2dataset keys inside, which contain the shard id) are stable.

On many machines (``build.py``): the ingest shards are cut into contiguous task slices. A task downloads
each contiguous run of its unfinished shards with one img2dataset call into a scratch folder of its own,
``_work/{first shard:05d}/`` (img2dataset's "extend" mode numbers the shards from the run's first id, so
names and keys are those of a single-process ingest), then moves every finished shard into the ingest
folder, its ``_stats.json`` last. A killed task leaves its scratch folder behind; the rerun moves the
shards finished there and downloads the rest. Tasks run in this process, as local processes or as a SLURM
job array; img2dataset's own ``pyspark`` distributor can spread each call over a Spark cluster instead.

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

import importlib.util
import json
import os
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

import pyarrow as pa
import pyarrow.parquet as pq

from pixeldit.storage import exists, fs_and_path, join, list_files, normalise_root, read_bytes, write_bytes_atomic, \
    write_json_atomic

from .build import BuildFailed, BuildOptions, execute, failed_message, fingerprint, open_plan, remove_tree, task_slices
from .dataset_format import SAMPLES_SCHEMA
from .filters import parse_filter
from .inputs import InputFormat, prepare_url_list

ResizeMode = Literal["off", "max-side"]
RESIZE_MODES = ("off", "max-side")
ENCODE_FORMATS = ("jpg", "png", "webp")
Distributor = Literal["multiprocessing", "pyspark"]
DISTRIBUTORS = ("multiprocessing", "pyspark")  # img2dataset's own (ray is left out: it ignores failed shards)
INPUT_DIR = "_input"
PREPARED_LIST = "urls.parquet"  # in INPUT_DIR
PREPARE_STATS = "prepare_stats.json"  # in INPUT_DIR
SHARD_STATS_SUFFIX = "_stats.json"  # img2dataset's marker of a finished shard
WORK_DIR = "_work"  # scratch folders of running tasks
PREPARED_CORE = ("url", "caption", "caption_fix", "row", "label")  # the prepared list's own columns
# columns img2dataset adds to its per-shard parquet: a metadata column may not take these names either
IMG2DATASET_COLUMNS = ("key", "status", "error_message", "width", "height", "original_width", "original_height",
                       "exif", "sha256", "md5", "sha512")
RESERVED_NAMES = frozenset(PREPARED_CORE) | frozenset(IMG2DATASET_COLUMNS) | frozenset(SAMPLES_SCHEMA.names)
PERFORMANCE_FIELDS = ("processes", "threads", "distributor")  # settings that do not change what is downloaded


def parse_meta_cols(specs: tuple[str, ...] | list[str]) -> tuple[tuple[str, str], ...]:
    """("aesthetic", "WIDTH:input_width") -> (("aesthetic", "aesthetic"), ("WIDTH", "input_width")): input column,
    name in the dataset. Names must be unique and not reserved (``RESERVED_NAMES``)."""
    pairs = []
    for spec in specs:
        src, sep, name = spec.partition(":")
        src, name = src.strip(), (name.strip() if sep else src.strip())
        if not src or not name:
            raise ValueError(f"--meta-cols entry {spec!r}: write COLUMN or COLUMN:NAME")
        if name in RESERVED_NAMES:
            raise ValueError(f"--meta-cols: the name {name!r} is taken by the pipeline's own columns; keep it "
                             f"under another name, e.g. {src}:input_{name.lower()}")
        pairs.append((src, name))
    names = [n for _, n in pairs]
    if len(set(names)) != len(names):
        raise ValueError(f"--meta-cols: names {names} repeat; give each column its own name")
    return tuple(pairs)


@dataclass(frozen=True)
class IngestConfig:
    url_col: str = "url"
    caption_col: str = "caption"
    label_col: str | None = None  # class id column -> "label" (class-conditional data)
    # metadata columns carried to samples.parquet (and each sample's json): "COLUMN" or "COLUMN:NAME"
    meta_cols: tuple[str, ...] = ()
    filter: str = ""  # keep only rows where this holds (data_pipeline.filters), before download
    input_format: InputFormat = "auto"
    resize: ResizeMode = "off"
    max_side: int = 1024  # only for resize="max-side"
    encode_format: str = "jpg"  # only for resize="max-side"
    processes: int = 1
    threads: int = 32
    samples_per_shard: int = 10_000
    timeout: int = 10
    retries: int = 0
    distributor: Distributor = "multiprocessing"  # img2dataset's; pyspark: each call runs on the Spark cluster

    def __post_init__(self) -> None:
        object.__setattr__(self, "meta_cols", tuple(self.meta_cols))
        parse_meta_cols(self.meta_cols)
        if self.filter:
            parse_filter(self.filter)
        if self.distributor not in DISTRIBUTORS:
            raise ValueError(f"IngestConfig.distributor={self.distributor!r}; valid: {', '.join(DISTRIBUTORS)}")
        if self.distributor == "pyspark" and importlib.util.find_spec("pyspark") is None:
            raise ValueError("IngestConfig.distributor='pyspark' needs pyspark (pip install pyspark) and a Spark "
                             "session (img2dataset starts a local one when none is active)")
        if self.resize not in RESIZE_MODES:
            raise ValueError(f"IngestConfig.resize={self.resize!r}; valid: {', '.join(RESIZE_MODES)}")
        if self.encode_format not in ENCODE_FORMATS:
            raise ValueError(f"IngestConfig.encode_format={self.encode_format!r}; valid: {', '.join(ENCODE_FORMATS)}")
        for name in ("max_side", "processes", "threads", "samples_per_shard", "timeout"):
            if getattr(self, name) < 1:
                raise ValueError(f"IngestConfig.{name} must be >= 1, got {getattr(self, name)}")

    def output_settings(self) -> dict[str, Any]:
        """The settings that decide what an ingest folder holds (its build fingerprint)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in PERFORMANCE_FIELDS}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "IngestConfig":
        return cls(**{**d, "meta_cols": tuple(d.get("meta_cols", ()))})


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
    tasks: int = 1
    waited: bool = True  # False: tasks were submitted and this returned without waiting for them

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


def meta_schema(out: str) -> pa.Schema:
    """The metadata columns (name and type) of the ingest folder ``out``: its prepared list's other columns."""
    url = prepared_list_url(out)
    if not exists(url):
        return pa.schema([])
    fs, path = fs_and_path(url)
    with fs.open(path, "rb") as f:
        schema = pq.read_schema(f)
    return pa.schema([f for f in schema if f.name not in PREPARED_CORE])


def _write_prepared(out: str, cfg: IngestConfig, url_list: str) -> dict:
    prepared = prepare_url_list(
        url_list,
        url_col=cfg.url_col,
        caption_col=cfg.caption_col,
        label_col=cfg.label_col,
        meta_cols=parse_meta_cols(cfg.meta_cols),
        row_filter=parse_filter(cfg.filter) if cfg.filter else None,
        input_format=cfg.input_format,
    )
    sink = pa.BufferOutputStream()
    pq.write_table(prepared.table, sink, row_group_size=cfg.samples_per_shard)  # row group i = ingest shard i
    write_bytes_atomic(prepared_list_url(out), sink.getvalue().to_pybytes())
    stats = {
        "input_rows": prepared.input_rows, "rows": prepared.table.num_rows,
        "skipped": prepared.skipped, "files": prepared.files,
    }  # fmt: skip
    write_json_atomic(join(out, INPUT_DIR, PREPARE_STATS), stats)
    return stats


def ingest(url_list: str, out: str, config: IngestConfig | None = None,
           build: BuildOptions | None = None) -> IngestSummary:
    """Download every URL of `url_list` into img2dataset shards under `out` (local path or s3://...).

    Re-running with the same list skips finished shards. Never raises for bad URLs or payloads:
    img2dataset records them per row (status / error_message) for the shard stage to count. ``build``: how
    many tasks and where they run (default: one, in this process); a task that fails makes this raise
    ``BuildFailed`` once every task has ended (rerun the same call to rerun only the unfinished tasks).
    """
    cfg = config or IngestConfig()
    options = build or BuildOptions()
    out = normalise_root(out)
    start = time.time()
    before = set(finished_shards(out))

    def make_plan() -> tuple[list[tuple[int, int, str]], dict[str, Any]]:
        prep = _write_prepared(out, cfg, url_list)
        rows, per = prep["rows"], cfg.samples_per_shard
        shards = -(-rows // per)
        slices = [(a, b, f"ingest shards {a:05d}-{b - 1:05d} (rows {a * per}-{min(b * per, rows) - 1})"
                   if b > a else "nothing to download") for a, b in task_slices(shards, options.tasks)]
        return slices, {"url_list": url_list, "config": asdict(cfg), "rows": rows, "shards": shards}

    fp = fingerprint({"url_list": url_list, "config": cfg.output_settings()})
    plan, _ = open_plan(out, "ingest", fp, make_plan, options)
    states = execute(plan, options)
    waited = options.launch is None or options.wait
    if all(s.state == "done" for s in states):
        plan.state = "committed"
        plan.save()
        remove_tree(join(out, WORK_DIR))  # every task is done: no scratch folder is in use
    elif waited:
        raise BuildFailed(failed_message(plan, states))
    prep = read_prepare_stats(out) or {}
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
        input_rows=prep.get("input_rows", 0),
        rows_to_download=plan.data["rows"],
        skipped_before_download=prep.get("skipped", {}),
        shards_total=plan.data["shards"],
        shards_skipped=len(before & set(done)),
        shards_done=len(set(done) - before),
        success=totals["successes"],
        failed_to_download=totals["failed_to_download"],
        failed_to_resize=totals["failed_to_resize"],
        seconds=time.time() - start,
        errors=errors,
        tasks=plan.tasks,
        waited=waited,
    )
