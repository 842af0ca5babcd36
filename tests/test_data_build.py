"""Builds cut into tasks (in this process and on submitit's local executor), metadata columns and filters, with
real img2dataset downloads from a loopback HTTP server: several tasks give exactly the samples of one, a failed
task reruns alone, shard-time and stage-time filters select exactly the expected rows."""
from __future__ import annotations

import hashlib
import json
import os
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_pipeline.build import BuildFailed, BuildOptions, load_plan, read_records, task_states
from data_pipeline.cli import main as data_cli
from data_pipeline.dataset_format import SAMPLES, read_sample_index, read_samples, read_stats
from data_pipeline.filters import check_stage_filter, parse_filter, stage_mask
from data_pipeline.ingest import IngestConfig, finished_shards, ingest
from data_pipeline.serve import serve_folder
from data_pipeline.shard import ShardConfig, build_shards
from data_pipeline.synthetic import make_synthetic_dataset
from pixeldit.cluster import LaunchConfig
from pixeldit.errors import DataError
from pixeldit.train.config import RunConfig, StageConfig
from pixeldit.train.sources import open_sources

pytestmark = pytest.mark.slow
META = ("aesthetic", "punsafe", "LICENSE:license")
# 5 ingest shards of 8 rows: img2dataset's pool worker (respawned after 5 shards) starts once per call
INGEST = IngestConfig(label_col="label", meta_cols=META, threads=4, timeout=3, samples_per_shard=8)
SHARD = ShardConfig(min_side=16, samples_per_shard=3, progress=False)
FILTER = "aesthetic >= 5 and punsafe < 0.5"


def scores(name: str) -> tuple[float, float, str | None]:
    """Metadata of an image file: the zoo's duplicate-content copy gets the scores of the image it copies."""
    h = int(hashlib.md5(name.removeprefix("zoo_dup_").encode()).hexdigest(), 16)
    return 3 + (h % 60) / 10, (h // 60 % 10) / 10, ("cc0", "cc-by", "nc", None)[h // 600 % 4]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A synthetic set with the bad-input zoo and LAION-like score columns, ingested once (one task) and
    sharded once (one task): the reference every other build is compared with."""
    tmp = tmp_path_factory.mktemp("build")
    ds = make_synthetic_dataset(str(tmp / "synth"), num_images=20, seed=4, bad_inputs=True)
    meta = [scores(it.name) for it in ds.items]
    columns = {"aesthetic": [m[0] for m in meta], "punsafe": [m[1] for m in meta], "LICENSE": [m[2] for m in meta]}
    with serve_folder(ds.images_dir) as base:
        urls = ds.write_url_list(base, str(tmp / "urls.parquet"), columns=columns)
        ingest(urls, str(tmp / "ingest"), INGEST)
        ingest2 = ingest(urls, str(tmp / "ingest2"), INGEST, BuildOptions(tasks=2))
    reference = build_shards(str(tmp / "ingest"), str(tmp / "reference"), SHARD)
    return {"tmp": tmp, "ingest": str(tmp / "ingest"), "ingest2": str(tmp / "ingest2"), "summary2": ingest2,
            "ref": str(tmp / "reference"), "ref_summary": reference}


def sample_view(root: str) -> dict[str, tuple]:
    """key -> everything a sample is (bucket, caption, size, label, url, hash, metadata, image bytes), read back
    through samples.parquet's byte offsets."""
    out = {}
    for r in read_samples(root).to_pylist():
        with open(os.path.join(root, r["shard"]), "rb") as f:
            f.seek(r["image_offset"])
            image = f.read(r["image_size"])
        out[r["key"]] = (r["ratio_key"], r["caption"], r["width"], r["height"], r["label"], r["url"], r["sha256"],
                         r["aesthetic"], r["punsafe"], r["license"], image)
    return out


def counts(root: str) -> dict:
    stats = read_stats(root)
    return {k: stats[k] for k in ("total", "ok", "skipped", "normalised", "buckets", "pending", "ingest")}


def test_ingest_in_two_tasks_gives_the_shards_of_one_and_a_killed_run_is_salvaged(data):
    one, two = data["ingest"], data["ingest2"]
    assert data["summary2"].tasks == 2 and sorted(finished_shards(one)) == sorted(finished_shards(two))

    def rows(root: str, name: str) -> list:
        t = pq.read_table(os.path.join(root, f"{name}.parquet"))
        cols = ["key", "url", "caption", "status", "sha256", "aesthetic", "punsafe", "license"]
        return sorted(zip(*(t.column(c).to_pylist() for c in cols)))

    for name in finished_shards(one).values():  # same keys (they hold the shard id), rows, scores, hashes
        assert rows(one, name) == rows(two, name)
    # a task killed after img2dataset finished shard 00004 in its scratch folder, before moving it: the rerun
    # moves it instead of downloading it again
    work = os.path.join(two, "_work", "00004")
    os.makedirs(work)
    for suffix in (".tar", ".parquet", "_stats.json"):
        shutil.move(os.path.join(two, "00004" + suffix), os.path.join(work, "00004" + suffix))
    plan = load_plan(two)
    plan.state = "running"
    plan.save()
    task = next(s["task"] for s in plan.slices if s["start"] <= 4 < s["stop"])
    os.remove(os.path.join(two, "_build", "tasks", f"{task:05d}.json"))
    again = ingest(data["tmp"] / "urls.parquet", two, INGEST, BuildOptions(tasks=2))
    assert again.shards_done == 1 and not os.path.exists(os.path.join(two, "_work"))
    size = plan.slices[task]["stop"] - plan.slices[task]["start"]
    assert read_records(load_plan(two))[task]["result"] == {"shards": size, "downloaded": 0, "salvaged": 1}
    assert rows(one, "00004") == rows(two, "00004")


def test_three_tasks_give_exactly_the_samples_of_one_with_cross_task_duplicates(data, tmp_path):
    out = str(tmp_path / "three")
    summary = build_shards(data["ingest"], out, SHARD, BuildOptions(tasks=3))
    assert summary.tasks == 3 and summary.samples_written == data["ref_summary"].samples_written
    assert sample_view(out) == sample_view(data["ref"])
    assert counts(out) == counts(data["ref"])
    index = read_sample_index(out)
    assert len(set(index.keys.to_pylist())) == len(index)  # no duplicates
    # the zoo's repeated content sits in the last task's slice, its first copy in the first's: the plan found it
    plan = load_plan(out)
    dups = pq.read_table(os.path.join(out, "_build", "duplicates.parquet")).to_pylist()
    assert [d["reason"] for d in dups] == ["duplicate_hash"]
    assert dups[0]["source"] in {f"{r}/{n}" for r, n in plan.data["todo"][plan.slices[-1]["start"]:]}
    assert not os.path.exists(os.path.join(out, "_build", "parts"))  # moved into shards/ by the commit
    # both ingest folders hold the same URLs: the tasks of the second half drop every row of the second folder
    both = str(tmp_path / "both")
    build_shards([data["ingest"], data["ingest2"]], both, SHARD, BuildOptions(tasks=3))
    assert sample_view(both) == sample_view(data["ref"])
    dups = pq.read_table(os.path.join(both, "_build", "duplicates.parquet")).to_pylist()
    assert {d["source"].rsplit("/", 1)[0] for d in dups if d["reason"] == "duplicate_url"} == {data["ingest2"]}
    before_download = read_stats(data["ref"])["skipped"]["duplicate_url"]  # the zoo's repeat, dropped by ingest
    assert read_stats(both)["skipped"]["duplicate_url"] == 2 * before_download + sum(
        d["reason"] == "duplicate_url" for d in dups)


def test_metadata_filters_select_exactly_the_expected_rows_at_shard_and_stage_time(data, tmp_path):
    reference = read_samples(data["ref"]).to_pylist()
    f = parse_filter(FILTER)
    want = {r["key"] for r in reference if r["aesthetic"] >= 5 and r["punsafe"] < 0.5}
    assert 0 < len(want) < len(reference)
    # stage time: the same shards, a row selection in read_sample_index order
    mask = stage_mask(data["ref"], FILTER)
    keys = read_sample_index(data["ref"]).keys.to_pylist()
    assert {k for k, m in zip(keys, mask) if m} == want and len(mask) == len(keys)
    assert {k for k, m in zip(keys, stage_mask(data["ref"], "license in ('cc0', 'nc') or license is null")) if m} \
        == {r["key"] for r in reference if r["license"] in ("cc0", "nc", None)}
    # the training loader's plan selects exactly those rows (stages.N.filter): the same shards
    stage = StageConfig(name="s1024", data_path=data["ref"], filter=FILTER, resolution=512, bucket_align=32)
    sources, selection, notes = open_sources(RunConfig(stages=[stage]), 0)
    assert {sources.key(int(r)) for r in np.flatnonzero(selection)} == want
    assert any(f"leaving out {len(keys) - len(want)} of {len(keys)} samples: stages.0 (s1024).filter" in n
               for n in notes), notes
    with pytest.raises(DataError, match=r"reference/samples.parquet changed while .* \(\d+ rows in the index"):
        stage_mask(data["ref"], FILTER, keys=pa.array(keys[1:] + keys[:1]))  # rows no longer line up
    # shard time: only those rows are sharded (3 tasks), the others counted as "filtered"
    out = str(tmp_path / "filtered")
    summary = build_shards(data["ingest"], out, ShardConfig(**{**SHARD.__dict__, "filter": FILTER}),
                           BuildOptions(tasks=3))
    kept = sample_view(out)
    assert set(kept) == want and all(kept[k] == v for k, v in sample_view(data["ref"]).items() if k in want)
    ingested = pq.read_table([os.path.join(data["ingest"], f"{n}.parquet")
                              for n in finished_shards(data["ingest"]).values()])
    screened = np.array([st == "success" and bool((c or "").strip())
                         for st, c in zip(ingested.column("status").to_pylist(),
                                          ingested.column("caption").to_pylist())])
    assert summary.stats["skipped"]["filtered"] == int((screened & ~f.mask(ingested)).sum())
    assert summary.stats["ok"] == len(want) and summary.stats["pending"] == 0
    assert summary.stats["total"] == read_stats(data["ref"])["total"]
    assert np.array_equal(f.mask(read_samples(out)), np.ones(len(want), dtype=bool))


def test_a_filter_on_a_missing_column_names_it_and_the_columns_that_exist(data, tmp_path, capsys):
    with pytest.raises(ValueError, match=r"stages.2 \(s1024\).filter: filter 'aesthetics >= 6': no column 'aesthetics' "
                                         r"in .*/reference/samples.parquet; its columns: key, shard, .*, sha256, split, "
                                         r"aesthetic, punsafe, license"):
        check_stage_filter(data["ref"], "aesthetics >= 6", "stages.2 (s1024).filter")
    rc = data_cli(["shard", data["ingest"], "--out", str(tmp_path / "x"), "--filter", "pwatermark < 0.5",
                   "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1
    assert err[0] == ("pixeldit-data: error: filter 'pwatermark < 0.5': no column 'pwatermark' in the metadata columns "
                      "of the ingest folders (ingest --meta-cols); its columns: aesthetic, punsafe, license")
    assert not os.path.exists(tmp_path / "x" / SAMPLES)


def test_a_failed_task_is_named_by_status_and_reruns_alone(data, tmp_path, capsys):
    out = str(tmp_path / "rerun")
    tar = os.path.join(data["ingest"], "00002.tar")
    os.rename(tar, tar + ".away")  # task 1's second ingest shard is lost from storage: the task fails mid-way
    try:
        with pytest.raises(BuildFailed) as failed:
            build_shards(data["ingest"], out, SHARD, BuildOptions(tasks=3))
    finally:
        os.rename(tar + ".away", tar)
    assert ("1 of 3 tasks not done: task 1 (2 ingest shards ingest/00001-00002): failed: FileNotFoundError"
            in str(failed.value))
    assert data_cli(["status", out]) == 0
    status = capsys.readouterr().out
    assert "shard build" in status and "2 done, 1 failed" in status
    assert "task 1: 2 ingest shards ingest/00001-00002: failed on " in status and "00002.tar" in status
    assert not os.path.exists(os.path.join(out, SAMPLES))  # nothing committed
    plan = load_plan(out)
    before = {t: (r["time"], r["pid"]) for t, r in read_records(plan).items() if r["status"] == "done"}
    assert sorted(before) == [0, 2]
    build_shards(data["ingest"], out, SHARD, BuildOptions(tasks=3))  # the same command again
    records = read_records(plan)
    assert all((records[t]["time"], records[t]["pid"]) == before[t] for t in (0, 2))  # not rerun
    assert [s.state for s in task_states(plan)] == ["done"] * 3
    assert sample_view(out) == sample_view(data["ref"]) and counts(out) == counts(data["ref"])


def test_local_executor_array_gives_the_same_samples(data, tmp_path):
    out = str(tmp_path / "local")
    launch = LaunchConfig(cluster="local", env={"OMP_NUM_THREADS": "1"})
    summary = build_shards(data["ingest"], out, SHARD, BuildOptions(tasks=2, launch=launch, poll_s=0.5))
    assert summary.tasks == 2 and sample_view(out) == sample_view(data["ref"])
    plan = load_plan(out)
    jobs = [json.loads(line) for line in open(os.path.join(out, "_build", "jobs.jsonl"))]
    assert len(jobs) == 1 and jobs[0]["cluster"] == "local" and sorted(jobs[0]["jobs"]) == ["0", "1"]
    assert {r["pid"] for r in read_records(plan).values()}.isdisjoint({os.getpid()})  # ran in other processes
