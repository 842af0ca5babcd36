"""Integration: local HTTP server -> img2dataset ingest -> bucketed shards on a real S3 endpoint (moto).

Everything runs on 127.0.0.1. The URL list and the ingest folder live on S3 too, so the same code
paths that read local folders are exercised against S3. Checks: every kept sample is read back with
the right bucket, caption, label and pixels; the bad-input zoo is counted by reason; re-runs are
incremental (ingest skips finished shards; sharding skips consumed ingest shards, removes crash
leftovers and continues numbering when a new ingest folder is added).
"""

from __future__ import annotations

import collections
import dataclasses
import io
import json
import os
import shutil
import tarfile
import urllib.parse

import pyarrow.parquet as pq
import pytest

from data_fixtures import assert_pixels_match, moto_s3
from data_pipeline.buckets import nearest_ratio_key
from data_pipeline.ingest import IngestConfig, ingest
from data_pipeline.dataset_format import read_manifest, read_samples
from data_pipeline.serve import serve_folder
from data_pipeline.shard import ShardConfig, build_shards
from data_pipeline.stats import compute_stats
from data_pipeline.synthetic import make_synthetic_dataset
from pixeldit import storage
from pixeldit.storage import fs_and_path

pytestmark = pytest.mark.slow
INGEST = IngestConfig(label_col="label", threads=4, timeout=3, samples_per_shard=16)
SHARD = ShardConfig(min_side=16, max_aspect_ratio=4.0, samples_per_shard=5, workers=2, progress=False)


def _read_tar(data: bytes) -> dict[str, dict[str, bytes]]:
    """{key: {ext: bytes}} in member order."""
    out: dict[str, dict[str, bytes]] = collections.OrderedDict()
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        for m in tf.getmembers():
            key, _, ext = m.name.partition(".")
            out.setdefault(key, {})[ext] = tf.extractfile(m).read()
    return out


def _expected_counts(items):
    ok = [it for it in items if it.expect.startswith("ok")]
    skipped = collections.Counter(it.expect.split(":")[1] for it in items if it.expect.startswith("skip"))
    fixes = collections.Counter(it.expect.split(":")[1] for it in ok if ":" in it.expect)
    return ok, dict(skipped), dict(fixes)


def _check_root(out: str, items, images_dir: str) -> dict:
    """Read every shard of `out` back and compare with the synthetic items; returns stats."""
    fs, root = fs_and_path(out)
    manifest = read_manifest(out).to_pylist()
    samples = {r["key"]: r for r in read_samples(out).to_pylist()}
    by_name: dict = {}
    for it in items:
        by_name.setdefault(it.name, it)  # a duplicate-URL row points at the file of the first one
    seen = []
    for entry in manifest:
        data = fs.cat_file(f"{root}/{entry['shard']}")
        assert len(data) == entry["bytes"]
        members = _read_tar(data)
        assert len(members) == entry["num_samples"]
        assert entry["shard"].startswith(f"shards/{entry['ratio_key']}/")
        for index, (key, m) in enumerate(members.items()):
            meta = json.loads(m["json"])
            ext = next(e for e in ("jpg", "png", "webp") if e in m)
            item = by_name[urllib.parse.urlparse(meta["url"]).path.lstrip("/")]
            seen.append(item.name)
            assert (meta["width"], meta["height"]) == (item.width, item.height), item.kind
            assert meta["ratio_key"] == entry["ratio_key"] == nearest_ratio_key(item.height, item.width)
            assert entry["min_width"] <= item.width <= entry["max_width"]
            caption = item.caption.decode("cp1252") if isinstance(item.caption, bytes) else item.caption
            assert m["txt"].decode("utf-8") == caption.strip() == meta["caption"]
            assert int(m["cls"]) == item.label == meta["label"]
            with open(os.path.join(images_dir, item.name), "rb") as f:
                source = f.read()
            if item.kind == "good":
                assert m[ext] == source  # kept byte for byte
            else:
                assert_pixels_match(m[ext], source, lossy=ext == "jpg")
            row = samples[key]  # ranged read from samples.parquet offsets
            assert (row["shard"], row["sample_index"], row["image_ext"]) == (entry["shard"], index, ext)
            assert row["label"] == item.label
            start, end = row["image_offset"], row["image_offset"] + row["image_size"]
            assert fs.cat_file(f"{root}/{entry['shard']}", start=start, end=end) == m[ext]
    assert len(seen) == len(set(seen)) == len(samples)
    return {"seen": seen, "manifest": manifest}


def test_http_to_s3_end_to_end_with_bad_input_zoo_and_incremental_reruns(tmp_path):
    ds = make_synthetic_dataset(str(tmp_path / "synth"), num_images=24, seed=0, bad_inputs=True)
    ok_items, want_skipped, want_fixes = _expected_counts(ds.items)
    with moto_s3() as bucket, serve_folder(ds.images_dir) as base_url:
        fs, _ = fs_and_path(bucket)
        local_list = ds.write_url_list(base_url, str(tmp_path / "urls.parquet"))
        fs.put_file(local_list, f"{bucket[5:]}/lists/urls.parquet")
        ingest_dir, out = f"{bucket}/ingest", f"{bucket}/out"

        first = ingest(f"{bucket}/lists/urls.parquet", ingest_dir, INGEST)
        assert (first.input_rows, first.shards_total, first.shards_done) == (len(ds.items), 3, 3)
        # a shard whose stats file is missing counts as unfinished: only that one is downloaded again
        fs.rm_file(f"{bucket[5:]}/ingest/00001_stats.json")
        again = ingest(f"{bucket}/lists/urls.parquet", ingest_dir, INGEST)
        assert (again.shards_done, again.shards_skipped, again.success) == (1, 2, first.success)
        assert ingest(f"{bucket}/lists/urls.parquet", ingest_dir, INGEST).shards_done == 0

        summary = build_shards(ingest_dir, out, SHARD)
        stats = summary.stats
        assert stats["total"] == len(ds.items) and stats["pending"] == 0
        assert stats["ok"] == len(ok_items) == summary.samples_written
        assert stats["skipped"] == want_skipped
        assert stats["normalised"] == want_fixes
        checked = _check_root(out, ds.items, ds.images_dir)
        assert sorted(checked["seen"]) == sorted(it.name for it in ok_items)
        report = compute_stats(out, png=str(tmp_path / "hist.png"))
        assert sum(report["buckets"].values()) == stats["ok"] and os.path.getsize(tmp_path / "hist.png") > 1000

        # crash leftovers (an uncommitted shard and a staging file) vanish; committed state is unchanged
        fs.pipe_file(f"{bucket[5:]}/out/shards/1.00/1.00-000099.tar", b"half")
        staging = storage.tmp_path(f"{bucket[5:]}/out/shards/1.00/1.00-000100.tar")
        fs.pipe_file(staging, b"half")
        rerun = build_shards(ingest_dir, out, SHARD)
        assert rerun.up_to_date and rerun.stats == stats
        assert not fs.exists(f"{bucket[5:]}/out/shards/1.00/1.00-000099.tar")
        assert not fs.exists(staging)

        # new data arrives in a second ingest folder: only it is sharded, old shards stay as they are
        extra = make_synthetic_dataset(str(tmp_path / "extra"), num_images=6, seed=1)
        for it in extra.items:
            shutil.copy(os.path.join(extra.images_dir, it.name), os.path.join(ds.images_dir, "extra_" + it.name))
        extra.items = [dataclasses.replace(it, name="extra_" + it.name) for it in extra.items]
        extra.items.append(ok_items[0])  # a URL that is already in the committed shards
        extra_list = extra.write_url_list(base_url, str(tmp_path / "extra.jsonl"), fmt="jsonl")
        ingest(extra_list, f"{bucket}/ingest2", INGEST)
        old_bytes = {e["shard"]: fs.cat_file(f"{bucket[5:]}/out/{e['shard']}") for e in checked["manifest"]}
        grown = build_shards([ingest_dir, f"{bucket}/ingest2"], out, SHARD)
        assert (grown.ingest_shards_new, grown.samples_written) == (1, 6)
        assert grown.stats["ok"] == stats["ok"] + 6 and grown.stats["total"] == stats["total"] + 7
        assert grown.stats["skipped"]["duplicate_url"] == want_skipped["duplicate_url"] + 1
        assert all(fs.cat_file(f"{bucket[5:]}/out/{s}") == b for s, b in old_bytes.items())
        rechecked = _check_root(out, ds.items + extra.items, ds.images_dir)
        assert len(rechecked["manifest"]) == len(checked["manifest"]) + grown.shards_written


def test_manifest_is_written_last_and_samples_index_matches(tmp_path):
    """Local output: the manifest's mtime is the newest, the parquet schemas are the contract's."""
    ds = make_synthetic_dataset(str(tmp_path / "synth"), num_images=10, seed=5)
    with serve_folder(ds.images_dir) as base_url:
        ingest(ds.write_url_list(base_url, str(tmp_path / "u.csv"), fmt="csv"), str(tmp_path / "ing"), INGEST)
    out = tmp_path / "out"
    build_shards(str(tmp_path / "ing"), str(out), ShardConfig(samples_per_shard=3, min_side=0, progress=False))
    written = [out / "samples.parquet", out / "stats.json", out / "manifest.parquet"]
    assert [p.stat().st_mtime_ns for p in written] == sorted(p.stat().st_mtime_ns for p in written)
    assert all(p.stat().st_mtime_ns <= written[-1].stat().st_mtime_ns for p in out.rglob("*.tar"))
    assert not [p for p in out.rglob("*") if storage.is_tmp(p)]
    assert pq.read_schema(out / "manifest.parquet").names[:10] == [
        "shard", "ratio_key", "bucket_height", "bucket_width", "num_samples", "bytes",
        "min_width", "max_width", "min_height", "max_height",
    ]  # fmt: skip
    samples = pq.read_table(out / "samples.parquet").to_pylist()
    assert len(samples) == 10 and all(s["label"] >= 0 for s in samples)
    assert json.loads((out / "stats.json").read_text())["ok"] == 10
