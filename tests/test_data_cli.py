"""Smoke test of the `pixeldit-data` entry point: synth, run (max-side resize, class labels), stats."""

from __future__ import annotations

import glob
import json
import math
import os

import pytest
import webdataset as wds

from data_pipeline.buckets import nearest_ratio_key
from data_pipeline.cli import build_parser, ingest_config, main, shard_config
from data_pipeline.ingest import IngestConfig
from data_pipeline.serve import serve_folder
from data_pipeline.shard import ShardConfig
from data_pipeline.synthetic import CLASS_NAMES, make_synthetic_dataset

pytestmark = pytest.mark.slow


def test_cli_run_with_max_side_resize_and_labels_then_stats(tmp_path, capsys):
    assert main(["synth", str(tmp_path / "synth"), "--num-images", "12", "--seed", "7", "--base-size", "80"]) == 0
    ds = make_synthetic_dataset(str(tmp_path / "synth"), num_images=12, seed=7, base_size=80)  # same items
    out = tmp_path / "out"
    with serve_folder(ds.images_dir) as base_url:
        url_list = ds.write_url_list(base_url, str(tmp_path / "urls.jsonl"), fmt="jsonl")
        rc = main([
            "run", url_list, "--out", str(out), "--label-col", "label", "--resize", "max-side", "--max-side", "48",
            "--threads", "4", "--timeout", "3", "--samples-per-shard", "4", "--min-side", "8", "--no-progress",
        ])  # fmt: skip
    assert rc == 0
    text = capsys.readouterr().out
    assert "[ingest]" in text and "[shard]" in text and "ok: 12" in text
    assert main(["stats", str(out), "--png", str(tmp_path / "h.png"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] == 12 and report["skipped"] == {} and os.path.exists(tmp_path / "h.png")

    by_url = {f"{base_url}/{it.name}": it for it in ds.items}
    shards = sorted(glob.glob(str(out / "shards" / "*" / "*.tar")))
    assert sum(1 for _ in shards) == report["shards"]
    seen = 0
    for sample in wds.WebDataset(shards, shardshuffle=False).decode("pil"):
        meta, item = sample["json"], by_url[sample["json"]["url"]]
        image = sample.get("jpg") or sample.get("png")
        assert image.size == (meta["width"], meta["height"]) and max(image.size) <= 48
        assert abs(math.log(image.height / image.width) - math.log(item.height / item.width)) < 0.05  # ratio survives
        assert meta["ratio_key"] == nearest_ratio_key(image.height, image.width)
        assert f"/{meta['ratio_key']}/" in sample["__url__"]
        assert sample["cls"] == item.label and item.caption == sample["txt"]
        assert CLASS_NAMES[item.label].split()[0] in sample["txt"]  # the caption names the class colour
        seen += 1
    assert seen == 12


def test_cli_rejects_unknown_choices_with_the_valid_values(capsys):
    assert main(["run", "u.parquet", "--out", "o", "--resize", "huge"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "'huge'" in err and "'off', 'max-side'" in err


def test_cli_flag_defaults_are_the_config_defaults():
    a = build_parser().parse_args(["run", "u.parquet", "--out", "o"])
    assert ingest_config(a) == IngestConfig() and shard_config(a) == ShardConfig()
