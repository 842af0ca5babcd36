"""Fast launcher units (no job runs): launch config, the sbatch script it makes, the distributed environment
of a task, array sweeps, the job registry and the CLI's flags."""
from __future__ import annotations

import json
import pickle
import socket
from pathlib import Path

import pytest

from launchers.cli import build_parser, launch_config
from launchers.config import LaunchConfig, executor_parameters
from launchers.job import read_requeues, set_distributed_env, write_requeues
from launchers.manage import format_status
from launchers.registry import job_row, local_state, read_jobs, record_jobs
from launchers.rendezvous import PORT_FILE, agree_master_port, port_from_job_id
from pixeldit.cluster import port_is_free
from launchers.submit import make_executor, sweep_overrides


def test_launch_config_errors_name_valid_values():
    with pytest.raises(ValueError, match="valid values: local, slurm"):
        LaunchConfig(cluster="kubernetes")
    with pytest.raises(ValueError, match="nodes=1"):
        LaunchConfig(cluster="local", nodes=2)
    with pytest.raises(ValueError, match="time_min .* required on SLURM"):
        LaunchConfig(cluster="slurm")
    with pytest.raises(ValueError, match="at most 5 times"):
        LaunchConfig(cluster="local", max_requeues=6)
    with pytest.raises(ValueError, match="unknown launch config keys \\['gpus'\\]"):
        LaunchConfig.from_dict({"gpus": 8})


def test_launch_config_round_trips_through_the_run_folder(tmp_path):
    cfg = LaunchConfig(cluster="slurm", nodes=2, gpus_per_node=8, time_min=60, extra_sbatch={"exclusive": True},
                       env={"NCCL_DEBUG": "WARN"})
    cfg.save(tmp_path / "launch.json")
    assert LaunchConfig.load(tmp_path / "launch.json") == cfg
    assert cfg.ntasks_per_node == 8 and cfg.world_size == 16  # one task per GPU
    assert LaunchConfig().ntasks_per_node == 1


def test_sbatch_script_carries_every_resource_flag(tmp_path):
    cfg = LaunchConfig(cluster="slurm", nodes=2, gpus_per_node=8, cpus_per_task=12, mem_gb=900, partition="gpu",
                       account="proj", qos="high", constraint="h100", time_min=2880, signal_delay_s=300,
                       extra_sbatch={"exclusive": True, "mail-type": "END"})
    text = make_executor(cfg, tmp_path)._executor._make_submission_file_text("python -m x", "uid")
    for flag in ("--nodes=2", "--ntasks-per-node=8", "--gpus-per-node=8", "--cpus-per-task=12", "--mem=900GB",
                 "--partition=gpu", "--account=proj", "--qos=high", "--constraint=h100", "--time=2880",
                 "--signal=USR2@300", "--requeue", "--exclusive", "--mail-type=END", "--job-name=pixeldit"):
        assert f"#SBATCH {flag}\n" in text, flag
    assert f"--output {tmp_path}/%j_%t_log.out" in text  # logs of every task in the submission folder


def test_local_executor_parameters():
    params = executor_parameters(LaunchConfig(tasks_per_node=2, signal_delay_s=30))
    assert params["tasks_per_node"] == 2 and params["signal_delay_s"] == 30
    assert params["timeout_min"] >= 60 * 24 * 365  # time_min=0: no limit on one machine


def test_distributed_env_comes_from_slurm(monkeypatch):
    for k, v in {"SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": "4242", "SLURM_NTASKS": "16",
                 "SLURM_JOB_NUM_NODES": "2", "SLURM_NODEID": "1", "SLURM_PROCID": "11", "SLURM_LOCALID": "3",
                 "SLURM_JOB_NODELIST": "gpu-[007,012]"}.items():
        monkeypatch.setenv(k, v)
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(k, "")  # recorded, so that what set_distributed_env writes is undone after the test
        monkeypatch.delenv(k)
    env = set_distributed_env(LaunchConfig())
    assert env == {"RANK": "11", "LOCAL_RANK": "3", "WORLD_SIZE": "16", "LOCAL_WORLD_SIZE": "8",
                   "MASTER_ADDR": "gpu-007", "MASTER_PORT": str(port_from_job_id("4242"))}
    assert set_distributed_env(LaunchConfig(master_port=29500))["MASTER_PORT"] == "29500"


def test_ports_differ_between_jobs_and_array_tasks():
    ports = {port_from_job_id(j) for j in range(1000, 1100)}
    assert len(ports) == 100 and all(20000 <= p < 32000 for p in ports)  # below the ephemeral range
    assert port_from_job_id("77_3") != port_from_job_id("77_4")


def test_rank_0_moves_off_a_taken_port_and_the_others_follow(tmp_path):
    job = next(j for j in range(5000, 6000) if port_is_free(port_from_job_id(j)))
    with socket.socket() as taken:  # another program listens on the derived port
        taken.bind(("", port_from_job_id(job)))
        taken.listen()
        port, note = agree_master_port(tmp_path, str(job), str(job), 0, rank=0, wait_s=1)
        assert port != port_from_job_id(job) and f"MASTER_PORT {port_from_job_id(job)} (derived from job id {job}) " \
            f"is in use" in note
    assert agree_master_port(tmp_path, str(job), str(job), 0, rank=1, wait_s=1) == (port, None)
    # the next attempt: the derived port is free again, and rank 0 says nothing
    assert agree_master_port(tmp_path, str(job), str(job), 1, rank=0, wait_s=1) == (port_from_job_id(job), None)
    assert (tmp_path / PORT_FILE.format(job_id=job, attempt=1)).read_text() == str(port_from_job_id(job))
    with pytest.raises(TimeoutError, match=r"rank 2: rank 0 did not write the master port into .*_attempt7 within "
                                           r"0 s .*set launch.master_port"):
        agree_master_port(tmp_path, str(job), str(job), 7, rank=2, wait_s=0.3)



def test_sweep_gives_every_array_task_its_own_run_dir():
    tasks = sweep_overrides("/runs/t2i", [("seed", ["1", "2"]), ("stages.0.lr", ["1e-4", "2e-4"])])
    assert len(tasks) == 4
    assert tasks[0] == ["seed=1", "stages.0.lr=1e-4", "run_dir=/runs/t2i/seed-1_stages-0-lr-1e-4"]
    assert len({t[-1] for t in tasks}) == 4
    with pytest.raises(ValueError, match="no values"):
        sweep_overrides("/runs/x", [("seed", [])])


def test_registry_and_local_state_from_outside_the_job(tmp_path):
    run, folder = tmp_path / "run", tmp_path / "run" / "slurm" / "a"
    folder.mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no job was submitted"):
        read_jobs(run)
    record_jobs(run, ["111", "222"], "local", folder)
    first, second = read_jobs(run)
    assert local_state(first) == "INTERRUPTED"  # no controller, no result: it ended without finishing
    with open(folder / "222_0_result.pkl", "wb") as f:
        pickle.dump(("success", {"status": "finished", "step": 8}), f)
    write_requeues(folder, "222", 2)
    row = job_row(second)
    assert (row["state"], row["result"], row["requeues"]) == ("FINISHED", "finished", 2)
    assert read_requeues(folder, "111") == 0
    assert json.loads((run / "launcher" / "jobs.jsonl").read_text().splitlines()[1])["job_id"] == "222"


def test_status_table_shows_whole_results():
    """Issue 12.7: the result column was cut to 10 characters ("stopped: m")."""
    long = "stopped: max requeues reached (submit the run again to continue)"
    rows = [{"job_id": "7", "cluster": "local", "state": "FINISHED", "result": long, "requeues": 5,
             "submitted": "2026-01-01T00:00:00", "folder": "/runs/x/slurm/a"},
            {"job_id": "123456_7", "cluster": "slurm", "state": "RUNNING", "result": "", "requeues": 0,
             "submitted": "2026-01-01T00:00:01", "folder": "/runs/x/slurm/b"}]
    head, first, second = format_status(rows).splitlines()
    assert f"  {long}  " in first and first.endswith("/runs/x/slurm/a") and second.endswith("/runs/x/slurm/b")
    assert head.split() == ["job", "cluster", "state", "result", "requeues", "submitted", "folder"]
    assert head.index("requeues") == first.index(long) + len(long) + 2  # columns line up
    assert second.split()[:4] == ["123456_7", "slurm", "RUNNING", "-"]


def test_cli_flags_map_onto_the_launch_config():
    a = build_parser().parse_args([
        "submit", "--config", "run.yaml", "--cluster", "slurm", "--nodes", "4", "--gpus-per-node", "8",
        "--cpus-per-task", "12", "--mem-gb", "480", "--partition", "gpu", "--account", "proj", "--qos", "high",
        "--constraint", "h100", "--time-min", "2880", "--max-requeues", "10", "--sbatch", "exclusive",
        "--sbatch", "mail-type=END", "--env", "NCCL_DEBUG=WARN", "--array", "seed=1,2", "stages.0.lr=2e-4"])
    cfg = launch_config(a)
    assert (cfg.cluster, cfg.nodes, cfg.world_size, cfg.mem_gb, cfg.time_min, cfg.max_requeues) == \
        ("slurm", 4, 32, 480.0, 2880, 10)
    assert (cfg.partition, cfg.account, cfg.qos, cfg.constraint) == ("gpu", "proj", "high", "h100")
    assert cfg.extra_sbatch == {"exclusive": True, "mail-type": "END"} and cfg.env == {"NCCL_DEBUG": "WARN"}
    assert a.array == [("seed", ["1", "2"])] and a.overrides == ["stages.0.lr=2e-4"]
    assert launch_config(build_parser().parse_args(["submit"])) == LaunchConfig()  # flag defaults = config defaults


def test_submission_folders_never_collide(tmp_path):
    from launchers.submit import new_submission_folder

    folders = {new_submission_folder(tmp_path) for _ in range(50)}  # same second, same run
    assert len(folders) == 50 and all(f.parent == Path(tmp_path) / "slurm" for f in folders)


def test_cli_reports_config_and_run_folder_errors(capsys, tmp_path):
    from launchers.cli import main

    assert main(["submit", "--cluster", "slurm"]) == 2
    assert "time_min (sbatch --time, minutes) is required on SLURM" in capsys.readouterr().err
    assert main(["status", str(tmp_path)]) == 2
    assert "no job was submitted for run folder" in capsys.readouterr().err
