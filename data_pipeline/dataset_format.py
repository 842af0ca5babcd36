"""The dataset format: what `pixeldit-data shard` writes under a dataset root and what every reader reads.

Layout of a root (a local folder or a URL such as ``s3://bucket/prefix``)::

    shards/{ratio}/{ratio}-{n:06d}.tar   webdataset shards, one aspect-ratio bucket each (``shard_name``); members
                                         {key}.{jpg|png|webp}, {key}.txt, {key}.json[, {key}.cls] (tarshard.py)
    samples.parquet                      one ``SampleRow`` per sample: its shard, the byte range of its image
                                         inside the tar (ranged reads, no tar scan), caption, size, label;
                                         then the dataset's metadata columns (below)
    stats.json                           counts by reason and per bucket (written by shard_sink.commit_root)
    manifest.parquet                     one ``ShardRow`` per shard -- written LAST
    text_emb/                            default folder of the caption-embedding cache (pixeldit.conditioning)
    score_parts/{shard}.parquet          the score stage's per-shard results (``ScorePartRow``, one row per sample,
                                         with its CLIP image embedding): resumable work, kept for dedupe
    scores.parquet                       one ``ScoreRow`` per sample (CLIP score, aesthetic, phash) -- keyed like
                                         samples.parquet (key; shard + sample_index); the score stage's commit point
    captions.parquet                     one ``CaptionRow`` per caption of a sample (original + recaptions), with the
                                         score the loader's caption draw uses (data_pipeline.captions)
    dedupe.parquet                       one ``DedupeRow`` per dropped near-duplicate: the kept sample it duplicates
    _build/                              the state of the (possibly multi-task) build that wrote the root: plan,
                                         task records, job ids, the tasks' uncommitted parts (data_pipeline.build);
                                         never read by training

Commit order: shards, then samples.parquet, then stats.json, then manifest.parquet (``write_index``). The
curation files come after a committed root: score parts, then captions.parquet, then scores.parquet (the score
stage commits it last, see data_pipeline/score.py); dedupe.parquet is derived from the parts and scores. The
manifest is the commit point: a root without it is incomplete and is not read, and samples.parquet rows of
shards the manifest does not list belong to a crashed run (``committed_samples`` drops them). The manifest's
parquet key-value metadata holds the format version (``FORMAT_VERSION``) and the pipeline's incremental
state (``STATE_KEY``: consumed ingest shards, cumulative counters).

Metadata columns: every samples.parquet column after the ``SampleRow`` ones is a metadata column carried from
the input URL list (``pixeldit-data ingest --meta-cols aesthetic,punsafe,LICENSE:license``: the LAION / DataComp /
COYO scores, licence, original size, anything the user names), one value per sample, null where the input had
none. Types: int64, float64, bool or string (``META_TYPES``). Their names are not ``SampleRow`` names; filters
(``data_pipeline.filters``) read them like any other column, so a training stage can select rows of the same
shards (``stages.N.filter``). Other tools may add columns keyed the same way (one value per row).
Held-out split: samples.parquet's ``split`` column says which samples are held out of training
(``SPLIT_HELDOUT``; the trainer's loader never plans them, its validation loss reads only them) and which are
training samples (``SPLIT_TRAIN``). The shard stage carves it (``data_pipeline.holdout``: a hash of the key, so
a sample's split never changes and does not depend on the order of the input); a row's split is set once, when
the row is committed. ``read_sample_index`` gives it as the boolean ``heldout``.

Versions: a manifest written before the version was recorded reads as version 1; a version newer than
``FORMAT_VERSION`` is refused with the root named. Version 2 added the ``split`` column: a version-1 root (or a
row whose split is null) reads as training data, none held out. Adding a column means adding one field to ``SampleRow``
or ``ShardRow`` below (the parquet schemas are derived from them) and filling it in the writer.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from types import SimpleNamespace
from typing import Any, Sequence, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pixeldit.storage import exists, file_sizes, fs_and_path, join, read_bytes, write_bytes_atomic, write_json_atomic

SAMPLES = "samples.parquet"
MANIFEST = "manifest.parquet"
STATS = "stats.json"
SHARDS_DIR = "shards"
TEXT_EMB_DIR = "text_emb"
SHARD_EXT = ".tar"
SCORES = "scores.parquet"
CAPTIONS = "captions.parquet"
DEDUPE = "dedupe.parquet"
SCORE_PARTS_DIR = "score_parts"
BUILD_DIR = "_build"  # data_pipeline.build (also in an ingest folder)

FORMAT_VERSION = 2  # 2: samples.parquet has the split column
SPLIT_TRAIN = "train"
SPLIT_HELDOUT = "heldout"
SPLITS = (SPLIT_TRAIN, SPLIT_HELDOUT)
FORMAT_VERSION_KEY = b"pixeldit.format_version"
STATE_KEY = b"pixeldit.state"
STATE_VERSION = 1
SCORES_META_KEY = b"pixeldit.scores"  # scores.parquet / part metadata: JSON (version, model fingerprints)
SCORES_VERSION = 1


def _column(arrow_type: pa.DataType, **default: Any) -> Any:
    return field(metadata={"arrow": arrow_type}, **default)


@dataclass(frozen=True, slots=True)
class ShardRow:
    """One row of manifest.parquet: one committed shard."""

    shard: str = _column(pa.string())  # path relative to the root: shard_name(ratio_key, n)
    ratio_key: str = _column(pa.string())
    bucket_height: int = _column(pa.int32())  # at the table used when sharding (informational)
    bucket_width: int = _column(pa.int32())
    num_samples: int = _column(pa.int64())
    bytes: int = _column(pa.int64())
    min_width: int = _column(pa.int32())
    max_width: int = _column(pa.int32())
    min_height: int = _column(pa.int32())
    max_height: int = _column(pa.int32())


@dataclass(frozen=True, slots=True)
class SampleRow:
    """One row of samples.parquet: one sample."""

    key: str = _column(pa.string())  # unique within the root; the tar members' stem
    shard: str = _column(pa.string())
    ratio_key: str = _column(pa.string())
    sample_index: int = _column(pa.int32())  # position inside its shard
    image_offset: int = _column(pa.int64())  # byte offset of the image member's data inside the tar
    image_size: int = _column(pa.int64())
    image_ext: str = _column(pa.string())  # jpg | png | webp
    caption: str = _column(pa.string())
    width: int = _column(pa.int32())  # stored (EXIF-normalised) image size
    height: int = _column(pa.int32())
    label: int = _column(pa.int64())  # NO_LABEL when there is no class label
    url: str = _column(pa.string())
    sha256: str | None = _column(pa.string())  # of the downloaded bytes (dedupe across runs)
    split: str | None = _column(pa.string(), default=None)  # SPLITS; None until the shard stage carves it (train)


@dataclass(frozen=True, slots=True)
class ScoreRow:
    """One row of scores.parquet: the scores of one sample (joins 1:1 with samples.parquet on key)."""

    key: str = _column(pa.string())
    shard: str = _column(pa.string())
    sample_index: int = _column(pa.int32())
    clip_score: float = _column(pa.float32())  # cosine(image, primary caption) in [-1, 1]
    aesthetic: float | None = _column(pa.float32())  # the aesthetic head's output; null without a head
    phash: int = _column(pa.uint64())  # 64-bit DCT perceptual hash (imagehash.phash), bit i = hash bit i (MSB first)
    num_captions: int = _column(pa.int32())  # rows of this sample in captions.parquet


@dataclass(frozen=True, slots=True)
class ScorePartRow(ScoreRow):
    """One row of a score part (score_parts/{shard}.parquet): a ScoreRow plus what dedupe and the caption table
    need from the part."""

    image_embedding: bytes = _column(pa.binary())  # unit-norm CLIP image embedding, float16 little-endian
    caption_sources: list = _column(pa.list_(pa.string()))  # the sample's caption set, caption_index order
    captions: list = _column(pa.list_(pa.string()))
    caption_clip_scores: list = _column(pa.list_(pa.float32()))  # cosine(image, caption)
    caption_scores: list = _column(pa.list_(pa.float32()))  # the draw's score: given with the caption, else CLIP's


@dataclass(frozen=True, slots=True)
class CaptionRow:
    """One row of captions.parquet: one caption of a sample (its caption_index-th)."""

    key: str = _column(pa.string())
    shard: str = _column(pa.string())
    sample_index: int = _column(pa.int32())
    caption_index: int = _column(pa.int32())  # 0 = the caption of samples.parquet; the order of the embedding cache
    source: str = _column(pa.string())  # "caption" (samples.parquet), or the <source> of caption_<source> / side file
    caption: str = _column(pa.string())
    clip_score: float = _column(pa.float32())  # cosine(image, this caption)
    score: float = _column(pa.float32())  # what the caption draw uses: a score given with the caption, else clip_score


@dataclass(frozen=True, slots=True)
class DedupeRow:
    """One row of dedupe.parquet: a dropped near-duplicate and the kept sample it duplicates."""

    key: str = _column(pa.string())
    representative: str = _column(pa.string())  # a kept sample's key
    reason: str = _column(pa.string())  # "phash" | "embedding"
    distance: float = _column(pa.float32())  # phash: Hamming bits; embedding: 1 - cosine


NO_LABEL = -1
RowT = TypeVar("RowT", ShardRow, SampleRow, ScoreRow, ScorePartRow, CaptionRow, DedupeRow)


def schema_of(cls: type) -> pa.Schema:
    return pa.schema([(f.name, f.metadata["arrow"]) for f in fields(cls)])


MANIFEST_SCHEMA = schema_of(ShardRow)
SAMPLES_SCHEMA = schema_of(SampleRow)
SCORES_SCHEMA = schema_of(ScoreRow)
SCORE_PART_SCHEMA = schema_of(ScorePartRow)
CAPTIONS_SCHEMA = schema_of(CaptionRow)
DEDUPE_SCHEMA = schema_of(DedupeRow)
# column names by attribute (SAMPLE_COLUMNS.url == "url"): a renamed column fails loudly where it is read
SAMPLE_COLUMNS = SimpleNamespace(**{name: name for name in SAMPLES_SCHEMA.names})
META_TYPES = (pa.int64(), pa.float64(), pa.bool_(), pa.string())  # the types a metadata column may have


def meta_columns(schema: pa.Schema) -> list[str]:
    """The metadata columns of a samples table: every column that is not a ``SampleRow`` column, in order."""
    return [n for n in schema.names if n not in SAMPLES_SCHEMA.names]


def conform_samples(samples: pa.Table) -> pa.Table:
    """The ``SampleRow`` columns cast to SAMPLES_SCHEMA, in its order, then the metadata columns as they are."""
    core = with_split_column(samples).select(SAMPLES_SCHEMA.names).cast(SAMPLES_SCHEMA)
    for name in meta_columns(samples.schema):
        core = core.append_column(samples.schema.field(name), samples.column(name))
    return core


def concat_samples(tables: Sequence[pa.Table]) -> pa.Table:
    """Samples tables one after the other (previous runs, parts of a build): a metadata column missing from one
    reads as nulls there, int64 widens to float64 next to it; other type clashes name the column."""
    tables = [conform_samples(t) for t in tables]
    merged: dict[str, pa.DataType] = {}
    for t in tables:
        for name in meta_columns(t.schema):
            new, old = t.schema.field(name).type, merged.get(name)
            if old is None or old == new or pa.types.is_null(new):
                merged.setdefault(name, new)
            elif pa.types.is_null(old) or {old, new} == {pa.int64(), pa.float64()}:
                merged[name] = pa.float64() if not pa.types.is_null(old) else new
            else:
                raise ValueError(f"metadata column {name!r} is {old} in one part of the dataset and {new} in "
                                 f"another; give the inputs one type for it (or rename one with --meta-cols SRC:NAME)")
    schema = pa.schema(list(SAMPLES_SCHEMA) + [pa.field(n, t) for n, t in merged.items()])
    out = []
    for t in tables:
        cols = [t.column(f.name).cast(f.type) if f.name in t.schema.names else pa.nulls(t.num_rows, f.type)
                for f in schema]
        out.append(pa.Table.from_arrays(cols, schema=schema))
    return pa.concat_tables(out) if out else SAMPLES_SCHEMA.empty_table()


def rows_to_table(rows: Sequence[RowT], cls: type[RowT]) -> pa.Table:
    schema = schema_of(cls)
    return pa.table({f.name: pa.array([getattr(r, f.name) for r in rows], f.type) for f in schema}, schema=schema)


def table_rows(table: pa.Table, cls: type[RowT]) -> list[RowT]:
    """Typed rows of a (small) table, e.g. the manifest; columns the class does not know are ignored."""
    names = [f.name for f in fields(cls)]
    return [cls(**{n: r[n] for n in names}) for r in table.select(names).to_pylist()]


def shard_name(ratio_key: str, n: int) -> str:
    return f"{SHARDS_DIR}/{ratio_key}/{ratio_key}-{n:06d}{SHARD_EXT}"


def parse_shard_name(rel: str) -> tuple[str, int] | None:
    """(ratio_key, n) of a relative shard path written by shard_name, else None."""
    parts = rel.split("/")
    if len(parts) != 3 or parts[0] != SHARDS_DIR or not parts[2].endswith(SHARD_EXT):
        return None
    key, _, num = parts[2].removesuffix(SHARD_EXT).rpartition("-")
    if key != parts[1] or not num.isdigit():
        return None
    return key, int(num)


def score_part_name(shard: str) -> str:
    """A shard's score part, relative to the root: score_parts/{shard path}.parquet."""
    if not shard or shard.startswith("/") or ".." in shard.split("/"):
        raise ValueError(f"shard path {shard!r} must be relative to the dataset root (as in {SAMPLES})")
    return f"{SCORE_PARTS_DIR}/{shard}.parquet"


def text_embedding_dir(root: str) -> str:
    """Default caption-embedding cache of the dataset at ``root``."""
    return join(root, TEXT_EMB_DIR)


# ---- reading -------------------------------------------------------------------------------------------------


def _read_table(url: str, storage_options: dict[str, Any] | None = None, columns: list[str] | None = None):
    if not exists(url, storage_options):
        return None
    fs, path = fs_and_path(url, storage_options)
    with fs.open(path, "rb") as f:
        return pq.read_table(f, columns=columns)


def format_version(manifest_schema: pa.Schema, root: str) -> int:
    """The format version a manifest records (1 when written before versions were recorded)."""
    raw = (manifest_schema.metadata or {}).get(FORMAT_VERSION_KEY)
    version = 1 if raw is None else int(raw)
    if version > FORMAT_VERSION:
        raise ValueError(f"{join(root, MANIFEST)}: dataset format version {version}, this code reads up to "
                         f"{FORMAT_VERSION}; update pixeldit or rebuild the root")
    return version


def read_manifest(root: str, storage_options: dict[str, Any] | None = None) -> pa.Table | None:
    """The committed manifest of ``root`` (MANIFEST_SCHEMA), or None when no run has committed yet."""
    table = _read_table(join(root, MANIFEST), storage_options)
    if table is not None:
        format_version(table.schema, root)
    return table


def require_committed(root: str, storage_options: dict[str, Any] | None = None) -> None:
    """Raise unless ``root`` holds a committed dataset of a readable version (reads the manifest's footer only)."""
    url = join(root, MANIFEST)
    if not exists(url, storage_options):
        raise FileNotFoundError(f"{url} not found: the dataset at {root} is missing or its sharding did not "
                                f"finish (data_pipeline writes the manifest last)")
    fs, path = fs_and_path(url, storage_options)
    with fs.open(path, "rb") as f:
        format_version(pq.read_schema(f), root)


@dataclass(frozen=True)
class ShardProblem:
    """A committed shard that does not match manifest.parquet."""

    shard: str  # relative to the root
    problem: str  # "missing" or "N bytes, the manifest says M"


def check_shards(root: str, manifest: pa.Table, storage_options: dict[str, Any] | None = None,
                 shards: set[str] | None = None) -> list[ShardProblem]:
    """Every shard the manifest lists (or only ``shards``) against the stored files: present, same size.

    One recursive listing of ``{root}/shards`` (S3: one LIST request per 1000 objects), no shard is read."""
    stored = file_sizes(join(root, SHARDS_DIR), storage_options)
    problems = []
    for row in table_rows(manifest, ShardRow):
        if shards is not None and row.shard not in shards:
            continue
        size = stored.get(row.shard.removeprefix(SHARDS_DIR + "/"))
        if size is None:
            problems.append(ShardProblem(row.shard, "missing"))
        elif size != row.bytes:
            problems.append(ShardProblem(row.shard, f"{size} bytes, the manifest says {row.bytes}"))
    return problems


def read_samples(root: str, storage_options: dict[str, Any] | None = None) -> pa.Table | None:
    """samples.parquet of ``root`` (SAMPLES_SCHEMA + metadata columns), or None when there is none."""
    return _read_table(join(root, SAMPLES), storage_options)


def read_samples_schema(root: str, storage_options: dict[str, Any] | None = None) -> pa.Schema:
    """The columns of a committed root's samples.parquet (its footer only)."""
    require_committed(root, storage_options)
    url = join(root, SAMPLES)
    if not exists(url, storage_options):
        raise FileNotFoundError(f"{url} not found although the manifest is: rebuild the root")
    fs, path = fs_and_path(url, storage_options)
    with fs.open(path, "rb") as f:
        return pq.read_schema(f)


def read_committed_columns(root: str, columns: Sequence[str],
                           storage_options: dict[str, Any] | None = None) -> pa.Table:
    """``columns`` of the committed rows of samples.parquet (rows of shards the manifest lists, in file order:
    the rows of ``read_sample_index``)."""
    manifest = read_manifest(root, storage_options)
    if manifest is None:
        require_committed(root, storage_options)
    c = SAMPLE_COLUMNS
    table = _read_table(join(root, SAMPLES), storage_options, columns=list(dict.fromkeys([c.shard, *columns])))
    if table is None:
        raise FileNotFoundError(f"{join(root, SAMPLES)} not found although the manifest is: rebuild the root")
    listed = pa.array([r.shard for r in table_rows(manifest, ShardRow)], pa.string())
    return table.filter(pc.is_in(table[c.shard], listed)).select(list(columns))
def with_split_column(samples: pa.Table) -> pa.Table:
    """A samples table with the split column (a version-1 table gets it all null: training data)."""
    if SAMPLE_COLUMNS.split in samples.column_names:
        return samples
    return samples.append_column(SAMPLES_SCHEMA.field(SAMPLE_COLUMNS.split),
                                 pa.nulls(samples.num_rows, SAMPLES_SCHEMA.field(SAMPLE_COLUMNS.split).type))


def committed_samples(root: str, manifest: pa.Table) -> pa.Table | None:
    """samples.parquet rows of the shards ``manifest`` lists (rows a crashed run wrote afterwards are dropped)."""
    samples = read_samples(root)
    if samples is None:
        return None
    samples = with_split_column(samples)
    committed = pa.array([r.shard for r in table_rows(manifest, ShardRow)], pa.string())
    return samples.filter(pc.is_in(samples[SAMPLE_COLUMNS.shard], committed))


def read_stats(root: str) -> dict[str, Any]:
    url = join(root, STATS)
    if not exists(url):
        raise FileNotFoundError(f"{url} not found: run `pixeldit-data shard` (or build_shards) on this root first")
    return json.loads(read_bytes(url))


def read_state(manifest: pa.Table | None) -> dict[str, Any]:
    """The pipeline state a committed manifest stores in its metadata ({} for a fresh root)."""
    if manifest is None:
        return {}
    meta = manifest.schema.metadata or {}
    if STATE_KEY not in meta:
        raise ValueError(f"{MANIFEST} has no {STATE_KEY.decode()} metadata: it was not written by data_pipeline")
    state = json.loads(meta[STATE_KEY])
    if state.get("version") != STATE_VERSION:
        raise ValueError(f"{MANIFEST} state version {state.get('version')} != {STATE_VERSION}; rebuild this root")
    return state


def _group_by_shard(table: pa.Table, url: str, with_caption_index: bool) -> dict[str, list[list[str]]]:
    """{shard: per sample (sample_index order) its captions (caption_index order)} of a table with columns
    shard, sample_index, caption[, caption_index]; indices must be 0..n-1 without gaps."""
    cols = [table.column(n).to_pylist() for n in ("shard", "sample_index", "caption")]
    cidx = table.column("caption_index").to_pylist() if with_caption_index else [0] * table.num_rows
    rows: dict[str, list[tuple[int, int, str]]] = {}
    for shard, idx, cap, ci in zip(*cols, cidx):
        rows.setdefault(shard, []).append((int(idx), int(ci), cap or ""))
    out = {}
    for shard, items in sorted(rows.items()):
        items.sort()
        sets: list[list[str]] = []
        for idx, ci, cap in items:
            if ci == 0:
                if idx != len(sets):
                    raise ValueError(f"{url}: sample_index of shard {shard} is not 0..n-1 (no caption 0 of sample "
                                     f"{len(sets)})")
                sets.append([])
            if not sets or idx != len(sets) - 1 or ci != len(sets[-1]):
                raise ValueError(f"{url}: shard {shard} sample {idx}: caption_index {ci} out of order (need 0..k-1)")
            sets[-1].append(cap)
        out[shard] = sets
    return out


def caption_sets_by_shard(root: str, storage_options: dict[str, Any] | None = None) -> dict[str, list[list[str]]]:
    """{shard: per sample (sample_index order) every caption of it (caption_index order)}.

    From captions.parquet when the score stage wrote one (original caption + recaptions), else the one caption
    per sample of samples.parquet (None reads as ""). A captions.parquet that lacks a shard of the committed
    samples (shards added after scoring) is refused: rerun the score stage."""
    url = join(root, SAMPLES)
    c = SAMPLE_COLUMNS
    table = _read_table(url, storage_options, columns=[c.shard, c.sample_index, c.caption])
    if table is None:
        raise FileNotFoundError(f"{url} not found: build the dataset with the data pipeline first")
    manifest = read_manifest(root, storage_options)
    if manifest is not None:
        committed = pa.array([r.shard for r in table_rows(manifest, ShardRow)], pa.string())
        table = table.filter(pc.is_in(table[c.shard], committed))
    captions = _read_table(join(root, CAPTIONS), storage_options,
                           columns=["shard", "sample_index", "caption_index", "caption"])
    if captions is None:
        return _group_by_shard(table, url, with_caption_index=False)
    out = _group_by_shard(captions, join(root, CAPTIONS), with_caption_index=True)
    missing = sorted(set(table[c.shard].to_pylist()) - set(out))
    if missing:
        raise ValueError(f"{join(root, CAPTIONS)} has no captions for {len(missing)} committed shards (e.g. "
                         f"{missing[0]}; added after the score stage ran): rerun `pixeldit-data score {root}`")
    return out


@dataclass
class SampleIndex:
    """samples.parquet of a committed root as numpy arrays (captions and keys stay in Arrow): the loader's view."""

    root: str
    shards: list[str]  # shard id -> path relative to root
    shard_id: np.ndarray  # (N,) int64
    sample_index: np.ndarray  # (N,) int64
    image_offset: np.ndarray  # (N,) int64
    image_size: np.ndarray  # (N,) int64
    ratio_keys: list[str]  # ratio key id -> ratio key
    ratio_id: np.ndarray  # (N,) int64
    label: np.ndarray  # (N,) int64, NO_LABEL when none
    captions: pa.Array
    keys: pa.Array
    manifest: pa.Table  # MANIFEST_SCHEMA: one row per committed shard
    shard_bytes: np.ndarray  # (num shards,) int64: size of each shard (from the manifest)
    heldout: np.ndarray  # (N,) bool: the held-out split (never trained on)

    def __len__(self) -> int:
        return len(self.shard_id)


def read_sample_index(root: str, storage_options: dict[str, Any] | None = None) -> SampleIndex:
    """Read ``{root}/samples.parquet``; the dataset must be committed (manifest written last)."""
    require_committed(root, storage_options)
    manifest = read_manifest(root, storage_options)
    c = SAMPLE_COLUMNS
    columns = [c.key, c.shard, c.ratio_key, c.sample_index, c.image_offset, c.image_size, c.caption, c.label]
    url = join(root, SAMPLES)
    if not exists(url, storage_options):
        raise FileNotFoundError(f"{url} not found although the manifest is: rebuild the root")
    fs, path = fs_and_path(url, storage_options)
    with fs.open(path, "rb") as f:
        parquet = pq.ParquetFile(f)
        has_split = c.split in parquet.schema_arrow.names  # absent before format version 2
        table = parquet.read(columns=columns + ([c.split] if has_split else []))
    listed = {r.shard: r.bytes for r in table_rows(manifest, ShardRow)}
    committed = pa.array(list(listed), pa.string())
    table = table.filter(pc.is_in(table[c.shard], committed)).combine_chunks()  # rows of a crashed rerun: out
    if table.num_rows == 0:
        raise ValueError(f"{join(root, SAMPLES)} has no rows")
    shard_codes = pc.dictionary_encode(table[c.shard]).combine_chunks()  # compact for 10^8 rows
    ratio_codes = pc.dictionary_encode(table[c.ratio_key]).combine_chunks()

    def col(name: str) -> np.ndarray:
        return table[name].to_numpy().astype(np.int64)

    captions = table[c.caption].fill_null("")
    shards = [str(s) for s in shard_codes.dictionary.to_pylist()]
    return SampleIndex(
        root=root, shards=shards,
        shard_id=shard_codes.indices.to_numpy().astype(np.int64), sample_index=col(c.sample_index),
        image_offset=col(c.image_offset), image_size=col(c.image_size),
        ratio_keys=[str(k) for k in ratio_codes.dictionary.to_pylist()],
        ratio_id=ratio_codes.indices.to_numpy().astype(np.int64),
        label=table[c.label].fill_null(NO_LABEL).to_numpy().astype(np.int64),
        captions=captions.chunk(0) if captions.num_chunks else pa.array([], pa.string()),
        keys=table[c.key].chunk(0), manifest=manifest,
        shard_bytes=np.array([int(listed[s]) for s in shards], dtype=np.int64), heldout=heldout_mask(table),
    )  # fmt: skip


def heldout_mask(samples: pa.Table) -> np.ndarray:
    """(N,) bool: the rows of a samples table in the held-out split (none without a split column)."""
    if SAMPLE_COLUMNS.split not in samples.column_names:
        return np.zeros(samples.num_rows, dtype=bool)
    column = samples[SAMPLE_COLUMNS.split]
    bad = pc.invert(pc.or_(pc.is_in(column, pa.array(SPLITS)), pc.is_null(column)))
    if pc.any(bad).as_py():
        first = column.filter(bad)[0].as_py()
        raise ValueError(f"{SAMPLES}: split value {first!r}; valid values: {', '.join(SPLITS)} (or null: train)")
    return pc.fill_null(pc.equal(column, SPLIT_HELDOUT), False).to_numpy(zero_copy_only=False).astype(bool)


def curation_metadata(schema: pa.Schema, url: str) -> dict[str, Any]:
    """The score stage's metadata (SCORES_META_KEY) of scores.parquet or a score part; newer versions refused."""
    raw = (schema.metadata or {}).get(SCORES_META_KEY)
    if raw is None:
        raise ValueError(f"{url} has no {SCORES_META_KEY.decode()} metadata: it was not written by the score stage")
    meta = json.loads(raw)
    if meta.get("version", 0) > SCORES_VERSION:
        raise ValueError(f"{url}: score format version {meta.get('version')}, this code reads up to {SCORES_VERSION}; "
                         "update pixeldit or rerun the score stage")
    return meta


def read_scores(root: str, storage_options: dict[str, Any] | None = None) -> pa.Table:
    """scores.parquet of ``root`` (SCORES_SCHEMA; its metadata: ``curation_metadata``)."""
    table = _read_table(join(root, SCORES), storage_options)
    if table is None:
        raise FileNotFoundError(f"{join(root, SCORES)} not found: run `pixeldit-data score {root}` first")
    curation_metadata(table.schema, join(root, SCORES))
    return table


def read_captions(root: str, storage_options: dict[str, Any] | None = None,
                  columns: list[str] | None = None) -> pa.Table:
    """captions.parquet of ``root`` (CAPTIONS_SCHEMA)."""
    table = _read_table(join(root, CAPTIONS), storage_options, columns=columns)
    if table is None:
        raise FileNotFoundError(f"{join(root, CAPTIONS)} not found: run `pixeldit-data score {root}` first")
    return table


def read_dedupe(root: str, storage_options: dict[str, Any] | None = None) -> pa.Table | None:
    """dedupe.parquet of ``root`` (DEDUPE_SCHEMA), or None when dedupe has not run."""
    return _read_table(join(root, DEDUPE), storage_options)


def read_score_part(root: str, shard: str, storage_options: dict[str, Any] | None = None,
                    columns: list[str] | None = None) -> pa.Table | None:
    """The score part of one shard (SCORE_PART_SCHEMA), or None when it has not been written."""
    return _read_table(join(root, score_part_name(shard)), storage_options, columns=columns)


def read_score_part_metadata(root: str, shard: str, storage_options: dict[str, Any] | None = None) -> dict | None:
    """The metadata of a shard's score part (footer only), or None when there is no part."""
    url = join(root, score_part_name(shard))
    if not exists(url, storage_options):
        return None
    fs, path = fs_and_path(url, storage_options)
    with fs.open(path, "rb") as f:
        return curation_metadata(pq.read_schema(f), url)


# ---- writing -------------------------------------------------------------------------------------------------


def _parquet_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


def write_samples(root: str, samples: pa.Table, storage_options: dict[str, Any] | None = None) -> None:
    """samples.parquet alone (``conform_samples``); ``write_index`` commits a whole root."""
    write_bytes_atomic(join(root, SAMPLES), _parquet_bytes(conform_samples(samples)), storage_options)


def write_index(root: str, samples: pa.Table, stats: dict[str, Any], manifest: pa.Table,
                state: dict[str, Any]) -> None:
    """Commit a root: samples.parquet, stats.json, then manifest.parquet (version + ``state`` metadata) LAST."""
    write_samples(root, samples)
    write_json_atomic(join(root, STATS), stats)
    meta = {FORMAT_VERSION_KEY: str(FORMAT_VERSION).encode(),
            STATE_KEY: json.dumps({**state, "version": STATE_VERSION}, sort_keys=True).encode()}
    manifest = manifest.cast(MANIFEST_SCHEMA).replace_schema_metadata(meta)
    write_bytes_atomic(join(root, MANIFEST), _parquet_bytes(manifest))


def write_table(url: str, table: pa.Table, schema: pa.Schema, meta: dict[str, Any] | None = None,
                storage_options: dict[str, Any] | None = None) -> None:
    """One curation table (scores, captions, dedupe, a score part) cast to ``schema``, written atomically;
    ``meta`` goes into SCORES_META_KEY with the score format version."""
    table = table.cast(schema)
    if meta is not None:
        payload = json.dumps({**meta, "version": SCORES_VERSION}, sort_keys=True).encode()
        table = table.replace_schema_metadata({SCORES_META_KEY: payload})
    write_bytes_atomic(url, _parquet_bytes(table), storage_options)
