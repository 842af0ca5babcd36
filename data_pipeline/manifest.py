"""The output index: manifest.parquet (one row per shard), samples.parquet (one row per sample), stats.json.

Commit order (see contracts.md): shards, then samples.parquet, then stats.json, then manifest.parquet
LAST. The manifest is the commit point: its parquet key-value metadata ("pixeldit.state") holds the
cumulative counters and which ingest shards were consumed, so a re-run trusts only what a committed
manifest lists (shards or sample rows written by a crashed run after it are discarded).

Readers (the trainer) only need:
    manifest = read_manifest(root)           # pyarrow.Table, MANIFEST_SCHEMA
    samples = read_samples(root)             # pyarrow.Table, SAMPLES_SCHEMA
"""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from .storage import exists, fs_and_path, join, read_bytes, write_bytes_atomic

MANIFEST = "manifest.parquet"
SAMPLES = "samples.parquet"
STATS = "stats.json"
SHARDS_DIR = "shards"
STATE_KEY = b"pixeldit.state"
STATE_VERSION = 1

MANIFEST_SCHEMA = pa.schema(
    [
        ("shard", pa.string()),  # path relative to the root: shards/{ratio_key}/{ratio_key}-{n:06d}.tar
        ("ratio_key", pa.string()),
        ("bucket_height", pa.int32()),  # at the table used when sharding (informational)
        ("bucket_width", pa.int32()),
        ("num_samples", pa.int64()),
        ("bytes", pa.int64()),
        ("min_width", pa.int32()),
        ("max_width", pa.int32()),
        ("min_height", pa.int32()),
        ("max_height", pa.int32()),
    ]
)
SAMPLES_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("shard", pa.string()),
        ("ratio_key", pa.string()),
        ("sample_index", pa.int32()),  # position inside its shard
        ("image_offset", pa.int64()),  # byte offset of the image member's data inside the tar
        ("image_size", pa.int64()),
        ("image_ext", pa.string()),  # jpg | png | webp
        ("caption", pa.string()),
        ("width", pa.int32()),  # stored (EXIF-normalised) image size
        ("height", pa.int32()),
        ("label", pa.int64()),  # -1 when there is no class label
        ("url", pa.string()),
        ("sha256", pa.string()),  # of the downloaded bytes (dedupe across runs)
    ]
)


def shard_name(ratio_key: str, n: int) -> str:
    return f"{SHARDS_DIR}/{ratio_key}/{ratio_key}-{n:06d}.tar"


def parse_shard_name(rel: str) -> tuple[str, int] | None:
    """(ratio_key, n) of a relative shard path written by shard_name, else None."""
    parts = rel.split("/")
    if len(parts) != 3 or parts[0] != SHARDS_DIR or not parts[2].endswith(".tar"):
        return None
    key, _, num = parts[2][:-4].rpartition("-")
    if key != parts[1] or not num.isdigit():
        return None
    return key, int(num)


def _read_table(url: str) -> pa.Table | None:
    if not exists(url):
        return None
    fs, path = fs_and_path(url)
    with fs.open(path, "rb") as f:
        return pq.read_table(f)


def read_manifest(root: str) -> pa.Table | None:
    """The committed manifest of `root`, or None when no run has committed yet."""
    return _read_table(join(root, MANIFEST))


def read_samples(root: str) -> pa.Table | None:
    return _read_table(join(root, SAMPLES))


def read_stats(root: str) -> dict[str, Any]:
    url = join(root, STATS)
    if not exists(url):
        raise FileNotFoundError(f"{url} not found: run `pixeldit-data shard` (or build_shards) on this root first")
    return json.loads(read_bytes(url))


def read_state(manifest: pa.Table | None) -> dict[str, Any]:
    """The committed state stored in the manifest's metadata ({} for a fresh root)."""
    if manifest is None:
        return {}
    meta = manifest.schema.metadata or {}
    if STATE_KEY not in meta:
        raise ValueError(f"{MANIFEST} has no {STATE_KEY.decode()} metadata: it was not written by data_pipeline")
    state = json.loads(meta[STATE_KEY])
    if state.get("version") != STATE_VERSION:
        raise ValueError(f"{MANIFEST} state version {state.get('version')} != {STATE_VERSION}; rebuild this root")
    return state


def _parquet_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


def commit(root: str, manifest: pa.Table, samples: pa.Table, stats: dict[str, Any], state: dict[str, Any]) -> None:
    """Write samples.parquet, stats.json, then manifest.parquet (with `state` in its metadata) last."""
    write_bytes_atomic(join(root, SAMPLES), _parquet_bytes(samples.cast(SAMPLES_SCHEMA)))
    write_bytes_atomic(join(root, STATS), json.dumps(stats, indent=2, sort_keys=True).encode())
    state = {**state, "version": STATE_VERSION}
    meta = {STATE_KEY: json.dumps(state, sort_keys=True).encode()}
    manifest = manifest.cast(MANIFEST_SCHEMA).replace_schema_metadata(meta)
    write_bytes_atomic(join(root, MANIFEST), _parquet_bytes(manifest))


def manifest_rows_to_table(rows: list[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA)


def sample_rows_to_table(rows: list[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=SAMPLES_SCHEMA)
