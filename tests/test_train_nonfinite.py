"""Non-finite losses (single rank, in process): the step is skipped and counted, accumulated gradients of
the skipped step are dropped, too many in a row stop the run with a clear error and keep the last good
checkpoint; a stop request saves and returns "stopped", and calling again resumes to the end."""
from __future__ import annotations

import json

import pytest
import torch

import pixeldit.train.engine as engine_module
from pixeldit.release.zero import consolidate_model
from pixeldit.train.config import RunConfig, StageConfig
from pixeldit.train.step import NonFiniteLossError
from pixeldit.train.trainer import run_training
from train_helpers import write_tiny_dataset


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_tiny_dataset(tmp_path_factory.mktemp("data"), {"1.00": 16}, per_shard=4)


def make_cfg(run_dir, data, steps=6, every=2, limit=3, zero="zero2") -> RunConfig:
    stage = StageConfig(name="s", steps=steps, data_path=str(data), resolution=32, bucket_align=16,
                        micro_batch=2, grad_accum=2, lr=1e-3)
    cfg = RunConfig(run_dir=str(run_dir), stages=[stage], max_consecutive_nonfinite=limit)
    cfg.deepspeed.precision, cfg.deepspeed.zero = "fp32", zero
    cfg.data.num_workers = 0
    cfg.logging.wandb, cfg.logging.progress_bar = "disabled", False
    cfg.checkpoint.every, cfg.checkpoint.keep = every, 10
    return cfg


def poison(monkeypatch, nan_calls):
    """Make compute_loss return NaN on the given (0-based) call numbers."""
    real, calls = engine_module.compute_loss, [0]

    def wrapped(*args, **kwargs):
        out = real(*args, **kwargs)
        if calls[0] in nan_calls:
            out = {k: v * float("nan") for k, v in out.items()}
        calls[0] += 1
        return out

    monkeypatch.setattr(engine_module, "compute_loss", wrapped)


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "losses.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("zero", ["zero2", "zero3"])
def test_nonfinite_step_is_skipped_and_partial_gradients_dropped(single_rank, data, tmp_path, monkeypatch, zero):
    # step 3 (0-based 2): NaN on its 2nd micro-batch (call 5) in run A, on its 1st (call 4) in run B.
    # Both must skip step 3 entirely; A must also drop the gradient of the 1st micro-batch, so every
    # later step is identical in A and B.
    results = {}
    for name, nan_call in (("a", 5), ("b", 4)):
        poison(monkeypatch, {nan_call})
        cfg = make_cfg(tmp_path / name, data, zero=zero)
        result = run_training(cfg)
        assert result.status == "finished" and result.step == 6
        results[name] = records(tmp_path / name)
    a, b = results["a"], results["b"]
    assert [r["skipped"] for r in a] == [False, False, True, False, False, False]
    assert a[2]["nonfinite_total"] == 1 and a[2]["grad_norm"] is None
    assert [r["loss"] for r in a[3:]] == [r["loss"] for r in b[3:]]
    assert all(r["loss"] == r["loss"] for r in a[3:])  # finite again: no NaN update was applied
    # and training went on after the skip
    s2, s4 = (consolidate_model(tmp_path / f"a/checkpoints/step_0000000{i}") for i in (2, 4))
    assert any(not torch.equal(s2[k], s4[k]) for k in s2)


def test_too_many_nonfinite_in_a_row_stop_and_keep_last_checkpoint(single_rank, data, tmp_path, monkeypatch):
    poison(monkeypatch, set(range(8, 100)))  # every micro-batch from step 5 on
    cfg = make_cfg(tmp_path / "run", data, steps=10, limit=3)
    with pytest.raises(NonFiniteLossError, match="3 skipped steps in a row .*the last is step 7, nonfinite_loss"
                                                 ".*step_00000004"):
        run_training(cfg)
    assert [r["step"] for r in records(tmp_path / "run")][-1] == 7  # the stopping step is logged
    ckpts = tmp_path / "run" / "checkpoints"
    assert (ckpts / "latest").read_text() == "step_00000004"
    assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_00000002", "step_00000004"]


def test_stop_request_saves_and_a_second_call_resumes(single_rank, data, tmp_path, monkeypatch):
    """Also runs the default logging: wandb offline (one wandb run continued across the resume)."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = make_cfg(tmp_path / "run", data, steps=5, every=100)
    cfg.logging.wandb, cfg.logging.log_every = "offline", 1
    polls = iter([False, False, True])
    result = run_training(cfg, stop_requested=lambda: next(polls, True))
    assert result.status == "stopped" and result.step == 2 and result.checkpoint.endswith("step_00000002")
    assert len(result.losses) == 2
    run_id = (tmp_path / "run" / "wandb_id.txt").read_text()
    result = run_training(cfg)
    assert result.status == "finished" and result.step == 5 and len(result.losses) == 3
    assert [r["step"] for r in records(tmp_path / "run")] == [1, 2, 3, 4, 5]
    assert (tmp_path / "run" / "wandb_id.txt").read_text() == run_id
    offline_runs = list((tmp_path / "run" / "wandb").glob(f"offline-run-*-{run_id}"))
    assert offline_runs and all(list(r.glob("*.wandb")) for r in offline_runs)
