"""Loss spikes (pixeldit.train.spikes): the robust z-score detector, the skip walk, the config section; and the
real trainer on 2 CPU ranks (torchrun, gloo, debug model, 32 px) with a spike injected at step 6
(``PIXELDIT_TEST_SPIKE``):
- the run rolls back to checkpoint 4, skips the spiked global batch and finishes; the spike file lists that
  batch's keys (as the ranks recorded them); the per-step losses and final weights equal those of a run that
  was given the skip list before it started (it never saw that window); the ledger lists what that run drew and
  none of the skipped keys;
- a run SIGKILLed as the spiked step is logged, or after the rollback, and resumed (the skip list then comes
  from the run folder only) repeats the same decision: identical per-step losses and final weights;
- the same as a true 2-node SLURM job (one task per node; skipped when SLURM is not running);
- in process (1 rank): past ``spike.max_rollbacks`` the run stops naming the step and the last good checkpoint
  (the spiked step has a checkpoint due: it is judged before that save, which never happens);
  a spike before any checkpoint is recorded and training continues.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import torch
import yaml

from pixeldit.errors import ConfigError
from pixeldit.train.config import RunConfig, StageConfig, validate
from pixeldit.train.spikes import (SKIPS_FILE, TEST_SPIKE_ENV, SpikeDetector, SpikeLimitError, parse_injection,
                                   read_skips, robust_zscore, skip_forward, spikes_dir)
from launch_helpers import TASK_ENV, finished, needs_slurm
from test_train_distributed import final_state, launch, records, run_to_end
from train_helpers import kill_tree, write_tiny_dataset

STEPS, EVERY, SPIKE_STEP = 10, 4, 6
INJECT = f"step={SPIKE_STEP},scale=50"


# ---- units --------------------------------------------------------------------------------------------------


def test_robust_zscore_ignores_one_outlier_in_the_history():
    history = [1.0, 1.1, 0.9, 1.05, 0.95, 1.02, 0.98, 40.0]  # one earlier spike
    assert abs(robust_zscore(1.1, history)) < 3
    assert robust_zscore(3.0, history) > 20
    mean, std = torch.tensor(history).mean().item(), torch.tensor(history).std().item()
    assert (3.0 - mean) / std < 1  # what a mean/std score would say: no spike


def test_robust_zscore_flat_history_has_a_minimum_spread():
    assert robust_zscore(1.01, [1.0] * 10) == pytest.approx(0.2)  # 1% over the median, spread 5% of it
    assert robust_zscore(2.0, [1.0] * 10) == pytest.approx(20.0)


def test_detector_is_per_bucket_and_needs_min_history():
    d = SpikeDetector(window=4, min_history=3)
    for loss in (1.0, 1.1):
        d.add("0/a", loss, 2.0)
    assert d.score("0/a", 50.0, 2.0) == (None, None)  # 2 < min_history
    d.add("0/a", 0.9, 2.0)
    for loss in (10.0, 11.0, 9.0):
        d.add("0/b", loss, None)  # no gradient norm known: only the loss is judged
    z_loss, z_grad = d.score("0/a", 10.0, 40.0)
    assert z_loss > 20 and z_grad > 20
    z_loss, z_grad = d.score("0/b", 10.0, 40.0)
    assert abs(z_loss) < 1 and z_grad is None
    for loss in (5.0, 5.0, 5.0, 5.0):  # the window keeps the last 4
        d.add("0/a", loss, 2.0)
    assert d.steps("0/a") == 4 and abs(d.score("0/a", 5.0, 2.0)[0]) < 1e-9
    restored = SpikeDetector(window=4, min_history=3)
    restored.load_state_dict(json.loads(json.dumps(d.state_dict())))  # through the checkpoint's client state
    assert restored.score("0/b", 30.0, None) == d.score("0/b", 30.0, None)


def test_skip_forward_passes_skipped_batches_and_epoch_ends():
    sizes = {0: 3, 1: 2, 2: 4}.get
    assert skip_forward(0, 1, sizes, frozenset()) == (0, 1)
    assert skip_forward(0, 1, sizes, frozenset({(0, 1), (0, 2)})) == (1, 0)
    assert skip_forward(0, 3, sizes, frozenset({(1, 0), (1, 1)})) == (2, 0)


def test_spike_config_is_validated_and_the_hook_parsed():
    cfg = RunConfig(stages=[StageConfig(data_path="data")])
    cfg.spike.min_history = 2
    with pytest.raises(ConfigError, match=r"spike\.min_history=2 must be >= 3"):
        validate(cfg)
    cfg.spike.min_history, cfg.spike.window = 20, 10
    with pytest.raises(ConfigError, match=r"spike\.window=10 must be >= spike\.min_history=20"):
        validate(cfg)
    cfg.spike.window, cfg.spike.enabled, cfg.spike.zscore_loss, cfg.spike.zscore_grad = 50, True, 0, 0
    with pytest.raises(ConfigError, match="judges nothing"):
        validate(cfg)
    assert parse_injection("step=6,scale=50") == (6, 50.0)
    with pytest.raises(ValueError, match=f"{TEST_SPIKE_ENV}='step=6'.*step=N,scale=X"):
        parse_injection("step=6")


def test_damaged_skip_list_is_named(tmp_path):
    spikes_dir(tmp_path).mkdir()
    (spikes_dir(tmp_path) / SKIPS_FILE).write_text("{not json")
    with pytest.raises(ValueError, match=f"{SKIPS_FILE}: not a skip list.*meta.json"):
        read_skips(tmp_path)


# ---- 2 ranks, torchrun ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    # 12 global batches of 4 per epoch: the 10 steps (+1 skipped batch) stay in epoch 0, every key drawn once
    return write_tiny_dataset(tmp_path_factory.mktemp("data"), {"1.00": 48}, per_shard=8)


def spike_config(path: Path, run_dir: Path, data: Path, **spike) -> Path:
    cfg = {
        "run_dir": str(run_dir), "seed": 5, "ema_decay": 0.5, "model": {"size": "debug"},
        "deepspeed": {"zero": "zero2", "precision": "fp32"}, "data": {"num_workers": 0},
        "logging": {"wandb": "disabled", "progress_bar": False},
        "checkpoint": {"every": EVERY, "keep": 10},
        "spike": {"enabled": True, "zscore_loss": 20.0, "zscore_grad": 20.0, "window": 20, "min_history": 3,
                  **spike},
        "stages": [{"name": "s", "steps": STEPS, "data_path": str(data), "resolution": 32, "bucket_align": 16,
                    "buckets": "fixed", "micro_batch": 2, "lr": 1e-3}],
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


def final_losses(run_dir: Path) -> dict[int, float]:
    """The loss of each step as the run ended up with it (a re-run step's last record)."""
    return {r["step"]: r["loss"] for r in records(run_dir)}


def keys_by_position(folder: Path) -> dict[tuple[int, int], set[str]]:
    """{(epoch, global batch): keys every rank drew there} from the loader's PIXELDIT_RECORD_KEYS hook."""
    out: dict[tuple[int, int], set[str]] = {}
    for path in sorted(folder.glob("rank*.jsonl")):
        for line in path.read_text().splitlines():
            r = json.loads(line)
            out.setdefault((r["epoch"], r["batch"]), set()).update(r["key"])
    return out


@pytest.fixture(scope="module")
def spiked(dataset, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("spiked")
    run_to_end(spike_config(tmp / "run.yaml", tmp / "run", dataset), tmp / "log.txt",
               PIXELDIT_TEST_SPIKE=INJECT, PIXELDIT_RECORD_KEYS=str(tmp / "keys"))
    return tmp / "run"


@pytest.mark.slow
def test_spike_rolls_back_skips_its_batch_and_equals_a_run_without_it(spiked, dataset, tmp_path):
    steps = [r["step"] for r in records(spiked)]
    assert steps == [1, 2, 3, 4, 5, 6, 5, 6, 7, 8, 9, 10]  # step 6 judged during step 7: back to checkpoint 4
    report = json.loads((spikes_dir(spiked) / f"step_{SPIKE_STEP:08d}.json").read_text())
    assert report["action"] == "rolled_back" and report["rolled_back_to"] == "step_00000004"
    assert report["over"] and report["z_loss"] > 20 and (report["epoch"], report["batch"]) == (0, SPIKE_STEP - 1)
    drawn = keys_by_position(spiked.parent / "keys")
    assert {s["key"] for s in report["samples"]} == drawn[(0, SPIKE_STEP - 1)] and len(report["samples"]) == 4
    assert [(s["epoch"], s["batch"], s["step"]) for s in read_skips(spiked)] == [(0, SPIKE_STEP - 1, SPIKE_STEP)]
    meta = json.loads((spiked / "checkpoints" / "step_00000008" / "meta.json").read_text())
    assert meta["spike"]["skips"] == read_skips(spiked)  # later checkpoints carry the skip list

    # a run given the skip list before it starts never sees that batch: the same losses and weights
    clean = tmp_path / "run"
    spikes_dir(clean).mkdir(parents=True)
    shutil.copy(spikes_dir(spiked) / SKIPS_FILE, spikes_dir(clean) / SKIPS_FILE)
    run_to_end(spike_config(tmp_path / "run.yaml", clean, dataset), tmp_path / "log.txt",
               PIXELDIT_RECORD_KEYS=str(tmp_path / "keys"))
    assert [r["step"] for r in records(clean)] == list(range(1, STEPS + 1))
    assert final_losses(spiked) == final_losses(clean)
    assert all(v < 10 for v in final_losses(spiked).values())
    for a, b in zip(final_state(spiked), final_state(clean)):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # the ledger lists what the clean run drew, step by step, and no skipped key
    from pixeldit.train.ledger import ledger

    listed: dict[int, set[str]] = {}
    for step, _, key, _ in ledger(spiked, STEPS):
        listed.setdefault(step, set()).add(key)
    clean_drawn = keys_by_position(tmp_path / "keys")
    assert (0, SPIKE_STEP - 1) not in clean_drawn
    assert [listed[s] for s in range(1, STEPS + 1)] == [clean_drawn[p] for p in sorted(clean_drawn)]
    assert not set().union(*listed.values()) & {s["key"] for s in report["samples"]}


@pytest.mark.slow
@pytest.mark.parametrize("records_of_step_6", [1, 2])
def test_kill_after_rollback_and_resume_repeats_the_decision(spiked, dataset, tmp_path, records_of_step_6):
    """Killed as the spiked step 6 is logged (its decision is written right after: the kill lands before or after
    it, either must give the same run), or once the re-run step 6 is logged (after the rollback, before checkpoint
    8: the resume from checkpoint 4 has the skip list from the run folder only)."""
    run_dir, log = tmp_path / "run", tmp_path / "log.txt"
    config = spike_config(tmp_path / "run.yaml", run_dir, dataset)
    proc = launch(config, log, PIXELDIT_TEST_SPIKE=INJECT)
    deadline = time.time() + 900
    while [r["step"] for r in records(run_dir)].count(SPIKE_STEP) < records_of_step_6:
        assert proc.poll() is None, f"run ended early:\n{log.read_text()[-3000:]}"
        assert time.time() < deadline, "run too slow to reach the rollback"
        time.sleep(0.005)
    kill_tree(proc)
    assert max(r["step"] for r in records(run_dir)) < STEPS
    resumed_from = (run_dir / "checkpoints" / "latest").read_text().strip()
    run_to_end(config, log, PIXELDIT_TEST_SPIKE=INJECT)
    assert final_losses(run_dir) == final_losses(spiked), f"resumed from {resumed_from}"
    assert read_skips(run_dir) == read_skips(spiked)
    for a, b in zip(final_state(run_dir), final_state(spiked)):
        assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
@needs_slurm
def test_slurm_two_node_job_makes_the_same_decision(spiked, dataset, tmp_path):
    """The spiked run as a true 2-node SLURM job (one task per node): the same rollback, skip and losses."""
    from launchers.config import LaunchConfig
    from launchers.manage import tail
    from launchers.submit import submit

    run_dir = tmp_path / "run"
    launch_cfg = LaunchConfig(cluster="slurm", nodes=2, tasks_per_node=1, cpus_per_task=1, time_min=15,
                              env={**TASK_ENV, TEST_SPIKE_ENV: INJECT})
    sub = submit(str(spike_config(tmp_path / "run.yaml", run_dir, dataset)), launch_cfg)
    result = finished(sub.jobs[0])
    assert result["status"] == "finished", tail(run_dir, 100)
    assert [r["step"] for r in records(run_dir)] == [r["step"] for r in records(spiked)]
    assert final_losses(run_dir) == final_losses(spiked) and read_skips(run_dir) == read_skips(spiked)


# ---- 1 rank, in process ---------------------------------------------------------------------------------------


def in_process_cfg(run_dir: Path, data: Path, every: int, max_rollbacks: int) -> RunConfig:
    stage = StageConfig(name="s", steps=8, data_path=str(data), resolution=32, bucket_align=16, buckets="fixed",
                        micro_batch=2, lr=1e-3)
    cfg = RunConfig(run_dir=str(run_dir), stages=[stage])
    cfg.deepspeed.precision = "fp32"
    cfg.data.num_workers = 0
    cfg.logging.wandb, cfg.logging.progress_bar = "disabled", False
    cfg.checkpoint.every, cfg.checkpoint.keep = every, 10
    cfg.spike.enabled, cfg.spike.min_history, cfg.spike.window = True, 3, 20
    cfg.spike.zscore_loss = cfg.spike.zscore_grad = 20.0
    cfg.spike.max_rollbacks = max_rollbacks
    return cfg


@pytest.mark.slow
def test_past_max_rollbacks_the_run_stops_naming_step_and_checkpoint(single_rank, dataset, tmp_path, monkeypatch):
    from pixeldit.train.trainer import run_training

    # step 6 has a checkpoint due: it is judged before that save, so no checkpoint holds the spiked update
    monkeypatch.setenv(TEST_SPIKE_ENV, INJECT)
    cfg = in_process_cfg(tmp_path / "run", dataset, every=3, max_rollbacks=0)
    with pytest.raises(SpikeLimitError, match=rf"loss spike at step {SPIKE_STEP} .*after 0 rollbacks, "
                                              r"spike\.max_rollbacks=0.*last good checkpoint is .*step_00000003"):
        run_training(cfg)
    report = json.loads((spikes_dir(cfg.run_dir) / f"step_{SPIKE_STEP:08d}.json").read_text())
    assert report["action"] == "stopped" and len(report["samples"]) == 2
    assert read_skips(cfg.run_dir) == []
    ckpts = Path(cfg.run_dir) / "checkpoints"
    assert (ckpts / "latest").read_text() == "step_00000003" and not (ckpts / "step_00000006").exists()
    assert [r["step"] for r in records(Path(cfg.run_dir))] == list(range(1, SPIKE_STEP + 1))  # the spike logged


@pytest.mark.slow
def test_spike_before_any_checkpoint_is_recorded_and_training_goes_on(single_rank, dataset, tmp_path, monkeypatch):
    from pixeldit.train.trainer import run_training

    monkeypatch.setenv(TEST_SPIKE_ENV, INJECT)
    cfg = in_process_cfg(tmp_path / "run", dataset, every=100, max_rollbacks=5)
    result = run_training(cfg)
    assert result.status == "finished" and result.step == 8
    report = json.loads((spikes_dir(cfg.run_dir) / f"step_{SPIKE_STEP:08d}.json").read_text())
    assert report["action"] == "none" and report["rolled_back_to"] is None
    assert read_skips(cfg.run_dir) == [] and [r["step"] for r in records(Path(cfg.run_dir))] == list(range(1, 9))
