"""The launcher's typed config: where and how a training run is submitted (saved with the run).

``LaunchConfig`` is separate from the run config (``pixeldit.train.config.RunConfig``): the same run config
trains on a laptop, one 8-GPU machine or 64 SLURM nodes; only this object changes. It is saved as
``{run_dir}/launcher/launch.json`` at every submission. It is defined, with its command-line flags and the
submitit executor it makes, in ``pixeldit.cluster`` (``pixeldit-data`` builds datasets with the same flags).
"""
from __future__ import annotations

from pixeldit.cluster import CLUSTERS, LOCAL_MAX_REQUEUES, LOCAL_NO_LIMIT_MIN, Cluster, LaunchConfig, executor_parameters

__all__ = ["CLUSTERS", "LOCAL_MAX_REQUEUES", "LOCAL_NO_LIMIT_MIN", "Cluster", "LaunchConfig", "executor_parameters"]
