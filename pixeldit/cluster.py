"""Where and how a job runs: the launch config, its command-line flags, submitit executors, job states.

Shared by ``pixeldit-submit`` (launchers: training jobs) and ``pixeldit-data`` (data_pipeline: ingest and
shard job arrays), so both take the same flags with the same meaning and defaults, defined once here.
This module imports no trainer and no data code (submitit only when an executor is built).

    cfg = LaunchConfig(cluster="slurm", partition="cpu", time_min=240, cpus_per_task=8, mem_gb=32)
    executor = make_executor(cfg, folder)          # submitit.AutoExecutor (SLURM) or LocalExecutor
    add_launch_flags(parser)                        # --cluster --partition --time-min ... onto argparse
    cfg = launch_config_from_args(parser.parse_args())

``LaunchConfig`` is separate from the run config (``pixeldit.train.config.RunConfig``): the same run config
trains on a laptop, one 8-GPU machine or 64 SLURM nodes; only this object changes. The training launcher
saves it as ``{run_dir}/launcher/launch.json`` at every submission.

``free_port`` / ``port_is_free``: the TCP ports a job's process group may listen on (the trainer's single-rank
default, the launcher's MASTER_PORT check).

Job states, read from outside the job: ``slurm_states`` (``sacct``, then ``squeue -r`` for jobs and array tasks
that accounting does not list yet) and ``local_job_alive`` (submitit's local controller process).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import socket
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

from pixeldit.storage import credential_env_names, write_text_atomic

Cluster = Literal["local", "slurm"]
CLUSTERS: tuple[str, ...] = get_args(Cluster)
LOCAL_MAX_REQUEUES = 5  # submitit's local controller starts a job at most 6 times
LOCAL_NO_LIMIT_MIN = 60 * 24 * 365  # time_min=0 on the local executor: no practical limit


@dataclass
class LaunchConfig:
    """Resources and behaviour of a submitted job.

    One task per accelerator: ``tasks_per_node`` defaults to ``gpus_per_node`` (or 1 on CPU). A training run's
    whole curriculum (every stage of the run config) runs inside one job; on preemption or time limit the job
    saves, requeues itself (at most ``max_requeues`` times) and resumes from the run's latest checkpoint. A data
    build uses one single-task job per array task (nodes, GPUs and the training knobs keep their defaults).
    """

    cluster: Cluster = "local"  # local: submitit's local executor on this machine (no SLURM)
    nodes: int = 1
    gpus_per_node: int = 0
    tasks_per_node: int = 0  # 0: = gpus_per_node, or 1 without GPUs
    cpus_per_task: int = 1
    mem_gb: float = 0.0  # per node; 0: the cluster's default
    partition: str = ""
    account: str = ""
    qos: str = ""
    constraint: str = ""
    time_min: int = 0  # wall-clock limit of one job (sbatch --time); 0: none (local only, required on SLURM)
    job_name: str = "pixeldit"
    max_requeues: int = 3  # requeues after a saved stop (USR2: preemption / time limit), per job
    # failures (a trainer killed, crashed or hung; launchers.supervisor): requeues after them, per job, apart
    # from max_requeues; the n-th waits failure_backoff_s * 2**(n-1) (at most failure_backoff_max_s) to start
    max_failures: int = 2
    failure_backoff_s: float = 30.0
    failure_backoff_max_s: float = 600.0
    # the watchdog: a trainer with no new heartbeat for max(watchdog_floor_s, watchdog_factor x its median step
    # time) is hung (its stacks are dumped, it is killed: a failure); before its first step (each stage's
    # start-up: engine, checkpoint load, compilation) it gets watchdog_startup_s. The floor covers the longest
    # checkpoint save or validation pass.
    watchdog_floor_s: float = 600.0
    watchdog_factor: float = 10.0
    watchdog_startup_s: float = 1800.0
    signal_delay_s: int = 120  # USR2 comes this long before the limit: > one step + one checkpoint save
    master_port: int = 0  # 0: derived from the job id (same on every task, differs between jobs)
    extra_sbatch: dict[str, Any] = field(default_factory=dict)  # other sbatch options, e.g. {"exclusive": True}
    env: dict[str, str] = field(default_factory=dict)  # environment set in every task before its work starts

    def __post_init__(self) -> None:
        if self.cluster not in CLUSTERS:
            raise ValueError(f"launch config: cluster={self.cluster!r}; valid values: {', '.join(CLUSTERS)}")
        for name in ("nodes", "cpus_per_task"):
            if getattr(self, name) < 1:
                raise ValueError(f"launch config: {name} must be >= 1, got {getattr(self, name)}")
        for name in ("gpus_per_node", "tasks_per_node", "time_min", "max_requeues", "signal_delay_s", "mem_gb",
                     "max_failures", "failure_backoff_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"launch config: {name} must be >= 0, got {getattr(self, name)}")
        for name in ("watchdog_floor_s", "watchdog_factor", "watchdog_startup_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"launch config: {name} must be > 0, got {getattr(self, name)}")
        if self.failure_backoff_max_s < self.failure_backoff_s:
            raise ValueError(f"launch config: failure_backoff_max_s ({self.failure_backoff_max_s}) must be >= "
                             f"failure_backoff_s ({self.failure_backoff_s}), the first backoff")
        secret_env = credential_env_names(self.env)
        if secret_env:
            raise ValueError(f"launch config: env sets {secret_env}, which look like credentials; launch.json and the "
                             f"job pickle are saved with the run, so export them in the submitting shell instead "
                             f"(the job inherits the environment)")
        if not 0 <= self.master_port < 65536:
            raise ValueError(f"launch config: master_port must be in 0..65535 (0: from the job id), "
                             f"got {self.master_port}")
        if self.cluster == "slurm" and self.time_min == 0:
            raise ValueError("launch config: time_min (sbatch --time, minutes) is required on SLURM; the job "
                             "saves and requeues itself at the limit, so the partition's maximum is a good value")
        if self.cluster == "local":
            if self.nodes != 1:
                raise ValueError(f"launch config: the local executor runs on one node (nodes=1), got "
                                 f"nodes={self.nodes}; use cluster=slurm for several nodes")
            if self.max_requeues > LOCAL_MAX_REQUEUES:
                raise ValueError(f"launch config: the local executor requeues a job at most "
                                 f"{LOCAL_MAX_REQUEUES} times, got max_requeues={self.max_requeues}")
            if self.max_requeues + self.max_failures > LOCAL_MAX_REQUEUES:
                raise ValueError(f"launch config: the local executor requeues a job at most {LOCAL_MAX_REQUEUES} "
                                 f"times in all, got max_requeues={self.max_requeues} + max_failures="
                                 f"{self.max_failures}; lower one of them")

    @property
    def ntasks_per_node(self) -> int:
        return self.tasks_per_node or self.gpus_per_node or 1

    @property
    def world_size(self) -> int:
        return self.nodes * self.ntasks_per_node

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LaunchConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown launch config keys {unknown}; valid keys: {sorted(known)}")
        return cls(**d)

    def save(self, path: Path) -> None:
        """Atomic JSON write (``pixeldit.storage.write_text_atomic``)."""
        write_text_atomic(path, json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: Path) -> "LaunchConfig":
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (ValueError, TypeError) as e:
            raise ValueError(f"{path}: {e}") from e


def executor_parameters(cfg: LaunchConfig) -> dict[str, Any]:
    """``update_parameters`` keywords: of ``submitit.LocalExecutor`` (local) or ``submitit.AutoExecutor`` (SLURM)."""
    timeout_min = cfg.time_min or LOCAL_NO_LIMIT_MIN
    if cfg.cluster == "local":  # cpus and memory are the machine's; the controller sends USR2 before the limit
        return {"tasks_per_node": cfg.ntasks_per_node, "gpus_per_node": cfg.gpus_per_node,
                "timeout_min": timeout_min, "signal_delay_s": cfg.signal_delay_s}
    params: dict[str, Any] = {
        "nodes": cfg.nodes,
        "tasks_per_node": cfg.ntasks_per_node,
        "cpus_per_task": cfg.cpus_per_task,
        "timeout_min": timeout_min,
        "name": cfg.job_name,
        "slurm_signal_delay_s": cfg.signal_delay_s,
        # --requeue: the job may be requeued (by us after a saved stop, or by SLURM on node failure/preemption)
        "slurm_additional_parameters": {"requeue": True, **cfg.extra_sbatch},
    }
    if cfg.gpus_per_node:
        params["gpus_per_node"] = cfg.gpus_per_node
    if cfg.mem_gb:
        params["mem_gb"] = cfg.mem_gb
    for key in ("partition", "account", "qos", "constraint"):
        if getattr(cfg, key):
            params[f"slurm_{key}"] = getattr(cfg, key)
    return params


def make_executor(launch: LaunchConfig, folder: Path | str):
    """submitit executor for the config; the cluster is always named (AutoExecutor picks SLURM if srun exists).

    ``folder`` receives submitit's pickles and logs; on SLURM it must be on a filesystem every node sees."""
    import submitit

    if launch.cluster == "local":
        executor = submitit.LocalExecutor(folder=str(folder))
    else:
        executor = submitit.AutoExecutor(folder=str(folder), cluster="slurm")
    executor.update_parameters(**executor_parameters(launch))
    return executor


# ---- command-line flags: the one definition of every launch flag --------------------------------------------


def parse_key_value(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"{text!r}: expected KEY=VALUE")
    k, v = text.split("=", 1)
    return k, v


def _sbatch(text: str) -> tuple[str, str | bool]:
    """--sbatch exclusive -> ("exclusive", True); --sbatch mail-type=END -> ("mail-type", "END")."""
    k, sep, v = text.partition("=")
    return k, (v if sep else True)


# flags for the resources of one task: every job (training and data builds)
RESOURCE_FLAGS = ("cluster", "cpus_per_task", "mem_gb", "partition", "account", "qos", "constraint", "time_min",
                  "job_name", "sbatch", "env")
# flags only a training job has (several nodes and GPUs, requeue after a saved stop, rendezvous port)
TRAINING_FLAGS = ("nodes", "gpus_per_node", "tasks_per_node", "max_requeues", "signal_delay_s", "master_port",
                  "max_failures", "failure_backoff_s", "failure_backoff_max_s", "watchdog_floor_s", "watchdog_factor",
                  "watchdog_startup_s")


def add_launch_flags(parser: argparse.ArgumentParser | Any, names: tuple[str, ...] = RESOURCE_FLAGS + TRAINING_FLAGS,
                     cluster_default: str | None = "local") -> None:
    """Add the launch flags ``names`` (LaunchConfig field names, plus "sbatch" and "env") to an argparse parser
    or group; defaults are LaunchConfig's. ``cluster_default=None``: no --cluster means "not submitted"."""
    d = LaunchConfig()
    flags: dict[str, tuple[tuple[Any, ...], dict[str, Any]]] = {
        "cluster": (("--cluster",), dict(choices=CLUSTERS, default=cluster_default,
                                         help=("local: submitit's local executor on this machine; slurm: a SLURM "
                                               "job" + ("" if cluster_default else " (default: run in this process)")))),
        "nodes": (("--nodes",), dict(type=int, default=d.nodes)),
        "gpus_per_node": (("--gpus-per-node",), dict(type=int, default=d.gpus_per_node)),
        "tasks_per_node": (("--tasks-per-node",), dict(type=int, default=d.tasks_per_node,
                                                       help="default: one per GPU, or 1")),
        "cpus_per_task": (("--cpus-per-task",), dict(type=int, default=d.cpus_per_task)),
        "mem_gb": (("--mem-gb",), dict(type=float, default=d.mem_gb, help="per node (0: the cluster's default)")),
        "partition": (("--partition",), dict(default=d.partition)),
        "account": (("--account",), dict(default=d.account)),
        "qos": (("--qos",), dict(default=d.qos)),
        "constraint": (("--constraint",), dict(default=d.constraint)),
        "time_min": (("--time-min",), dict(type=int, default=d.time_min,
                                           help="time limit of one job in minutes (required on SLURM)")),
        "job_name": (("--job-name",), dict(default=d.job_name)),
        "max_requeues": (("--max-requeues",), dict(type=int, default=d.max_requeues,
                                                   help="requeues after a saved stop, per job")),
        "signal_delay_s": (("--signal-delay-s",), dict(type=int, default=d.signal_delay_s,
                                                       help="USR2 this long before the time limit")),
        "master_port": (("--master-port",), dict(type=int, default=d.master_port,
                                                 help="default: derived from the job id")),
        "max_failures": (("--max-failures",), dict(type=int, default=d.max_failures,
                                                   help="requeues after a failed attempt (killed, crashed, hung), "
                                                        "per job")),
        "failure_backoff_s": (("--failure-backoff-s",), dict(type=float, default=d.failure_backoff_s,
                                                             help="wait before the first restart after a failure "
                                                                  "(doubled after each further one)")),
        "failure_backoff_max_s": (("--failure-backoff-max-s",), dict(type=float, default=d.failure_backoff_max_s)),
        "watchdog_floor_s": (("--watchdog-floor-s",), dict(type=float, default=d.watchdog_floor_s,
                                                           help="a trainer silent this long is hung (at least; "
                                                                "> the longest checkpoint save)")),
        "watchdog_factor": (("--watchdog-factor",), dict(type=float, default=d.watchdog_factor,
                                                         help="... or this many median step times, if longer")),
        "watchdog_startup_s": (("--watchdog-startup-s",), dict(type=float, default=d.watchdog_startup_s,
                                                               help="allowed before the first step of a stage")),
        "sbatch": (("--sbatch",), dict(type=_sbatch, action="append", default=[], metavar="KEY[=VALUE]",
                                       help="any other sbatch option, e.g. --sbatch exclusive --sbatch mail-type=END")),
        "env": (("--env",), dict(type=parse_key_value, action="append", default=[], metavar="KEY=VALUE",
                                 help="environment variable for every task")),
    }
    unknown = sorted(set(names) - set(flags))
    if unknown:
        raise ValueError(f"add_launch_flags: unknown flags {unknown}; valid: {sorted(flags)}")
    for name in names:
        args, kwargs = flags[name]
        parser.add_argument(*args, dest=name, **kwargs)


def launch_config_from_args(a: argparse.Namespace) -> LaunchConfig:
    """The LaunchConfig of parsed launch flags (flags a parser did not add keep LaunchConfig's defaults)."""
    known = {f.name for f in dataclasses.fields(LaunchConfig)}
    values = {k: v for k, v in vars(a).items() if k in known and k not in ("extra_sbatch", "env")}
    if values.get("cluster") is None:
        values.pop("cluster", None)
    return LaunchConfig(**values, extra_sbatch=dict(getattr(a, "sbatch", []) or []),
                        env=dict(getattr(a, "env", []) or []))


# ---- job states, read from outside the job ------------------------------------------------------------------

# SLURM states of a job that is not over (it may still run, or run again)
SLURM_ACTIVE = frozenset({"PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESIZING",
                          "SUSPENDED", "CONFIGURING", "COMPLETING", "STOPPED", "SIGNALING", "STAGE_OUT",
                          "RESV_DEL_HOLD", "SPECIAL_EXIT"})
LOCAL_ACTIVE = frozenset({"RUNNING"})


def run_slurm_command(cmd: list[str]) -> str:
    """stdout of a SLURM client command; empty when it is missing or fails (the caller falls back)."""
    if shutil.which(cmd[0]) is None:
        return ""
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""


def slurm_states(job_ids: list[str]) -> dict[str, str]:
    """SLURM state of jobs or array tasks ("123" or "123_4"), "UNKNOWN" when neither sacct nor squeue knows it.

    One ``sacct`` call for all of them (the latest run of a requeued job wins), then one ``squeue -r`` for the
    rest (pending array tasks are listed one per line there, while accounting folds them into "123_[1-4]")."""
    wanted = [str(j) for j in job_ids]
    if not wanted:
        return {}
    parents = sorted({j.split("_")[0] for j in wanted})
    found: dict[str, str] = {}
    for line in run_slurm_command(["sacct", "-n", "-X", "-P", "-j", ",".join(parents), "-o", "JobID,State"]).splitlines():
        jid, _, state = line.partition("|")
        if state:
            found[jid] = state.split()[0]  # "CANCELLED by 0" -> CANCELLED
    missing = [j for j in wanted if j not in found]
    if missing:
        for line in run_slurm_command(["squeue", "-h", "-r", "-j", ",".join(parents), "-o", "%i|%T"]).splitlines():
            jid, _, state = line.strip().partition("|")
            if jid in missing and state:
                found[jid] = state
    return {j: found.get(j, "UNKNOWN") for j in wanted}


def slurm_state(job_id: str) -> str:
    """SLURM state of one job or array task ("123" or "123_4"); see ``slurm_states``."""
    return slurm_states([job_id])[str(job_id)]


def local_job_alive(job_id: str, folder: str) -> bool:
    """The local job's controller (pid = job id) is alive and is this job's (not a reused pid)."""
    try:
        cmdline = Path(f"/proc/{int(str(job_id).split('_')[0])}/cmdline").read_bytes().decode(errors="replace")
    except (OSError, ValueError):
        return False
    return "submitit.local._local" in cmdline and str(folder) in cmdline


def port_is_free(port: int) -> bool:
    """Whether a server socket can bind ``port`` on every address of this host (as the TCPStore does)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A TCP port free on every address of this host now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]
