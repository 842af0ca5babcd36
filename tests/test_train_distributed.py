"""The real trainer entry point on CPU: 2 ranks (torchrun, gloo), debug model, 32 px, 2 curriculum stages.

- ZeRO-1, ZeRO-2, ZeRO-3 and ZeRO-3 + CPU offload each train through a stage boundary and write complete
  checkpoints (model, optimizer, EMA per rank, RNG per rank, meta, latest pointer, keep-k);
- a run SIGKILLed (every process) twice and resumed gives bit-identical per-step losses, fp32 master
  weights and EMA to an uninterrupted run: the first kill as the last step of stage a is logged (resume
  from step 2 or 3, so the resumed run crosses the stage boundary), the second as step 5 is logged (before
  checkpoint 6 completes, so steps 5-6 run twice);
  every resume re-hashes the checkpoint on both ranks (checkpoint.verify=full) and takes over the lock the
  killed trainer left;
- every checkpoint's manifest lists (and checksums) the files of every rank;
- gradient checkpointing on and off give the same losses;
- a universal checkpoint of the 2-rank run resumes on 1 rank with the same fp32 weights and EMA, and with the
  same global batch (micro_batch doubled) continues the identical sample sequence; the ledger of the run lists
  exactly the keys the ranks recorded;
- the same run reading its dataset from S3 through a faulty endpoint (a moto server behind
  ``s3_faults.FaultProxy``: 5 ms per request, 10% of requests answered 503 SlowDown, 5% of connections reset
  before the request or mid-body) consumes the same sample keys with bit-identical losses; a secret planted in
  ``data.storage_options`` appears in no file the run, a release or a submission writes, nor in the wandb config.
"""
from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
import torch
import yaml

from train_helpers import free_port, kill_tree, torchrun, write_tiny_dataset

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
STAGE_STEPS = (3, 4)  # stage a: steps 1-3 (fixed 32 px); stage b: steps 4-7 (aspect buckets, accum 2, ckpt)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return write_tiny_dataset(tmp_path_factory.mktemp("data"), {"1.00": 12, "0.50": 8, "2.00": 8}, per_shard=4)


def write_config(path: Path, run_dir: Path, data: Path, zero: str = "zero2", verify: str = "size", **stage_b) -> Path:
    cfg = {
        "run_dir": str(run_dir), "seed": 3, "ema_decay": 0.5,
        "model": {"size": "debug"},
        "deepspeed": {"zero": zero, "precision": "bf16"},
        "data": {"num_workers": 1},
        "logging": {"wandb": "disabled", "progress_bar": False, "image_every": 3, "image_count": 4,
                    "image_sample_steps": 3},
        "checkpoint": {"every": 2, "keep": 2, "verify": verify},
        "stages": [
            {"name": "a", "steps": STAGE_STEPS[0], "data_path": str(data), "resolution": 32, "bucket_align": 16,
             "buckets": "fixed", "micro_batch": 2, "lr": 1e-3, "warmup_steps": 2, "shift": 1.0},
            {"name": "b", "steps": STAGE_STEPS[1], "data_path": str(data), "resolution": 32, "bucket_align": 16,
             "buckets": "aspect", "micro_batch": 2, "grad_accum": 2, "lr": 5e-4, "shift": 2.0,
             "schedule": "cosine", "grad_checkpointing": True, **stage_b},
        ],
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


def launch(config: Path, log: Path, **env_extra: str) -> subprocess.Popen:
    cmd, env = torchrun(config)
    return subprocess.Popen(cmd, env={**env, **env_extra}, cwd=ROOT, stdout=open(log, "a"), stderr=subprocess.STDOUT)


def run_to_end(config: Path, log: Path, timeout: float = 600, **env_extra: str) -> None:
    proc = launch(config, log, **env_extra)
    if proc.wait(timeout=timeout) != 0:
        raise AssertionError(f"training failed (rc {proc.returncode}); log tail:\n{log.read_text()[-4000:]}")


def records(run_dir: Path) -> list[dict]:
    path = run_dir / "losses.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def run_and_kill(config: Path, log: Path, run_dir: Path, kill_after_step: int) -> None:
    """Launch, and SIGKILL every process of the job as soon as step ``kill_after_step`` is logged."""
    proc = launch(config, log)
    deadline = time.time() + 600  # start-up (imports, process group) alone can take minutes on a loaded machine
    while max((r["step"] for r in records(run_dir)), default=0) < kill_after_step:
        assert proc.poll() is None, f"run ended before step {kill_after_step}:\n{log.read_text()[-3000:]}"
        assert time.time() < deadline, "run too slow to reach the kill step"
        time.sleep(0.005)
    kill_tree(proc)


def final_state(run_dir: Path) -> tuple[dict, dict]:
    from pixeldit.release.zero import consolidate_model
    from pixeldit.run_folder import consolidate_ema, resolve_checkpoint

    latest = resolve_checkpoint(run_dir)
    return consolidate_model(latest), consolidate_ema(latest)


@pytest.fixture(scope="module")
def reference(dataset, tmp_path_factory) -> Path:
    """Uninterrupted ZeRO-2 run, shared by the resume and checkpointing tests."""
    tmp = tmp_path_factory.mktemp("ref")
    run_to_end(write_config(tmp / "run.yaml", tmp / "run", dataset), tmp / "log.txt",
               PIXELDIT_RECORD_KEYS=str(tmp / "run" / "recorded_keys"))
    return tmp / "run"


def losses_by_step(run_dir: Path) -> dict[int, list[float]]:
    out: dict[int, list[float]] = {}
    for r in records(run_dir):
        out.setdefault(r["step"], []).append(r["loss"])
    return out


def test_kill_and_resume_is_bit_exact(reference, dataset, tmp_path):
    # 1st: as the last step of stage a is logged (written right after the stage-end save). A step's record is written
    # one step later, or right after a save: step 4's record follows checkpoint 4, so a kill there repeats nothing;
    # step 5's record is written as step 6 ends, before step 6's preview and checkpoint 6, so the 2nd kill (after
    # step 5 is logged) lands before checkpoint 6 is complete and steps 5-6 run twice
    first_kill, second_kill = STAGE_STEPS[0], 5
    run_dir = tmp_path / "run"
    config = write_config(tmp_path / "run.yaml", run_dir, dataset, verify="full")  # both ranks hash on resume
    log = tmp_path / "log.txt"
    info = f"(kills after steps {first_kill}, {second_kill} were logged)"

    run_and_kill(config, log, run_dir, first_kill)
    resumed_from = int((run_dir / "checkpoints" / "latest").read_text().strip().split("_")[1])
    assert 2 <= resumed_from <= STAGE_STEPS[0], info  # checkpoint 2 or 3: the resumed run crosses the boundary
    run_and_kill(config, log, run_dir, second_kill)
    run_to_end(config, log)

    ref, got = losses_by_step(reference), losses_by_step(run_dir)
    total = sum(STAGE_STEPS)
    assert sorted(ref) == sorted(got) == list(range(1, total + 1)), info
    assert any(len(v) > 1 for v in got.values()), "no step was run twice: the kill did not interrupt " + info
    for step, values in got.items():  # re-run steps too: every record of a step is bit-identical
        assert values == ref[step] * len(values), f"step {step}: {values} != {ref[step]} {info}"
    ref_model, ref_ema = final_state(reference)
    model, ema = final_state(run_dir)
    assert all(torch.equal(ref_model[k], model[k]) for k in ref_model), info
    assert all(torch.equal(ref_ema[k], ema[k]) for k in ref_ema), info


def test_gradient_checkpointing_off_gives_same_losses(reference, dataset, tmp_path):
    config = write_config(tmp_path / "run.yaml", tmp_path / "run", dataset, grad_checkpointing=False)
    run_to_end(config, tmp_path / "log.txt")
    assert [r["loss"] for r in records(tmp_path / "run")] == [r["loss"] for r in records(reference)]


@pytest.mark.parametrize("zero", ["zero1", "zero3", "zero3_offload"])
def test_zero_stage_trains_and_checkpoints(reference, dataset, tmp_path, zero):
    run_dir = tmp_path / "run"
    run_to_end(write_config(tmp_path / "run.yaml", run_dir, dataset, zero=zero), tmp_path / "log.txt")
    recs = records(run_dir)
    assert [r["step"] for r in recs] == list(range(1, sum(STAGE_STEPS) + 1))
    assert all(r["loss"] == r["loss"] and 0 < r["loss"] < 10 and not r["skipped"] for r in recs)
    assert [r["stage"] for r in recs] == [0] * STAGE_STEPS[0] + [1] * STAGE_STEPS[1]
    assert recs[0]["lr"] == pytest.approx(5e-4) and recs[2]["lr"] == pytest.approx(1e-3)  # warmup then stage b
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").glob("step_*"))
    assert ckpts == ["step_00000006", "step_00000007"]  # keep: 2
    last = run_dir / "checkpoints" / "step_00000007"
    meta = json.loads((last / "meta.json").read_text())
    assert meta["step"] == 7 and meta["stage_name"] == "b" and meta["model_args"]["name"] == "debug"
    assert (last / "rng_rank00000.pt").exists() and (last / "rng_rank00001.pt").exists()
    from pixeldit.run_folder import checkpoint_files, checkpoint_problem, read_manifest
    assert sorted(read_manifest(last)) == checkpoint_files(last)  # every rank's files are checksummed
    assert any("zero_pp_rank_1_" in name for name in read_manifest(last)) and checkpoint_problem(last, "full") is None
    grids = sorted(p.name for p in (run_dir / "samples").glob("*.png"))  # EMA previews (ZeRO-3: gathered)
    assert grids == ["step_00000003.png", "step_00000006.png"]
    from PIL import Image
    with Image.open(run_dir / "samples" / grids[-1]) as im:
        assert im.size == (64, 64)  # 4 samples of 32 px in a 2 x 2 grid
    n_ema = 2 if zero.startswith("zero3") else 1  # ZeRO-3: each rank's EMA partition
    assert len(list(last.glob("ema_rank*.pt"))) == n_ema
    model, ema = final_state(run_dir)
    ref_model, ref_ema = final_state(reference)
    assert model.keys() == ref_model.keys() == ema.keys()
    # same data, seeds and init as the ZeRO-2 reference: close, though reduction order differs
    for k in model:
        assert torch.allclose(model[k], ref_model[k], atol=2e-3), k
        assert torch.allclose(ema[k], ref_ema[k], atol=2e-3), k


def test_universal_checkpoint_resumes_on_another_world_size(reference, tmp_path, monkeypatch):
    """A 2-rank ZeRO-2 checkpoint, converted to DeepSpeed's universal format, resumes on 1 rank with the
    same fp32 master weights and EMA, then trains on through the rest of the curriculum."""
    from pixeldit.release.zero import consolidate_model, to_universal
    from pixeldit.run_folder import consolidate_ema
    from pixeldit.train.config import load_config
    from pixeldit.train.trainer import run_training

    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    for key, value in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                           MASTER_PORT=str(free_port())).items():
        monkeypatch.setenv(key, value)
    src = reference / "checkpoints" / "step_00000006"
    universal = to_universal(src, tmp_path / "universal" / "step_00000006")
    cfg = load_config(reference / "config.yaml", [f"run_dir={tmp_path / 'run'}", f"checkpoint.resume_from={universal}",
                                                  "checkpoint.load_universal=true", "data.num_workers=0",
                                                  "stages.1.micro_batch=4"])  # same global batch on 1 rank
    monkeypatch.setenv("PIXELDIT_RECORD_KEYS", str(tmp_path / "keys"))
    result = run_training(cfg, stop_requested=lambda: True)  # load, then save at once in the new run
    assert result.status == "stopped" and result.step == 6
    saved = tmp_path / "run" / "checkpoints" / "step_00000006"
    a, b = consolidate_model(src), consolidate_model(saved)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ea, eb = consolidate_ema(src), consolidate_ema(saved)
    assert all(torch.equal(ea[k], eb[k]) for k in ea)
    result = run_training(cfg)  # resumes from its own checkpoint now
    assert result.status == "finished" and result.step == sum(STAGE_STEPS) and len(result.losses) == 1
    # step 7 on 1 rank drew the global batch that step 7 drew on 2 ranks
    assert recorded_steps(tmp_path / "keys") == [recorded_steps(reference / "recorded_keys")[-1]]


def recorded_steps(folder: Path) -> list[list[str]]:
    """Per optimizer step (in order), the sorted keys every rank drew (the loader's PIXELDIT_RECORD_KEYS hook)."""
    steps: dict[tuple, list[str]] = {}
    for path in sorted(folder.glob("rank*.jsonl")):
        for line in path.read_text().splitlines():
            r = json.loads(line)
            steps.setdefault((r["stage"], r["epoch"], r["batch"]), []).extend(r["key"])
    return [sorted(keys) for keys in steps.values()]


def test_ledger_lists_exactly_the_recorded_keys(reference):
    from pixeldit.train.ledger import ledger

    by_step: dict[int, list[str]] = {}
    for step, root, key, _ in ledger(reference, sum(STAGE_STEPS)):
        by_step.setdefault(step, []).append(key)
    assert sorted(by_step) == list(range(1, sum(STAGE_STEPS) + 1))
    assert [sorted(v) for _, v in sorted(by_step.items())] == recorded_steps(reference / "recorded_keys")
    assert [len(v) for v in by_step.values()] == [4] * STAGE_STEPS[0] + [8] * STAGE_STEPS[1]  # G per stage


SECRET = "PLANTED-s3cr3t-9f27c1d0"  # noqa: S105 (a test value)
FAULTY = {"PIXELDIT_S3_MAX_ATTEMPTS": "12", "PIXELDIT_S3_BACKOFF_S": "0.02", "PIXELDIT_S3_BACKOFF_MAX_S": "0.2",
          "PIXELDIT_S3_READ_TIMEOUT_S": "10"}


def files_containing(folder: Path, needle: bytes) -> list[str]:
    return sorted(str(p) for p in folder.rglob("*") if p.is_file() and needle in p.read_bytes())


def test_run_through_faulty_s3_matches_the_local_run_and_saves_no_secret(reference, dataset, tmp_path, monkeypatch):
    from data_fixtures import moto_s3
    from launchers.config import LaunchConfig
    from launchers.submit import submit
    from pixeldit.errors import ConfigError
    from pixeldit.release.export import export_release
    from pixeldit.storage import fs_and_path
    from s3_faults import FaultProxy

    with moto_s3("bkt") as base:
        fs, _ = fs_and_path(base)
        fs.put(str(dataset) + "/", "bkt/data/", recursive=True)
        with FaultProxy(os.environ["AWS_ENDPOINT_URL"], latency_s=0.005, slowdown=0.1, reset=0.05, seed=7) as proxy:
            remote = tmp_path / "remote"
            config = write_config(tmp_path / "remote.yaml", remote / "run", Path("unused"))
            cfg = yaml.safe_load(config.read_text())
            for stage in cfg["stages"]:
                stage["data_path"] = f"{base}/data"
            cfg["data"].update(storage_options={"endpoint_url": proxy.url, "key": "testing", "secret": SECRET},
                               cache_dir=str(tmp_path / "node_cache"), cache_max_gb=0.001)
            cfg["logging"]["wandb"] = "offline"
            config.write_text(yaml.safe_dump(cfg))
            run_to_end(config, tmp_path / "remote.log", timeout=900, PIXELDIT_RECORD_KEYS=str(remote / "keys"),
                       WANDB_MODE="offline", **FAULTY)
            faults = dict(proxy.faults)

            # the same samples in the same order as the local reference run, and bit-identical losses
            assert recorded_steps(remote / "keys") == recorded_steps(reference / "recorded_keys")
            assert len(recorded_steps(remote / "keys")) == sum(STAGE_STEPS)
            assert [r["loss"] for r in records(remote / "run")] == [r["loss"] for r in records(reference)]
            assert faults.get("slowdown", 0) > 0 and faults.get("reset-before", 0) + faults.get("reset-mid", 0) > 0

            # the secret was used (the run read S3 with it) but saved nowhere
            release = tmp_path / "release"
            export_release(remote / "run", release)
            monkeypatch.chdir(tmp_path)
            with pytest.raises(ConfigError, match="data.storage_options.key holds a credential") as err:
                submit(str(config), LaunchConfig(cluster="local"))
            assert SECRET not in str(err.value)
    wandb_runs = list((remote / "run").glob("wandb/*/run-*.wandb"))  # offline: the config is in the run file
    assert wandb_runs and all(b"<redacted>" in p.read_bytes() for p in wandb_runs), "the config did not reach wandb"
    assert (remote / "run" / "config.yaml").read_text().count("<redacted>") == 2
    for folder in (remote / "run", release, tmp_path / "node_cache"):
        assert files_containing(folder, SECRET.encode()) == [], folder
    assert SECRET not in (tmp_path / "remote.log").read_text()
    assert not (remote / "run" / "slurm").exists() and not (remote / "run" / "launcher").exists()
