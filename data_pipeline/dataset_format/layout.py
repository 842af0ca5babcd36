"""The dataset format's names and tables: file and folder names, format version, the row classes whose fields
are the parquet schemas, and shard naming (the layout itself is described in the package docstring)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from types import SimpleNamespace
from typing import Any, Sequence, TypeVar

import pyarrow as pa

from pixeldit.storage import join

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


def with_split_column(samples: pa.Table) -> pa.Table:
    """A samples table with the split column (a version-1 table gets it all null: training data)."""
    if SAMPLE_COLUMNS.split in samples.column_names:
        return samples
    return samples.append_column(SAMPLES_SCHEMA.field(SAMPLE_COLUMNS.split),
                                 pa.nulls(samples.num_rows, SAMPLES_SCHEMA.field(SAMPLE_COLUMNS.split).type))


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
