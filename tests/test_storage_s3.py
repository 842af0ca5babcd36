"""S3 timeouts and retries (pixeldit.storage): settings, what is retried, reads through a faulty endpoint, and
every command that opens S3 ending in one clear line within the documented bound on a silent or refused
endpoint."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pixeldit.errors import ConfigError, StorageError
from pixeldit.s3 import S3Settings, configure_s3, resolve_s3_settings, retry_reason
from pixeldit.storage import credential_keys, fetch_to_file, read_bytes, read_range, redact_options, write_bytes_atomic
from s3_faults import FaultProxy, refused_url, silent_endpoint

ROOT = Path(__file__).resolve().parents[1]
FAST_S3 = {"PIXELDIT_S3_CONNECT_TIMEOUT_S": "1", "PIXELDIT_S3_READ_TIMEOUT_S": "1", "PIXELDIT_S3_MAX_ATTEMPTS": "2",
           "PIXELDIT_S3_BACKOFF_S": "0.1"}


def test_settings_defaults_environment_and_run_config(monkeypatch):
    assert S3Settings().worst_case_s() == 4 * (10 + 20) + 1 + 2 + 4  # 127 s: the bound in the docs
    monkeypatch.setenv("PIXELDIT_S3_READ_TIMEOUT_S", "3")
    monkeypatch.setenv("PIXELDIT_S3_MAX_ATTEMPTS", "2")
    s = resolve_s3_settings({"max_attempts": 5})  # the run config's data.s3 beats the environment
    assert (s.read_timeout_s, s.max_attempts, s.connect_timeout_s) == (3.0, 5, 10.0)
    with pytest.raises(ConfigError, match=r"unknown S3 settings \['retries'\]"):
        resolve_s3_settings({"retries": 3})
    with pytest.raises(ConfigError, match="max_attempts=0 must be an integer >= 1"):
        resolve_s3_settings({"max_attempts": 0})
    monkeypatch.setenv("PIXELDIT_S3_CONNECT_TIMEOUT_S", "soon")
    with pytest.raises(ConfigError, match="PIXELDIT_S3_CONNECT_TIMEOUT_S='soon'"):
        resolve_s3_settings()


def test_what_is_retried():
    from botocore.exceptions import ClientError, EndpointConnectionError, ReadTimeoutError

    def client_error(code, status):
        return ClientError({"Error": {"Code": code, "Message": "x"}, "ResponseMetadata": {"HTTPStatusCode": status}},
                           "GetObject")

    assert retry_reason(client_error("SlowDown", 503)) == "throttled"
    assert retry_reason(client_error("InternalError", 500)) == "server error"
    assert retry_reason(client_error("NoSuchKey", 404)) is None
    assert retry_reason(client_error("AccessDenied", 403)) is None
    wrapped = OSError(5, "translated")  # s3fs hands on a translated error with the ClientError as cause
    wrapped.__cause__ = client_error("SlowDown", 503)
    assert retry_reason(wrapped) == "throttled"
    assert retry_reason(ReadTimeoutError(endpoint_url="http://x")) == "no answer"
    refused = EndpointConnectionError(endpoint_url="http://x", error=ConnectionRefusedError(111, "refused"))
    assert retry_reason(refused) == "connection refused"
    assert retry_reason(ConnectionResetError()) == "connection error"
    assert retry_reason(ValueError("a bug")) is None


def test_credentials_are_found_and_redacted():
    options = {"endpoint_url": "http://x", "key": "AKIA", "client_kwargs": {"aws_secret_access_key": "s3cr3t"}}
    assert credential_keys(options) == ["key", "client_kwargs.aws_secret_access_key"]
    assert redact_options(options) == {"endpoint_url": "http://x", "key": "<redacted>",
                                       "client_kwargs": {"aws_secret_access_key": "<redacted>"}}


@pytest.fixture
def s3(monkeypatch):
    from data_fixtures import moto_s3

    for k, v in {**FAST_S3, "PIXELDIT_S3_MAX_ATTEMPTS": "10", "PIXELDIT_S3_BACKOFF_S": "0.02",
                 "PIXELDIT_S3_BACKOFF_MAX_S": "0.2"}.items():
        monkeypatch.setenv(k, v)
    configure_s3()
    with moto_s3("bkt") as base:
        yield base
    configure_s3()


def test_reads_survive_throttling_resets_and_latency(s3, tmp_path, monkeypatch):
    data = os.urandom(2_500_000)
    write_bytes_atomic(f"{s3}/obj.bin", data)
    with FaultProxy(os.environ["AWS_ENDPOINT_URL"], latency_s=0.005, slowdown=0.15, reset=0.15, seed=3) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        for _ in range(6):
            assert read_bytes(f"{s3}/obj.bin") == data
            assert read_range(f"{s3}/obj.bin", 10, 5000) == data[10:5000]
            fetch_to_file(f"{s3}/obj.bin", str(tmp_path / "copy"), len(data), chunk_bytes=1_000_000)
            assert (tmp_path / "copy").read_bytes() == data
        assert proxy.faults["slowdown"] > 0 and proxy.faults["reset-before"] > 0 and proxy.faults["reset-mid"] > 0


def test_endless_throttling_ends_in_one_line_naming_the_setting(s3, monkeypatch):
    write_bytes_atomic(f"{s3}/obj.bin", b"x")
    monkeypatch.setenv("PIXELDIT_S3_MAX_ATTEMPTS", "3")
    configure_s3()
    with FaultProxy(os.environ["AWS_ENDPOINT_URL"], slowdown=1.0) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        with pytest.raises(StorageError) as err:
            read_bytes(f"{s3}/obj.bin")
    message = str(err.value)
    assert "\n" not in message and "throttled" in message and proxy.url in message
    assert "PIXELDIT_S3_MAX_ATTEMPTS" in message and "3 attempts" in message
    assert proxy.requests() == 3


# ---- every command that opens S3, against an endpoint that never answers and one that refuses -------------


def _commands(tmp_path: Path) -> dict[str, list[str]]:
    """Each console script that opens S3, as `python -m` (the venv's scripts point at the lead's checkout)."""
    stage = {"name": "s", "steps": 2, "data_path": "s3://bkt/data", "resolution": 32, "bucket_align": 16,
             "micro_batch": 2}
    config = {"run_dir": str(tmp_path / "run"), "model": {"size": "debug"}, "stages": [stage],
              "logging": {"wandb": "disabled", "progress_bar": False}, "data": {"num_workers": 0}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    # a run folder as the trainer leaves it, for the ledger (which reads the dataset to replay the plan)
    run_dir = tmp_path / "trained"
    step = run_dir / "checkpoints" / "step_00000001"
    step.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump({**config, "run_dir": str(run_dir)}))
    segment = {"stage": 0, "step": 0, "epoch": 0, "batch": 0, "micro": 0, "global_batch": 2, "grad_accum": 1,
               "sources": [], "left_out": {}}
    (step / "meta.json").write_text(json.dumps({"step": 1, "world_size": 1, "data_segments": [segment]}))
    (run_dir / "checkpoints" / "latest").write_text("step_00000001")
    (tmp_path / "ingest").mkdir()
    data = [sys.executable, "-m", "data_pipeline.cli"]
    return {
        "pixeldit-data stats": data + ["stats", "s3://bkt/data"],
        "pixeldit-data shard": data + ["shard", str(tmp_path / "ingest"), "--out", "s3://bkt/out"],
        "pixeldit-data ingest": data + ["ingest", "s3://bkt/urls.parquet", "--out", str(tmp_path / "ingested")],
        "pixeldit-train": [sys.executable, "-m", "pixeldit.train.cli", "--config", str(tmp_path / "run.yaml")],
        "pixeldit-ledger": [sys.executable, "-m", "pixeldit.train.ledger", str(run_dir), "--step", "1"],
    }


@pytest.mark.slow
@pytest.mark.parametrize("endpoint_kind", ["silent", "refused"])
def test_every_s3_command_ends_in_one_line_within_the_bound(tmp_path, endpoint_kind):
    bound = S3Settings(connect_timeout_s=1, read_timeout_s=1, max_attempts=2, backoff_s=0.1).worst_case_s()
    with (silent_endpoint() if endpoint_kind == "silent" else _refused()) as url:
        env = {**os.environ, **FAST_S3, "AWS_ENDPOINT_URL": url, "AWS_ACCESS_KEY_ID": "testing",
               "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1", "DS_ACCELERATOR": "cpu",
               "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
        for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "PIXELDIT_TRACEBACK"):
            env.pop(k, None)
        procs = {}
        for name, cmd in _commands(tmp_path).items():  # all at once: most of the time is start-up imports
            procs[name] = (time.time(), subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                                                         stderr=subprocess.PIPE, text=True))
        for name, (start, proc) in procs.items():
            out, err = proc.communicate(timeout=300)
            lines = [line for line in err.splitlines() if line.strip()]
            prog = name.split()[0]
            assert proc.returncode == 2, f"{name}: rc {proc.returncode}\n{err[-3000:]}"
            assert "Traceback" not in err, f"{name}:\n{err[-3000:]}"
            last = lines[-1]
            assert last.startswith(f"{prog}: error: ") and url in last, f"{name}: {last}"
            setting = "PIXELDIT_S3_READ_TIMEOUT_S" if endpoint_kind == "silent" else "AWS_ENDPOINT_URL"
            assert setting in last, f"{name}: {last}"
            spent = float(re.search(r"attempts in ([0-9.]+) s", last).group(1))
            assert spent <= bound + 1.0, f"{name}: {spent} s on S3 (bound {bound} s): {last}"


class _refused:
    def __enter__(self) -> str:
        return refused_url()

    def __exit__(self, *exc) -> None:
        pass
