"""The launcher's typed config: where and how a training run is submitted (saved with the run).

``LaunchConfig`` is separate from the run config (``pixeldit.train.config.RunConfig``): the same run config
trains on a laptop, one 8-GPU machine or 64 SLURM nodes; only this object changes. It is saved as
``{run_dir}/launcher/launch.json`` at every submission.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

from pixeldit.storage import write_text_atomic

from pixeldit.storage import credential_env_names

Cluster = Literal["local", "slurm"]
CLUSTERS: tuple[str, ...] = get_args(Cluster)
LOCAL_MAX_REQUEUES = 5  # submitit's local controller starts a job at most 6 times
LOCAL_NO_LIMIT_MIN = 60 * 24 * 365  # time_min=0 on the local executor: no practical limit


@dataclass
class LaunchConfig:
    """Resources and behaviour of a submitted training job.

    One task per accelerator: ``tasks_per_node`` defaults to ``gpus_per_node`` (or 1 on CPU). The whole
    curriculum (every stage of the run config) runs inside one job; on preemption or time limit the job
    saves, requeues itself (at most ``max_requeues`` times) and resumes from the run's latest checkpoint.
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
    signal_delay_s: int = 120  # USR2 comes this long before the limit: > one step + one checkpoint save
    master_port: int = 0  # 0: derived from the job id (same on every task, differs between jobs)
    extra_sbatch: dict[str, Any] = field(default_factory=dict)  # other sbatch options, e.g. {"exclusive": True}
    env: dict[str, str] = field(default_factory=dict)  # environment set in every task before training starts

    def __post_init__(self) -> None:
        if self.cluster not in CLUSTERS:
            raise ValueError(f"launch config: cluster={self.cluster!r}; valid values: {', '.join(CLUSTERS)}")
        for name in ("nodes", "cpus_per_task"):
            if getattr(self, name) < 1:
                raise ValueError(f"launch config: {name} must be >= 1, got {getattr(self, name)}")
        for name in ("gpus_per_node", "tasks_per_node", "time_min", "max_requeues", "signal_delay_s", "mem_gb"):
            if getattr(self, name) < 0:
                raise ValueError(f"launch config: {name} must be >= 0, got {getattr(self, name)}")
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
