"""Run-folder integrity with the real trainer (single rank, in process, debug model at 32 px): issue 12.

- the skip contract (``skip_reason``): a step counts as applied only if the optimizer applied it;
- lr=1e6 in fp32: DeepSpeed skips updates whose gradient norm overflows; they count as skipped, leave the
  weights and the EMA alone, join the streak, and the streak stops the run at the step it names and logs;
- losses.jsonl is strict JSON (null for the non-finite numbers);
- the prune scenario: a new run in a folder that still holds newer step folders keeps its checkpoints, and
  resume and release read it;
- a garbage `latest` and a truncated optimizer partition fall back to the newest intact step folder (the
  resumed steps are bit-identical), or stop with one line when fallback is off;
- a trainer refuses a run folder whose lock another live process holds, before writing anything.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import socket

import pytest
import torch

import pixeldit.train.trainer as trainer_module
from pixeldit import run_folder
from pixeldit.errors import CheckpointError
from pixeldit.release.export import export_release
from pixeldit.release.zero import consolidate_model
from pixeldit.train.config import RunConfig, StageConfig
from pixeldit.train.ema import EMA
from pixeldit.train.metrics import json_record
from pixeldit.train.run_lock import RunFolderLocked, RunLock
from pixeldit.train.step import NonFiniteLossError, skip_reason
from pixeldit.train.trainer import run_training
from train_helpers import set_single_rank, write_tiny_dataset


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_tiny_dataset(tmp_path_factory.mktemp("data"), {"1.00": 16}, per_shard=4)


def make_cfg(run_dir, data, steps=4, every=2, keep=10, lr=1e-3, limit=20) -> RunConfig:
    stage = StageConfig(name="s", steps=steps, data_path=str(data), resolution=32, bucket_align=16,
                        micro_batch=2, grad_accum=2, lr=lr)
    cfg = RunConfig(run_dir=str(run_dir), stages=[stage], max_consecutive_nonfinite=limit)
    cfg.deepspeed.precision, cfg.deepspeed.zero = "fp32", "zero2"
    cfg.data.num_workers = 0
    cfg.logging.wandb, cfg.logging.progress_bar = "disabled", False
    cfg.checkpoint.every, cfg.checkpoint.keep = every, keep
    return cfg


def strict_records(run_dir) -> list[dict]:
    """losses.jsonl parsed as strict JSON (a bare NaN / Infinity is an error)."""
    def refuse(name):
        raise ValueError(f"not JSON: {name}")
    return [json.loads(line, parse_constant=refuse) for line in (run_dir / "losses.jsonl").read_text().splitlines()]


# --- the skip contract ------------------------------------------------------------------------------------

@pytest.mark.parametrize("loss_finite, applied, grad_norm, reason", [
    (True, True, 0.5, None),  # an ordinary step
    (True, True, None, None),  # DeepSpeed computes no norm: its own verdict decides
    (False, False, None, "nonfinite_loss"),  # no backward, or accumulated gradients dropped
    (True, False, float("inf"), "nonfinite_grad"),  # the lr=1e6 case: DeepSpeed's overflow check skipped it
    (True, False, float("nan"), "nonfinite_grad"),
    (True, False, 0.5, "not_applied"),  # DeepSpeed skipped the update for its own reasons
])
def test_skip_reason_contract(loss_finite, applied, grad_norm, reason):
    assert skip_reason(loss_finite, applied, grad_norm) == reason


def test_an_update_applied_with_a_nonfinite_norm_is_an_error():
    with pytest.raises(RuntimeError, match="applied an update with gradient norm inf.*check_grad_overflow"):
        skip_reason(True, True, float("inf"))


def test_losses_records_are_strict_json():
    record = {"step": 3, "loss": float("nan"), "grad_norm": float("inf"), "lr": 1e-3, "skipped": True}
    line = json.dumps(json_record(record), allow_nan=False)
    assert json.loads(line) == {"step": 3, "loss": None, "grad_norm": None, "lr": 1e-3, "skipped": True}


# --- issue 12.2: lr=1e6 -----------------------------------------------------------------------------------

def test_lr_1e6_skipped_updates_are_counted_leave_ema_alone_and_stop_the_run(single_rank, data, tmp_path,
                                                                           monkeypatch):
    """fp32 ZeRO-2, lr=1e6: steps 1-2 apply (the second makes the weights huge), then every gradient norm
    overflows and DeepSpeed skips the update. Before: logged as applied, EMA updated, run "finished"."""
    weights, ema_updates = [], []
    real_step, real_update = trainer_module.train_step, EMA.update

    def spy_step(engine, *args, **kwargs):
        out = real_step(engine, *args, **kwargs)
        weights.append([p.detach().clone() for p in engine.module.parameters()])
        return out

    def spy_update(self):
        ema_updates.append(len(weights))
        real_update(self)

    monkeypatch.setattr(trainer_module, "train_step", spy_step)
    monkeypatch.setattr(EMA, "update", spy_update)
    cfg = make_cfg(tmp_path / "run", data, steps=10, every=1, lr=1e6, limit=4)
    with pytest.raises(NonFiniteLossError, match=r"^4 skipped steps in a row .*the last is step 6, nonfinite_grad"
                                                 r".*The last good checkpoint is .*step_00000002; lower stages\[0\]"):
        run_training(cfg)
    recs = strict_records(tmp_path / "run")
    assert [r["step"] for r in recs] == [1, 2, 3, 4, 5, 6]  # the stopping step is logged, numbered as in the error
    assert [r["skipped"] for r in recs] == [False, False, True, True, True, True]
    assert [r["skip_reason"] for r in recs[2:]] == ["nonfinite_grad"] * 4
    assert [r["nonfinite_total"] for r in recs] == [0, 0, 1, 2, 3, 4]
    assert all(r["grad_norm"] is None and math.isfinite(r["loss"]) and r["loss"] > 1e20 for r in recs[2:])
    assert ema_updates == [1, 2]  # only after the applied steps
    assert all(all(torch.equal(a, b) for a, b in zip(weights[1], w)) for w in weights[2:])  # DeepSpeed skipped them
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text() == "step_00000002"  # none saved mid-streak


# --- issue 12.1: pruning ----------------------------------------------------------------------------------

def test_new_run_in_a_folder_with_newer_checkpoints_keeps_its_own(single_rank, data, tmp_path):
    """Old steps 2 and 4 stay; `latest` removed (the old hint); a 3-step run with keep=1 saves 1, 2, 3: before,
    pruning by name deleted each right after writing it and the run died on `latest`."""
    run = tmp_path / "run"
    run_training(make_cfg(run, data, steps=4, every=2))
    root = run_folder.checkpoints_dir(run)
    (root / run_folder.LATEST).unlink()
    result = run_training(make_cfg(run, data, steps=3, every=1, keep=1))
    assert result.status == "finished" and result.checkpoint == str(root / "step_00000003")
    assert [d.name for d in run_folder.step_dirs(root)] == ["step_00000003", "step_00000004"]  # 4: left alone
    assert run_training(make_cfg(run, data, steps=3, every=1, keep=1)).losses == []  # resume reads it
    release = export_release(run, tmp_path / "release", dtype="fp32")
    assert json.loads((release / "config.json").read_text())["step"] == 3


# --- issue 12.5: damaged `latest` or checkpoint ------------------------------------------------------------

@pytest.fixture(scope="module")
def four_steps(data, tmp_path_factory):
    """A finished 4-step run with checkpoints at steps 2 and 4."""
    run = tmp_path_factory.mktemp("four") / "run"
    with pytest.MonkeyPatch.context() as mp:
        set_single_rank(mp)
        run_training(make_cfg(run, data))
    return run


def copy_run(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_garbage_latest_falls_back_to_the_newest_intact_folder(single_rank, data, four_steps, tmp_path, capsys):
    run = copy_run(four_steps, tmp_path / "run")
    (run / "checkpoints" / "latest").write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff garbage")
    result = run_training(make_cfg(run, data, steps=5))
    assert result.status == "finished" and result.step == 5 and len(result.losses) == 1  # resumed at step 4
    out = capsys.readouterr().out
    assert (f"note: {run / 'checkpoints' / 'latest'} is damaged (not text); using the newest intact step folder "
            f"{run / 'checkpoints' / 'step_00000004'} instead\n") in out


def test_truncated_optimizer_partition_falls_back_and_resumes_exactly(single_rank, data, four_steps, tmp_path,
                                                                      capsys):
    run = copy_run(four_steps, tmp_path / "run")
    partition = run / "checkpoints" / "step_00000004" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    with open(partition, "r+b") as f:
        f.truncate(partition.stat().st_size // 2)
    off = make_cfg(run, data)
    off.checkpoint.fallback = False
    with pytest.raises(CheckpointError, match=r"names step_00000004, which is damaged: zero_pp_rank_0_mp_rank_00_"
                                              r"optim_states.pt has \d+ bytes, \d+ were written; .*write "
                                              r"'step_00000002' into"):
        run_training(off)
    result = run_training(make_cfg(run, data))
    assert "which is damaged" in capsys.readouterr().out
    assert result.status == "finished" and len(result.losses) == 2  # steps 3 and 4 again, from step 2
    before = strict_records(four_steps)
    assert result.losses == [r["loss"] for r in before[2:4]]  # bit-identical to the first time
    assert run_folder.checkpoint_problem(run / "checkpoints" / "step_00000004", "full") is None  # saved anew
    a, b = (consolidate_model(r / "checkpoints" / "step_00000004") for r in (four_steps, run))
    assert all(torch.equal(a[k], b[k]) for k in a)


# --- issue 12.3: one trainer per run folder ---------------------------------------------------------------

def test_trainer_refuses_a_run_folder_held_by_a_live_trainer(single_rank, data, tmp_path):
    run = tmp_path / "run"
    holder = RunLock(run, job_id="4242")
    holder.acquire()
    try:
        with pytest.raises(RunFolderLocked) as err:
            run_training(make_cfg(run, data))
    finally:
        holder.release()
    message = str(err.value)
    assert "\n" not in message and f"is in use by another trainer (pid {os.getpid()} on {socket.gethostname()}, " \
                                   f"job 4242" in message
    assert sorted(p.name for p in run.iterdir()) == []  # nothing written: no config, no losses, lock released
