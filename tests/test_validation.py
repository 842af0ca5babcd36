"""The held-out split and the validation loss.

- the split is carved by key hash (order-independent, about the fraction asked, topped up per bucket, an
  incremental run never moves a committed row), stored in samples.parquet and read back; a version-1 root
  (no split column) reads as all training data;
- the training loader never plans a held-out row;
- the validation loss (pixeldit.train.validation) is the same on 1 rank and on 2 gloo ranks;
- in the trainer (single rank, in process): logged into metrics.jsonl every N steps, and the same after a
  stop and resume as without; ``pixeldit-release --best`` picks the step of the best recorded metric;
- a 2-rank torchrun run SIGKILLed (every process) after the validation of a step between two checkpoints,
  then resumed, re-runs those steps and writes every validation record (val_loss, per bucket, per timestep)
  bit for bit equal to the uninterrupted run's.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from data_pipeline import dataset_format as fmt
from data_pipeline.holdout import assign_splits, key_uniform, split_counts
from pixeldit.models import build_model, get_model_args
from pixeldit.run_folder import read_metrics
from pixeldit.train.config import RunConfig, StageConfig
from pixeldit.train.validation import build_validation_set, sample_noise, validation_loss, validation_times
from train_helpers import ROOT, free_port, kill_tree, torchrun, write_tiny_dataset


def _rows(n: int, offset: int = 0) -> pa.Table:
    return fmt.rows_to_table([fmt.SampleRow(
        key=f"k{i:07d}", shard="s", ratio_key=("1.00", "0.50")[i % 2], sample_index=i, image_offset=0, image_size=0,
        image_ext="jpg", caption="", width=1, height=1, label=-1, url="", sha256=None) for i in range(offset, offset + n)],
        fmt.SampleRow)


def test_split_is_a_hash_of_the_key_topped_up_per_bucket_and_never_moved():
    big = assign_splits(_rows(20000), 0.01)
    held = fmt.heldout_mask(big)
    assert 150 < held.sum() < 250  # about 1 %
    assert np.array_equal(held, key_uniform(big["key"].to_pylist()) < 0.01)
    shuffled = assign_splits(_rows(20000).take(np.random.default_rng(0).permutation(20000)), 0.01)
    assert set(shuffled.filter(pa.array(fmt.heldout_mask(shuffled)))["key"].to_pylist()) == \
        set(big.filter(pa.array(held))["key"].to_pylist())
    small = assign_splits(_rows(10), 0.0, min_per_bucket=2)
    assert split_counts(small) == {"heldout": 4, "train": 6}
    held_small = small.filter(pa.array(fmt.heldout_mask(small)))
    assert sorted(held_small["ratio_key"].to_pylist()) == ["0.50", "0.50", "1.00", "1.00"]
    assert split_counts(assign_splits(_rows(3), 0.0, min_per_bucket=5)) == {"heldout": 1, "train": 2}  # <= half
    grown = assign_splits(pa.concat_tables([small, fmt.with_split_column(_rows(10, offset=10))]), 0.0, 3)
    assert grown["split"].to_pylist()[:10] == small["split"].to_pylist()  # committed rows keep their split
    assert split_counts(grown)["heldout"] == 6
    with pytest.raises(ValueError, match="holdout_fraction=1.5 must be in"):
        assign_splits(_rows(2), 1.5)


@pytest.mark.slow
def test_pixeldit_data_shard_carves_the_split(tmp_path, capsys):
    from data_pipeline.cli import main as data_main
    from data_pipeline.ingest import IngestConfig, ingest
    from data_pipeline.serve import serve_folder
    from data_pipeline.synthetic import make_synthetic_dataset

    ds = make_synthetic_dataset(str(tmp_path / "synth"), num_images=10, seed=5)
    with serve_folder(ds.images_dir) as base_url:
        ingest(ds.write_url_list(base_url, str(tmp_path / "u.csv"), fmt="csv"), str(tmp_path / "ing"),
               IngestConfig(label_col="label", threads=4, timeout=3, samples_per_shard=16))
    out = tmp_path / "out"
    assert data_main(["shard", str(tmp_path / "ing"), "--out", str(out), "--no-progress", "--holdout-fraction", "0.5",
                      "--holdout-min-per-bucket", "1", "--min-side", "0"]) == 0  # the synthetic images are small
    samples = fmt.read_samples(str(out))
    by_hash = key_uniform(samples["key"].to_pylist()) < 0.5
    per_bucket: dict[str, list[bool]] = {}
    for ratio, held in zip(samples["ratio_key"].to_pylist(), fmt.heldout_mask(samples)):
        per_bucket.setdefault(ratio, []).append(bool(held))
    assert np.all(fmt.heldout_mask(samples) >= by_hash)  # the hash rule, then the top-up
    assert all(sum(h) >= min(1, len(h) // 2) for h in per_bucket.values())
    stats = json.loads((out / fmt.STATS).read_text())["splits"]
    assert stats == split_counts(samples) and stats["heldout"] >= 1 and sum(stats.values()) == 10
    assert fmt.format_version(pq.read_schema(str(out / fmt.MANIFEST)), str(out)) == fmt.FORMAT_VERSION == 2
    assert data_main(["shard", str(tmp_path / "ing"), "--out", str(out), "--holdout-fraction", "1.5"]) == 2
    assert "holdout_fraction=1.5 must be in [0, 1)" in capsys.readouterr().err


def _with_holdout(root: Path, per_bucket: int) -> Path:
    samples = fmt.read_samples(str(root))
    fmt.write_samples(str(root), assign_splits(samples, 0.0, per_bucket))
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = write_tiny_dataset(tmp_path_factory.mktemp("data"), {"1.00": 12, "0.50": 8}, per_shard=4)
    return _with_holdout(root, 3)


def test_samples_parquet_keeps_the_split_and_old_roots_read_as_training_data(data, tmp_path):
    index = fmt.read_sample_index(str(data))
    assert index.heldout.sum() == 6
    assert pq.read_schema(str(data / fmt.SAMPLES)).field("split").type == pa.string()
    old = write_tiny_dataset(tmp_path / "old", {"1.00": 4})
    table = pq.read_table(str(old / fmt.SAMPLES)).drop_columns(["split"])  # as written by format version 1
    pq.write_table(table, str(old / fmt.SAMPLES))
    assert not fmt.read_sample_index(str(old)).heldout.any()
    bad = pq.read_table(str(old / fmt.SAMPLES)).append_column("split", pa.array(["test"] * 4))
    pq.write_table(bad, str(old / fmt.SAMPLES))
    with pytest.raises(ValueError, match="split value 'test'; valid values: train, heldout"):
        fmt.read_sample_index(str(old))


def _cfg(run_dir: Path, data: Path, steps: int = 4, buckets: str = "aspect", every: int = 2) -> RunConfig:
    stage = StageConfig(name="s", steps=steps, data_path=str(data), resolution=32, bucket_align=16, micro_batch=2,
                        lr=1e-3, buckets=buckets)
    cfg = RunConfig(run_dir=str(run_dir), seed=5, stages=[stage])
    cfg.deepspeed.precision = "fp32"
    cfg.data.num_workers = 0
    cfg.logging.wandb, cfg.logging.progress_bar = "disabled", False
    cfg.checkpoint.every, cfg.checkpoint.keep = every, 5
    cfg.validation.every, cfg.validation.batch_size = every, 16
    return cfg


def test_loader_never_plans_a_held_out_row(data, tmp_path):
    from pixeldit.train.loader import build_loader

    held = set(np.flatnonzero(fmt.read_sample_index(str(data)).heldout).tolist())
    for buckets in ("fixed", "aspect"):
        loader = build_loader(_cfg(tmp_path, data, buckets=buckets), 0, 0, 1)
        planned = {int(r) for r in loader.plan.selected_rows}
        assert planned and not planned & held and len(planned) == 20 - 6
    cfg = _cfg(tmp_path, data)
    cfg.validation.max_per_bucket = 2
    vset = build_validation_set(cfg, 0)
    assert vset.num_samples == 4 and {r for s in vset.batches["1.00"] for r in s.rows} <= held
    cfg.validation.every = 0
    assert build_validation_set(cfg, 0) is None


def test_noise_depends_on_the_seed_and_key_only():
    assert validation_times() == [(i + 0.5) / 8 for i in range(8)]
    a = sample_noise(1, "k1", (3, 4, 4))
    assert a.shape == (8, 3, 4, 4) and torch.equal(a, sample_noise(1, "k1", (3, 4, 4)))
    assert not torch.equal(a, sample_noise(1, "k2", (3, 4, 4))) and not torch.equal(a, sample_noise(2, "k1", (3, 4, 4)))


def _model():
    torch.manual_seed(0)
    return build_model(get_model_args("debug")).eval()


def _class_conditioner(batch):
    return {"y": batch["label"]}, {}


def _value(data: Path, rank: int = 0, world: int = 1) -> dict:
    cfg = _cfg(Path("unused"), data)
    cfg.validation.batch_size = 8  # one sample per batch: 3 per bucket, so rank 1 of 2 runs a padding batch
    vset = build_validation_set(cfg, 0)
    model = _model()
    return validation_loss(lambda x, t, c: model(x, t, **c), vset, _class_conditioner, 5, rank, world,
                           torch.device("cpu"))


WORKER = """
import json, sys, torch, torch.distributed as dist
sys.path.insert(0, {tests!r})
from pathlib import Path
import test_validation as tv
rank = int(sys.argv[1])
dist.init_process_group("gloo", init_method="tcp://127.0.0.1:{port}", rank=rank, world_size=2)
value = tv._value(Path({data!r}), rank, 2)
if rank == 0:
    Path({out!r}).write_text(json.dumps(value))
dist.destroy_process_group()
"""


def test_validation_loss_is_the_same_on_one_and_two_ranks(data, tmp_path):
    one = _value(data)
    assert one["val_samples"] == 6 and set(one["val_loss_bucket"]) == {"1.00", "0.50"}
    assert one["val_loss"] == pytest.approx(np.mean(one["val_loss_t"]), rel=1e-12)
    out = tmp_path / "two.json"
    script = WORKER.format(tests=str(ROOT / "tests"), port=free_port(), data=str(data), out=str(out))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]))
    procs = [subprocess.Popen([sys.executable, "-c", script, str(r)], env=env, cwd=ROOT) for r in range(2)]
    assert [p.wait(timeout=180) for p in procs] == [0, 0]
    two = json.loads(out.read_text())
    assert two["val_samples"] == one["val_samples"]
    assert two["val_loss"] == pytest.approx(one["val_loss"], rel=1e-12, abs=0)
    for bucket, value in one["val_loss_bucket"].items():
        assert two["val_loss_bucket"][bucket] == pytest.approx(value, rel=1e-12, abs=0)


def _val_records(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["val_loss"] for r in read_metrics(run_dir) if r["kind"] == "val"}


def test_trainer_logs_validation_resume_gives_the_same_values_and_release_best(single_rank, data, tmp_path,
                                                                                capsys):
    from pixeldit.release.cli import main as release_main
    from pixeldit.run_folder import append_metrics
    from pixeldit.train.trainer import run_training

    run = tmp_path / "a"
    run_training(_cfg(run, data, steps=2, every=1))
    straight = _val_records(run)
    assert sorted(straight) == [1, 2] and all(np.isfinite(v) for v in straight.values())
    assert straight[1] != straight[2]  # the weights changed between the two
    calls = []

    def stop_before_step_2() -> bool:
        calls.append(1)
        return len(calls) == 2

    assert run_training(_cfg(tmp_path / "b", data, steps=2, every=1), stop_requested=stop_before_step_2).status \
        == "stopped"
    assert run_training(_cfg(tmp_path / "b", data, steps=2, every=1)).status == "finished"
    assert _val_records(tmp_path / "b") == pytest.approx(straight, rel=1e-12, abs=0)

    # pixeldit-release --best: val_loss from the trainer, then eval records as eval jobs append them
    assert release_main([str(run), str(tmp_path / "r1"), "--best", "val_loss"]) == 0
    best = min(straight, key=straight.get)
    assert json.loads((tmp_path / "r1" / "config.json").read_text())["step"] == best
    assert f"best val_loss: {straight[best]:.6g} at step {best}" in capsys.readouterr().out
    assert release_main([str(run), str(tmp_path / "r2"), "--best", "fid"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--best fid:" in err and "records val_loss at steps 1, 2" in err
    assert "valid metrics: val_loss, fid, fd_dinov2, clip_score" in err
    append_metrics(run, {"step": 1, "kind": "eval", "fid": 5.0, "clip_score": 0.1})
    append_metrics(run, {"step": 2, "kind": "eval", "fid": 7.0, "clip_score": 0.3})
    assert release_main([str(run), str(tmp_path / "r3"), "--best", "clip_score"]) == 0  # higher is better
    assert json.loads((tmp_path / "r3" / "config.json").read_text())["step"] == 2
    shutil.rmtree(run / "checkpoints" / "step_00000001")  # pruned: the best FID's folder is gone
    assert release_main([str(run), str(tmp_path / "r4"), "--best", "fid"]) == 0
    out = capsys.readouterr().out
    assert "best fid: 7 at step 2" in out and "better fid at steps 1 (best 5) but their checkpoints were pruned" in out


KILL_STEPS, KILL_EVERY, KILL_AFTER_VAL = 8, 4, 5  # checkpoints 4 and 8; killed once step 5's validation is logged


def _torchrun_config(tmp: Path, data: Path) -> Path:
    stage = {"name": "s", "steps": KILL_STEPS, "data_path": str(data), "resolution": 32, "bucket_align": 16,
             "micro_batch": 2, "lr": 1e-3, "buckets": "aspect"}
    cfg = {"run_dir": str(tmp / "run"), "seed": 5, "model": {"size": "debug"},
           "deepspeed": {"zero": "zero2", "precision": "fp32"}, "data": {"num_workers": 0},
           "logging": {"wandb": "disabled", "progress_bar": False},
           "checkpoint": {"every": KILL_EVERY, "keep": 2}, "validation": {"every": 1, "batch_size": 16},
           "stages": [stage]}
    path = tmp / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _launch(config: Path, log: Path) -> subprocess.Popen:
    cmd, env = torchrun(config)
    return subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=open(log, "a"), stderr=subprocess.STDOUT)


def _run_to_end(config: Path, log: Path) -> None:
    proc = _launch(config, log)
    assert proc.wait(timeout=900) == 0, f"training failed (rc {proc.returncode}):\n{log.read_text()[-3000:]}"


def _val_by_step(run_dir: Path) -> dict[int, list[dict]]:
    """Every val record of each step, in file order (a re-run step has several)."""
    out: dict[int, list[dict]] = {}
    for r in read_metrics(run_dir):
        if r["kind"] == "val":
            out.setdefault(r["step"], []).append(r)
    return out


@pytest.mark.slow
def test_validation_is_bit_identical_after_a_sigkill_and_resume(data, tmp_path):
    from pixeldit.run_folder import resolve_checkpoint, step_of

    (tmp_path / "ref").mkdir()
    _run_to_end(_torchrun_config(tmp_path / "ref", data), tmp_path / "ref.log")
    reference = _val_by_step(tmp_path / "ref" / "run")
    assert sorted(reference) == list(range(1, KILL_STEPS + 1)) and all(len(v) == 1 for v in reference.values())

    (tmp_path / "killed").mkdir()
    config, log, run = _torchrun_config(tmp_path / "killed", data), tmp_path / "killed.log", tmp_path / "killed" / "run"
    proc = _launch(config, log)
    deadline = time.time() + 900  # start-up alone can take minutes on a loaded machine
    while KILL_AFTER_VAL not in _val_by_step(run):
        assert proc.poll() is None, f"run ended before step {KILL_AFTER_VAL}'s validation:\n{log.read_text()[-3000:]}"
        assert time.time() < deadline, "run too slow to reach the kill step"
        time.sleep(0.005)
    kill_tree(proc)  # steps 6-8 and checkpoint 8 take seconds: the kill lands before checkpoint 8
    assert step_of(resolve_checkpoint(run)) == KILL_EVERY, "the kill came after the next checkpoint: nothing re-runs"
    _run_to_end(config, log)

    got = _val_by_step(run)
    assert sorted(got) == sorted(reference)
    assert len(got[KILL_AFTER_VAL]) == 2, "step 5's validation ran before the kill and again after the resume"
    for step, records in got.items():
        for record in records:  # every key: val_loss, val_loss_bucket, val_loss_t, val_samples, stage
            assert record == reference[step][0], f"step {step}: {record} != {reference[step][0]}"
