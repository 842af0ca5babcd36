"""The dataset format module: schemas from the row classes, shard names, versions, committed reads."""
from __future__ import annotations

import dataclasses

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from data_pipeline import dataset_format as fmt
from data_pipeline.dataset_format import SampleRow, ShardRow
from train_helpers import write_tiny_dataset


def _rewrite_manifest(root, version: bytes | None) -> None:
    """Rewrite the manifest with another recorded format version (None: as written before versions existed)."""
    table = pq.read_table(root / fmt.MANIFEST)
    meta = dict(table.schema.metadata)
    meta.pop(fmt.FORMAT_VERSION_KEY)
    if version is not None:
        meta[fmt.FORMAT_VERSION_KEY] = version
    pq.write_table(table.replace_schema_metadata(meta), root / fmt.MANIFEST)


def test_schemas_follow_the_row_classes_and_rows_round_trip():
    assert fmt.SAMPLES_SCHEMA.names == [f.name for f in dataclasses.fields(SampleRow)]
    assert fmt.MANIFEST_SCHEMA.names == [f.name for f in dataclasses.fields(ShardRow)]
    rows = [ShardRow(fmt.shard_name("0.50", n), "0.50", 256, 512, 3, 1000 + n, 1, 2, 3, 4) for n in range(3)]
    table = fmt.rows_to_table(rows, ShardRow)
    assert table.schema == fmt.MANIFEST_SCHEMA and fmt.table_rows(table, ShardRow) == rows


@pytest.mark.parametrize("ratio_key,n", [("1.00", 0), ("0.25", 17), ("4.00", 999999)])
def test_shard_names_parse_back(ratio_key, n):
    assert fmt.parse_shard_name(fmt.shard_name(ratio_key, n)) == (ratio_key, n)


@pytest.mark.parametrize("rel", ["shards/1.00/0.50-000000.tar", "shards/1.00/1.00-000000.tar.tmp",
                                 "other/1.00/1.00-000000.tar", "shards/1.00-000000.tar", "shards/1.00/1.00-x.tar"])
def test_foreign_names_are_not_shard_names(rel):
    assert fmt.parse_shard_name(rel) is None


def test_committed_root_records_the_version_and_older_roots_still_load(tmp_path):
    root = write_tiny_dataset(tmp_path / "data", {"1.00": 4, "2.00": 2})
    manifest = fmt.read_manifest(str(root))
    assert manifest.schema.metadata[fmt.FORMAT_VERSION_KEY] == str(fmt.FORMAT_VERSION).encode()
    assert fmt.format_version(manifest.schema, str(root)) == fmt.FORMAT_VERSION
    _rewrite_manifest(root, None)
    assert fmt.format_version(fmt.read_manifest(str(root)).schema, str(root)) == 1
    assert len(fmt.read_sample_index(str(root))) == 6


def test_a_newer_format_version_is_refused_naming_the_root(tmp_path):
    root = write_tiny_dataset(tmp_path / "data", {"1.00": 4})
    _rewrite_manifest(root, str(fmt.FORMAT_VERSION + 1).encode())
    for read in (fmt.read_manifest, fmt.read_sample_index):
        with pytest.raises(ValueError, match=f"{root}/{fmt.MANIFEST}: dataset format version {fmt.FORMAT_VERSION + 1}"):
            read(str(root))


def test_rows_of_uncommitted_shards_are_not_read(tmp_path):
    root = write_tiny_dataset(tmp_path / "data", {"1.00": 8}, per_shard=4)
    manifest = fmt.read_manifest(str(root))
    first = manifest.slice(0, 1)  # as if the second shard had been written by a run that crashed before its commit
    kept = fmt.committed_samples(str(root), first)
    assert set(kept.column("shard").to_pylist()) == {fmt.shard_name("1.00", 0)} and kept.num_rows == 4


def test_caption_sets_by_shard_are_in_sample_order_and_gaps_are_refused(tmp_path):
    root = write_tiny_dataset(tmp_path / "data", {"1.00": 6}, per_shard=4)
    captions = fmt.caption_sets_by_shard(str(root))
    assert list(captions) == [fmt.shard_name("1.00", 0), fmt.shard_name("1.00", 1)]
    assert captions[fmt.shard_name("1.00", 1)] == [["sample 4 in bucket 1.00"], ["sample 5 in bucket 1.00"]]
    samples = fmt.read_samples(str(root))
    fmt.write_samples(str(root), samples.filter(pc.not_equal(samples["key"], samples["key"][1])))  # drop one row
    with pytest.raises(ValueError, match="sample_index of shard shards/1.00/1.00-000000.tar is not 0..n-1"):
        fmt.caption_sets_by_shard(str(root))
