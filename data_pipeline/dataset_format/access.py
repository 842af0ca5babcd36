"""Reading and writing a dataset root: manifest, samples, stats, the curation tables, the commit order of
``write_index`` (the layout is described in the package docstring)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pixeldit.storage import exists, file_sizes, fs_and_path, join, read_bytes, write_bytes_atomic, write_json_atomic

from .layout import (
    CAPTIONS, DEDUPE, FORMAT_VERSION, FORMAT_VERSION_KEY, MANIFEST, MANIFEST_SCHEMA, NO_LABEL, SAMPLES,
    SAMPLE_COLUMNS, SCORES, SCORES_META_KEY, SCORES_VERSION, SHARDS_DIR, SPLITS, SPLIT_HELDOUT, STATE_KEY,
    STATE_VERSION, STATS, ShardRow, conform_samples, score_part_name, table_rows, with_split_column,
)


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
