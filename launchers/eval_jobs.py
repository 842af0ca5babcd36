"""Evaluation tied to the scheduler: every K saved checkpoints, an eval job of its own runs ``pixeldit-eval``.

    evals = EvalJobConfig.load("eval.yaml")          # pixeldit-submit submit --config run.yaml --eval eval.yaml
    submit("run.yaml", LaunchConfig(cluster="slurm", ...), evals=evals)

eval.yaml::

    every: 2                      # every 2nd checkpoint: steps that are multiples of 2 * checkpoint.every, + the last
    launch: {cluster: slurm, gpus_per_node: 1, time_min: 60, partition: gpu}   # the eval job's own resources
    protocol: {prompts: classes, source: 0-999, images_per_prompt: 10, sampler: flow_unipc, steps: 32,
               metrics: [fid, fd_dinov2], reference: /data/imagenet-val, reference_images: 10000}
    resources: {inception: /w/inception-2015-12-05.pt, dinov2: /w/dinov2-large, batch_size: 64}

How (``EvalScheduler``, the trainer's ``on_checkpoint`` hook, on rank 0 of the training job):
 1. a checkpoint of step N is due when N is a multiple of ``every * checkpoint.every`` or the run's last step
    (a stop/preemption save in between is not); one whose ``{run_dir}/evals/step_N/job.json`` exists was
    submitted already (a requeued job saving the same step again submits nothing);
 2. the step's weights are pinned into ``{run_dir}/evals/step_N/checkpoint`` (``run_folder.pin_weights``: hard
    links, so pruning the step folder cannot take them away while the job waits in the queue);
 3. an ``EvalJob`` is submitted through submitit with the eval launch config (outside the training job's SLURM
    and distributed environment, ``submitit.helpers.clean_env``), logs in ``{run_dir}/evals/step_N/slurm``;
    a failed submission is said in one line and training goes on.
The eval job runs ``run_eval`` on the pinned folder under the pinned protocol (results in
``{run_dir}/evals/step_N/results.json``), appends ``{"step": N, "kind": "eval", metric: value, ...}`` to
``{run_dir}/metrics.jsonl``, logs ``eval/{metric}`` against ``eval/step`` = N into the run's wandb run, and
removes the pinned weights.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pixeldit import run_folder
from pixeldit.storage import write_json_atomic

from pixeldit.cluster import LaunchConfig, make_executor

JOB_FILE = "job.json"  # {run_dir}/evals/step_N/job.json: the submitted eval job
PINNED = "checkpoint"  # {run_dir}/evals/step_N/checkpoint: the pinned weights


@dataclass
class EvalJobConfig:
    """When eval jobs run, on what resources, under which protocol (``EvalProtocol`` / ``EvalResources`` fields)."""

    every: int = 1  # every K-th periodic checkpoint (steps multiple of every * checkpoint.every), and the last step
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    protocol: dict[str, Any] = field(default_factory=dict)  # pixeldit.evaluation.EvalProtocol fields
    resources: dict[str, Any] = field(default_factory=dict)  # pixeldit.evaluation.EvalResources fields

    def __post_init__(self) -> None:
        from pixeldit.evaluation import EvalProtocol, EvalResources

        if isinstance(self.launch, dict):
            self.launch = LaunchConfig.from_dict(self.launch)
        if self.launch.world_size != 1:
            raise ValueError(f"eval config: launch runs {self.launch.world_size} tasks; an eval job is one task "
                             f"(nodes: 1, tasks_per_node: 1; gpus_per_node: 1 on a GPU cluster)")
        if self.every < 1:
            raise ValueError(f"eval config: every={self.every} must be >= 1 (every K-th checkpoint)")
        for name, cls, values in (("protocol", EvalProtocol, self.protocol), ("resources", EvalResources,
                                                                              self.resources)):
            known = {f.name for f in dataclasses.fields(cls)}
            unknown = sorted(set(values) - known)
            if unknown:
                raise ValueError(f"eval config: unknown {name} keys {unknown}; valid keys: {sorted(known)}")
        protocol, resources = self.build()  # the protocol's own checks
        resources.check(protocol)  # and the weights its metrics need

    def build(self):
        """(EvalProtocol, EvalResources) of this config."""
        from pixeldit.evaluation import EvalProtocol, EvalResources

        return EvalProtocol(**self.protocol), EvalResources(**self.resources)

    def to_dict(self) -> dict[str, Any]:
        return {"every": self.every, "launch": self.launch.to_dict(), "protocol": dict(self.protocol),
                "resources": dict(self.resources)}

    @classmethod
    def load(cls, path: str | os.PathLike) -> "EvalJobConfig":
        """From a YAML (or JSON) file; every mistake names the file."""
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except OSError as err:
            raise FileNotFoundError(f"eval config {path}: {err.strerror}") from None
        except yaml.YAMLError as err:
            raise ValueError(f"eval config {path}: not valid YAML ({err})") from None
        known = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(data, dict) or set(data) - known:
            raise ValueError(f"eval config {path}: top-level keys must be among {sorted(known)}")
        try:
            return cls(**data)
        except (ValueError, TypeError) as err:
            raise ValueError(f"eval config {path}: {err}") from None


def due(step: int, checkpoint_every: int, every: int, last_step: int) -> bool:
    """Whether the checkpoint of ``step`` gets an eval job (module docstring, 1)."""
    return step % (checkpoint_every * every) == 0 or step == last_step


class EvalScheduler:
    """The ``on_checkpoint(step, step_dir)`` hook of the training job (rank 0): submits due eval jobs."""

    def __init__(self, run_dir: str | os.PathLike, evals: EvalJobConfig, checkpoint_every: int, last_step: int):
        self.run_dir, self.evals = Path(run_dir), evals
        self.checkpoint_every, self.last_step = checkpoint_every, last_step
        self.submitted: list[Any] = []  # submitit jobs submitted by this process

    def __call__(self, step: int, step_dir: Path) -> None:
        if not due(step, self.checkpoint_every, self.evals.every, self.last_step):
            return
        folder = run_folder.eval_dir(self.run_dir, step)
        if (folder / JOB_FILE).exists():
            return
        try:
            self.submitted.append(submit_eval(self.run_dir, step, Path(step_dir), self.evals))
        except Exception as err:  # noqa: BLE001 (a failed submission must not stop a training run)
            print(f"[launcher] eval of step {step} not submitted: {type(err).__name__}: {err}", file=sys.stderr,
                  flush=True)


def submit_eval(run_dir: Path, step: int, step_dir: Path, evals: EvalJobConfig):
    """Pin the step's weights and submit its eval job; returns the submitit job."""
    import submitit

    folder = run_folder.eval_dir(run_dir, step)
    pinned = run_folder.pin_weights(step_dir, folder / PINNED)
    job_folder = folder / "slurm"
    job_folder.mkdir(parents=True, exist_ok=True)
    launch = dataclasses.replace(evals.launch, job_name=f"{evals.launch.job_name}-eval-{step}")
    with submitit.helpers.clean_env():
        job = make_executor(launch, job_folder).submit(EvalJob(str(run_dir), step, str(pinned), evals.to_dict()))
    write_json_atomic(folder / JOB_FILE, {"job_id": str(job.job_id), "cluster": launch.cluster,
                                          "folder": str(job_folder), "submitted": time.strftime("%Y-%m-%dT%H:%M:%S")})
    print(f"[launcher] eval job {job.job_id} ({launch.cluster}) submitted for step {step}", flush=True)
    return job


@dataclass
class EvalJob:
    """The submitit callable of one eval job (module docstring)."""

    run_dir: str
    step: int
    pinned: str
    evals: dict[str, Any]

    def __call__(self) -> dict[str, Any]:
        from pixeldit.evaluation import run_eval

        protocol, resources = EvalJobConfig(**self.evals).build()
        out = run_folder.eval_dir(self.run_dir, self.step)
        result = run_eval(self.pinned, protocol, str(out), resources)
        record = {"step": self.step, "kind": "eval", **result["metrics"], "protocol_key": result["protocol_key"],
                  "sampling": result["sampling"], "images": result["num_images"],
                  "results": str(out / "results.json")}
        run_folder.append_metrics(self.run_dir, record)
        log_eval_to_wandb(Path(self.run_dir), self.step, result["metrics"])
        shutil.rmtree(self.pinned, ignore_errors=True)  # the weights were only kept for this job
        return record


def log_eval_to_wandb(run_dir: Path, step: int, metrics: dict[str, float]) -> bool:
    """Log ``eval/{metric}`` against ``eval/step`` = ``step`` into the training run's wandb run (its id in
    ``wandb_id.txt``, its mode and project in ``config.yaml``); False when the run has no wandb run. Online, the
    job joins the live run in wandb's shared mode (a secondary writer); offline, it writes an offline run of the
    same id that ``wandb sync`` adds to it."""
    id_file, config = run_dir / "wandb_id.txt", run_dir / run_folder.RUN_CONFIG
    if not id_file.exists() or not config.exists():
        return False
    logging = (yaml.safe_load(config.read_text()) or {}).get("logging") or {}
    mode = os.environ.get("WANDB_MODE") or logging.get("wandb", "offline")
    if mode == "disabled":
        return False
    import wandb

    settings = wandb.Settings(mode="shared", x_primary=False, x_label=f"eval-step{step}") if mode == "online" \
        else wandb.Settings(mode=mode)
    run = wandb.init(project=logging.get("project", "pixeldit"), id=id_file.read_text().strip(), resume="allow",
                     dir=str(run_folder.eval_dir(run_dir, step)), settings=settings)
    run.define_metric("eval/step")
    run.define_metric("eval/*", step_metric="eval/step")
    run.log({"eval/step": step, **{f"eval/{k}": v for k, v in metrics.items()}})
    run.finish()
    return True


def eval_results(run_dir: str | os.PathLike) -> dict[int, dict[str, Any]]:
    """{step: the last eval record of that step} of a run (``run_folder.read_metrics``)."""
    return {r["step"]: r for r in run_folder.read_metrics(run_dir) if r.get("kind") == "eval"}


RECORD_FIELDS = ("step", "kind", "protocol_key", "sampling", "images", "results")  # an eval record's non-metrics


def submitted_evals(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Every eval job submitted for the run, by step: ``{run_dir}/evals/step_N/job.json`` (job_id, cluster,
    folder, submitted) plus its ``step``; [] when none was."""
    out = []
    for folder in run_folder.step_dirs(Path(run_dir) / run_folder.EVALS):
        path = folder / JOB_FILE
        if path.exists():
            try:
                entry = json.loads(path.read_text())
            except json.JSONDecodeError as err:
                raise ValueError(f"{path} is not valid JSON ({err}); delete it to let the step's eval be "
                                 f"submitted again") from None
            out.append({**entry, "step": run_folder.step_of(folder)})
    return out


def metrics_text(record: dict[str, Any]) -> str:
    """``fid=12.3 clip_score=0.312`` of an eval record (its metrics, 4 significant digits)."""
    return " ".join(f"{k}={v:.4g}" for k, v in sorted(record.items())
                    if k not in RECORD_FIELDS and isinstance(v, (int, float)))
