"""The one typed run configuration of a training run.

A ``RunConfig`` tree of dataclasses is built from defaults, then a YAML file, then dotted CLI overrides
(``stages.1.lr=5e-5``; CLI > file > defaults), validated up front and saved into the run folder
(``{run_dir}/config.yaml``). The progressive curriculum is ``stages``: a list of ``StageConfig``, each with
its own steps, batch, LR, data path, bucket table and time shift. DeepSpeed settings that also live here
(micro batch, accumulation, precision, gradient clipping) are filled into / checked against the ZeRO JSON
in ``ds_configs/`` by ``pixeldit.train.ds_config.build_ds_config``. ``validate`` checks the config on its
own (every error a ``ConfigError`` naming the key); ``pixeldit.train.preflight`` also checks the files it
names before anything starts.

Example (YAML)::

    run_dir: runs/t2i
    model: {size: T2I}
    deepspeed: {zero: zero2, precision: bf16}
    stages:
      - {name: s512-fixed, steps: 100000, data_path: s3://bkt/data, resolution: 512, buckets: fixed,
         micro_batch: 32, lr: 1.0e-4, warmup_steps: 2000, shift: 3.0, repa: true}
      - {name: s512-aspect, steps: 50000, data_path: s3://bkt/data, resolution: 512, buckets: aspect, shift: 3.0}
      - {name: s1024, steps: 30000, resolution: 1024, buckets: aspect, micro_batch: 8, lr: 5.0e-5, shift: 4.0,
         grad_checkpointing: true, sources: [{path: s3://bkt/data, weight: 3}, {path: s3://bkt/hq, weight: 1}]}
    data: {num_workers: 8, cache_dir: /local/nvme/pixeldit-cache, cache_max_gb: 500, s3: {read_timeout_s: 30}}
    distributed: {startup_timeout_s: 1800, step_timeout_s: 300, sigterm_grace_s: 3}
    node_check: {enabled: true, allreduce_mb: 64, read_mb: 16, disk_fail_checkpoints: 1.5}
    straggler: {every: 50, threshold: 0.2, windows: 3}

Node-health sections (issue 17): ``distributed`` (collective timeouts for start-up / after the first step, the
SIGTERM grace: ``pixeldit.train.collectives``, ``pixeldit.train.signals``), ``node_check`` (the runtime preflight
on every start: matmul, all-reduce bandwidth, free disk, data read rate; ``pixeldit.train.node_check``) and
``straggler`` (per-rank step-time windows; ``pixeldit.train.stragglers``); each key is commented at its field.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from pixeldit.errors import ConfigError
from pixeldit.storage import redact_options, write_text_atomic

from .checks import validate
from .schema import (
    BucketMode, CameSection, CheckpointConfig, CompileBackend, CompileSection, ConditioningConfig, DataSection,
    DataSource, DeepSpeedSection, DistributedSection, LoggingConfig, ModelConfig, NodeCheckSection, OptimConfig,
    OptimizerName, Precision, RunConfig, Schedule, SpikeSection, StageConfig, StragglerSection, TextMode,
    ValidationConfig, VerifyMode, WandbMode, ZeroConfig,
)
from .tree import apply_override, dataclass_from_dict, to_dict

__all__ = [  # the sections and choices (schema.py), loading and saving (here), validate (checks.py)
    'BucketMode', 'CameSection', 'CheckpointConfig', 'CompileBackend', 'CompileSection', 'ConditioningConfig',
    'DataSection', 'DataSource', 'DeepSpeedSection', 'DistributedSection', 'LoggingConfig', 'ModelConfig',
    'NodeCheckSection', 'OptimConfig', 'OptimizerName', 'Precision', 'RunConfig', 'Schedule', 'SpikeSection',
    'StageConfig', 'StragglerSection', 'TextMode', 'ValidationConfig', 'VerifyMode', 'WandbMode', 'ZeroConfig',
    'apply_override', 'from_dict', 'load_config', 'save_config', 'to_dict', 'to_saved_dict', 'validate',
]


def from_dict(data: dict[str, Any]) -> RunConfig:
    return dataclass_from_dict(RunConfig, data)


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Defaults < YAML file at ``path`` < dotted ``overrides``; validated."""
    tree = to_dict(RunConfig())
    if path is not None:
        if not Path(path).is_file():
            raise FileNotFoundError(f"run config {path} not found (--config)")
        try:
            loaded = yaml.safe_load(Path(path).read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping of config keys")
        try:
            tree = to_dict(dataclass_from_dict(RunConfig, loaded))  # type-checked; unset keys keep their defaults
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
    for ov in overrides:
        apply_override(tree, ov)
    cfg = from_dict(tree)
    validate(cfg)
    return cfg


def to_saved_dict(cfg: RunConfig) -> dict[str, Any]:
    """The config as it may be written anywhere (config.yaml, launcher files, wandb): credentials in
    ``data.storage_options`` replaced by ``pixeldit.storage.REDACTED``."""
    tree = to_dict(cfg)
    tree["data"]["storage_options"] = redact_options(tree["data"]["storage_options"])
    return tree


def save_config(cfg: RunConfig, path: str | os.PathLike) -> None:
    """Write the config (credentials redacted) as YAML atomically (``pixeldit.storage.write_text_atomic``)."""
    write_text_atomic(path, yaml.safe_dump(to_saved_dict(cfg), sort_keys=False))
