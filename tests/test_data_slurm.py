"""A data build as SLURM job arrays on a real two-node SLURM (../shared/slurm/start_slurm.sh with NODES=2): a
3-task ingest and a 3-task shard, each array running at once over both nodes, give exactly the samples the
synthetic set says they must (every good image, every bad input skipped for its reason) and exactly those of
the one-process shard build of the same ingest folder; a task killed mid-way (scancel) is named by `status`
and reruns alone, with no duplicate and nothing lost. Skipped, with the reason, when no controller with two
usable nodes answers. (That K tasks give the shards of one process is shown without SLURM in test_data_build.)"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import time
from collections import Counter

import pytest

from data_pipeline.build import BuildOptions, load_plan, part_dir, read_records, read_submissions, task_slices, \
    task_states
from data_pipeline.cli import main as data_cli
from data_pipeline.ingest import IngestConfig, finished_shards, ingest
from data_pipeline.serve import serve_folder
from data_pipeline.shard import ShardConfig, build_shards
from data_pipeline.synthetic import make_synthetic_dataset
from pixeldit.cluster import LaunchConfig, run_slurm_command
from test_data_build import META, counts, sample_view, scores


def two_nodes() -> tuple[int, str | None]:
    """(CPUs of the smallest usable node, None), or (0, why the test cannot run)."""
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        return 0, "SLURM not installed: start ../shared/slurm/start_slurm.sh with NODES=2"
    lines = run_slurm_command(["sinfo", "-h", "-N", "-o", "%N %c %T"]).splitlines()
    usable = {n: int(c) for n, c, s in (ln.split() for ln in lines) if s in ("idle", "mixed", "allocated")}
    if len(usable) < 2:
        return 0, (f"needs a SLURM with two usable nodes (found: {', '.join(lines) or 'no controller'}); start "
                   f"../shared/slurm/start_slurm.sh with NODES=2")
    return min(usable.values()), None


NODE_CPUS, REASON = two_nodes()
pytestmark = [pytest.mark.slow, pytest.mark.slurm, pytest.mark.skipif(REASON is not None, reason=str(REASON))]
# half a node per task: the 3 tasks of an array run at once, so they cannot all sit on one node
LAUNCH = LaunchConfig(cluster="slurm", cpus_per_task=max(1, NODE_CPUS // 2), time_min=10, job_name="data-test",
                      env={"OMP_NUM_THREADS": "1", "NO_ALBUMENTATIONS_UPDATE": "1"})
INGEST = IngestConfig(label_col="label", meta_cols=META, threads=4, timeout=3, samples_per_shard=5)
SHARD = ShardConfig(min_side=16, samples_per_shard=1, progress=False)  # one sample per shard: a task commits as it goes


def _wait(what: str, check, timeout_s: float = 180.0) -> None:
    end = time.time() + timeout_s
    while not check():
        if time.time() > end:
            raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(1.0)


def test_slurm_array_build_matches_one_process_and_a_killed_task_reruns_alone(tmp_path, capsys):
    ds = make_synthetic_dataset(str(tmp_path / "synth"), num_images=8, seed=11, bad_inputs=True)
    meta = [scores(it.name) for it in ds.items]
    columns = {"aesthetic": [m[0] for m in meta], "punsafe": [m[1] for m in meta], "LICENSE": [m[2] for m in meta]}
    many = str(tmp_path / "ingest-3")
    with serve_folder(ds.images_dir) as base:  # loopback: the two nodes are processes of this machine
        urls = ds.write_url_list(base, str(tmp_path / "urls.parquet"), columns=columns)
        summary = ingest(urls, many, INGEST, BuildOptions(tasks=3, launch=LAUNCH, poll_s=1.0))
    assert summary.tasks == 3 and summary.shards_done == len(finished_shards(many)) == 5  # 25 rows (a URL twice)
    hosts = {r["host"] for r in read_records(load_plan(many)).values()}
    assert hosts == {"n1", "n2"}, hosts  # the array spread over both nodes

    # the one-process shard build of that ingest folder holds what the synthetic set says it must
    reference = str(tmp_path / "reference")
    stats = build_shards(many, reference, SHARD).stats
    ok = [it for it in ds.items if it.expect.startswith("ok")]
    assert stats["ok"] == len(ok) and stats["pending"] == 0 and stats["total"] == len(ds.items)
    assert stats["skipped"] == dict(Counter(it.expect.split(":")[1] for it in ds.items if it.expect.startswith("skip")))
    view = sample_view(reference)
    assert sorted(os.path.basename(v[5]) for v in view.values()) == sorted(it.name for it in ok)
    assert {os.path.basename(v[5]): v[7:10] for v in view.values()} == {it.name: scores(it.name) for it in ok}

    # task 1 of the shard array blocks on its second ingest shard (a FIFO stands in for its tar) after
    # committing the shards of its first one; it is then cancelled mid-way
    todo = sorted(finished_shards(many).values())
    first, stop = task_slices(len(todo), 3)[1]
    assert stop - first >= 2
    tar = os.path.join(many, f"{todo[first + 1]}.tar")
    os.rename(tar, tar + ".away")
    os.mkfifo(tar)
    out = str(tmp_path / "data")
    options = BuildOptions(tasks=3, launch=LAUNCH, poll_s=1.0)
    try:
        assert not build_shards(many, out, SHARD, dataclasses.replace(options, wait=False)).waited
        plan = load_plan(out)
        part = part_dir(out, 1)

        def task1_blocked_midway() -> bool:
            committed = [f for _, _, fs in os.walk(part) for f in fs if f.endswith(".tar") and not f.startswith(".")]
            return read_records(plan).get(1, {}).get("status") == "running" and len(committed) >= 2

        _wait("task 1 to commit part shards and block", task1_blocked_midway)
        job = read_submissions(plan)[0]["jobs"]["1"]
        subprocess.run(["scancel", job], check=True, timeout=30)
        _wait("every task to end", lambda: not any(s.state in ("running", "pending") for s in task_states(plan)))
    finally:
        os.remove(tar)
        os.rename(tar + ".away", tar)
    states = task_states(plan)
    assert [s.state for s in states] == ["done", "failed", "done"]
    assert "CANCELLED" in states[1].why and states[1].host in ("n1", "n2")
    assert data_cli(["status", out]) == 0
    status = capsys.readouterr().out
    assert f"task 1: {plan.slices[1]['what']}: failed on n" in status and "CANCELLED" in status

    build_shards(many, out, SHARD, options)  # the same command again: only task 1 is submitted
    subs = read_submissions(plan)
    assert len(subs) == 2 and list(subs[1]["jobs"]) == ["1"]
    assert [s.state for s in task_states(plan)] == ["done"] * 3
    got, want = sample_view(out), sample_view(reference)
    assert got == want  # keys, image bytes, buckets, captions, metadata: no duplicate, nothing lost
    assert counts(out) == counts(reference)
    jobs = [json.loads(line) for line in open(os.path.join(out, "_build", "jobs.jsonl"))]
    assert all(j["cluster"] == "slurm" for j in jobs)
