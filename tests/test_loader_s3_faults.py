"""The real trainer (2 CPU ranks, torchrun) reading its dataset from S3 through a faulty endpoint, against the
same run on local disk; a secret planted in ``data.storage_options`` appears in no file the run, a release
or a submission writes, nor in the wandb config.

The endpoint is a moto server behind ``s3_faults.FaultProxy``: 5 ms per request, 10% of requests answered
503 SlowDown, 5% of connections reset (before the request or in the middle of the body).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from s3_faults import FaultProxy
from test_train_distributed import STAGE_STEPS, records, run_to_end, write_config
from train_helpers import write_tiny_dataset

pytestmark = pytest.mark.slow
SECRET = "PLANTED-s3cr3t-9f27c1d0"  # noqa: S105 (a test value)
FAULTY = {"PIXELDIT_S3_MAX_ATTEMPTS": "12", "PIXELDIT_S3_BACKOFF_S": "0.02", "PIXELDIT_S3_BACKOFF_MAX_S": "0.2",
          "PIXELDIT_S3_READ_TIMEOUT_S": "10"}


def files_containing(folder: Path, needle: bytes) -> list[str]:
    return sorted(str(p) for p in folder.rglob("*") if p.is_file() and needle in p.read_bytes())


def keys_by_step(folder: Path) -> list[list[str]]:
    steps: dict[tuple, list[str]] = {}
    for path in sorted(folder.glob("rank*.jsonl")):
        for line in path.read_text().splitlines():
            r = json.loads(line)
            steps.setdefault((r["stage"], r["epoch"], r["batch"]), []).extend(r["key"])
    return [sorted(v) for v in steps.values()]


def test_two_rank_run_through_faulty_s3_matches_local_disk_and_saves_no_secret(tmp_path, monkeypatch):
    import yaml

    from data_fixtures import moto_s3
    from launchers.config import LaunchConfig
    from launchers.submit import submit
    from pixeldit.errors import ConfigError
    from pixeldit.storage import fs_and_path
    from pixeldit.release.export import export_release

    data = write_tiny_dataset(tmp_path / "data", {"1.00": 12, "0.50": 8, "2.00": 8}, per_shard=4)
    local = tmp_path / "local"
    run_to_end(write_config(tmp_path / "local.yaml", local / "run", data), tmp_path / "local.log", timeout=600,
               PIXELDIT_RECORD_KEYS=str(local / "keys"))

    with moto_s3("bkt") as base:
        fs, _ = fs_and_path(base)
        fs.put(str(data) + "/", "bkt/data/", recursive=True)
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

            # the same samples in the same order, and bit-identical losses
            assert keys_by_step(remote / "keys") == keys_by_step(local / "keys")
            assert len(keys_by_step(local / "keys")) == sum(STAGE_STEPS)
            assert [r["loss"] for r in records(remote / "run")] == [r["loss"] for r in records(local / "run")]
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
