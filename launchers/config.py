"""The launcher's typed config: where and how a training run is submitted (saved with the run)."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

Cluster = Literal["local", "slurm"]
CLUSTERS: tuple[str, ...] = ("local", "slurm")


@dataclass
class LaunchConfig:
    """Resources and behaviour of a submitted training job.

    One task per accelerator: ``tasks_per_node`` defaults to ``gpus_per_node`` (or 1 on CPU). The whole
    curriculum (every stage of the run config) runs inside one job; on preemption or time limit the job
    saves, requeues itself (at most ``max_requeues`` times) and resumes from the run's latest checkpoint.
    """

    cluster: Cluster = "local"
    nodes: int = 1
    gpus_per_node: int = 0
    tasks_per_node: int = 0  # 0: = gpus_per_node, or 1 without GPUs
    cpus_per_task: int = 1
    mem_gb: float = 0.0  # 0: the cluster's default
    partition: str = ""
    account: str = ""
    qos: str = ""
    constraint: str = ""
    time_min: int = 60
    job_name: str = "pixeldit"
    max_requeues: int = 3
    signal_delay_s: int = 120  # SLURM sends USR2 this long before the time limit
    master_port: int = 0  # 0: derived from the job id (same on every task)
    extra_sbatch: dict[str, Any] = field(default_factory=dict)  # any other sbatch option, e.g. {"exclusive": True}
    env: dict[str, str] = field(default_factory=dict)  # environment set in every task before training starts

    def __post_init__(self) -> None:
        if self.cluster not in CLUSTERS:
            raise ValueError(f"cluster={self.cluster!r}; valid values: {', '.join(CLUSTERS)}")
        for name in ("nodes", "cpus_per_task", "time_min"):
            if getattr(self, name) < 1:
                raise ValueError(f"launch config: {name} must be >= 1, got {getattr(self, name)}")
        if self.max_requeues < 0:
            raise ValueError(f"launch config: max_requeues must be >= 0, got {self.max_requeues}")
        if self.cluster == "local" and self.nodes != 1:
            raise ValueError("launch config: the local executor runs on one node (nodes=1)")

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
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=1))
        tmp.replace(path)


def executor_parameters(cfg: LaunchConfig) -> dict[str, Any]:
    """submitit ``update_parameters`` keywords for this config (cluster-specific keys prefixed)."""
    params: dict[str, Any] = {
        "nodes": cfg.nodes,
        "tasks_per_node": cfg.ntasks_per_node,
        "cpus_per_task": cfg.cpus_per_task,
        "timeout_min": cfg.time_min,
        "name": cfg.job_name,
    }
    if cfg.gpus_per_node:
        params["gpus_per_node"] = cfg.gpus_per_node
    if cfg.mem_gb:
        params["mem_gb"] = cfg.mem_gb
    if cfg.cluster == "slurm":
        for key in ("partition", "account", "qos", "constraint"):
            if getattr(cfg, key):
                params[f"slurm_{key}"] = getattr(cfg, key)
        params["slurm_signal_delay_s"] = cfg.signal_delay_s
        if cfg.extra_sbatch:
            params["slurm_additional_parameters"] = dict(cfg.extra_sbatch)
    return params
