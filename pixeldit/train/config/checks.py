"""``validate``: the run config checked on its own (no file read); every ``ConfigError`` names the key."""
from __future__ import annotations

from typing import Any

from data_pipeline.filters import parse_filter
from pixeldit.errors import ConfigError
from pixeldit.models import MODEL_SIZES
from pixeldit.s3 import resolve_s3_settings
from pixeldit.storage import REDACTED

from .schema import RunConfig
from .tree import leaves


def validate(cfg: RunConfig) -> None:
    """Check the config on its own (no file is read); a ``ConfigError`` names the key at fault."""
    if cfg.model.size not in MODEL_SIZES:
        raise ConfigError(f"model.size={cfg.model.size!r}; valid sizes: {', '.join(MODEL_SIZES)}")
    args = cfg.model.args()
    if not cfg.stages:
        raise ConfigError("stages: the curriculum needs at least one stage")
    names = [s.name for s in cfg.stages]
    if len(set(names)) != len(names):
        raise ConfigError(f"stages: stage names must be unique, got {names}")
    for i, s in enumerate(cfg.stages):
        where = f"stages.{i} ({s.name})"
        for key in ("steps", "micro_batch", "grad_accum", "resolution", "bucket_align"):
            if getattr(s, key) <= 0:
                raise ConfigError(f"{where}.{key}={getattr(s, key)} must be positive")
        if s.data_path and s.sources:
            raise ConfigError(f"{where}: set data_path (one root) or sources (several roots with weights), not both")
        if not s.data_path and not s.sources:
            raise ConfigError(f"{where}.data_path is empty: set the dataset root written by data_pipeline")
        for j, src in enumerate(s.sources):
            if not src.path or not src.weight > 0:
                raise ConfigError(f"{where}.sources.{j}: needs a path and a weight > 0, got {src.path!r}, "
                                  f"{src.weight}")
        paths = [src.path for src in s.data_sources()]
        if len(set(paths)) != len(paths):
            raise ConfigError(f"{where}.sources: a root appears twice ({paths}); give it one weight")
        for key, ok, rule in (("lr", s.lr > 0, "> 0"), ("warmup_steps", s.warmup_steps >= 0, ">= 0"),
                              ("min_lr_ratio", 0.0 <= s.min_lr_ratio <= 1.0, "in [0, 1]"),
                              ("shift", s.shift is None or s.shift > 0, "> 0"),
                              ("grad_clip", s.grad_clip is None or s.grad_clip >= 0, ">= 0 (0 = off)")):
            if not ok:
                raise ConfigError(f"{where}.{key}={getattr(s, key)} must be {rule}")
        if s.bucket_align % args.patch_size:
            raise ConfigError(f"{where}.bucket_align={s.bucket_align} must be a multiple of the patch size "
                              f"{args.patch_size} of model.size={cfg.model.size!r}")
        if s.resolution % s.bucket_align:
            raise ConfigError(f"{where}.resolution={s.resolution} must be a multiple of bucket_align="
                              f"{s.bucket_align} (itself a multiple of the patch size {args.patch_size})")
        if s.filter:
            try:
                parse_filter(s.filter)
            except ValueError as e:
                raise ConfigError(f"{where}.filter: {e}") from None
    if cfg.uses_repa and not cfg.conditioning.repa_teacher:
        raise ConfigError("conditioning.repa_teacher is empty but a stage has repa: true (set the DINOv2 path)")
    if args.conditioning == "text":
        c = cfg.conditioning
        if c.text_mode == "online" and not c.text_encoder:
            raise ConfigError("conditioning.text_encoder is empty: a text-to-image model with text_mode=online needs it")
    if not 0.0 < cfg.ema_decay < 1.0:
        raise ConfigError(f"ema_decay={cfg.ema_decay} must be in (0, 1)")
    d = cfg.data
    came = cfg.optim.came
    for key, value, ok, rule in (
        ("checkpoint.every", cfg.checkpoint.every, cfg.checkpoint.every > 0, "> 0"),
        ("checkpoint.keep", cfg.checkpoint.keep, cfg.checkpoint.keep > 0, "> 0"),
        ("max_consecutive_nonfinite", cfg.max_consecutive_nonfinite, cfg.max_consecutive_nonfinite > 0, "> 0"),
        ("logging.log_every", cfg.logging.log_every, cfg.logging.log_every > 0, "> 0"),
        ("logging.image_every", cfg.logging.image_every, cfg.logging.image_every >= 0, ">= 0 (0 = off)"),
        ("data.num_workers", d.num_workers, d.num_workers >= 0, ">= 0"),
        ("data.prefetch_factor", d.prefetch_factor, d.prefetch_factor > 0, "> 0"),
        ("data.prefetch_batches", d.prefetch_batches, d.prefetch_batches > 0, "> 0"),
        ("data.fetch_threads", d.fetch_threads, d.fetch_threads > 0, "> 0"),
        ("data.shuffle_block_shards", d.shuffle_block_shards, d.shuffle_block_shards > 0, "> 0"),
        ("data.cache_max_gb", d.cache_max_gb, d.cache_max_gb >= 0, ">= 0 (0 = no node cache)"),
        ("data.max_bad_samples", d.max_bad_samples, d.max_bad_samples >= 0, ">= 0"),
        ("data.worker_timeout_s", d.worker_timeout_s, d.worker_timeout_s >= 0, ">= 0 (0 = wait forever)"),
        ("data.target_mfu", d.target_mfu, 0.0 < d.target_mfu <= 1.0, "in (0, 1]"),
        ("data.caption_temperature", d.caption_temperature, d.caption_temperature > 0, "> 0"),
        ("optim.grad_clip", cfg.optim.grad_clip, cfg.optim.grad_clip >= 0, ">= 0 (0 = off)"),
        ("validation.every", cfg.validation.every, cfg.validation.every >= 0, ">= 0 (0 = off)"),
        ("validation.max_per_bucket", cfg.validation.max_per_bucket, cfg.validation.max_per_bucket >= 0,
         ">= 0 (0 = all)"),
        ("validation.batch_size", cfg.validation.batch_size, cfg.validation.batch_size >= 0, ">= 0 (0 = 2 x micro_batch)"),
        ("compile.recompile_budget", cfg.compile.recompile_budget, cfg.compile.recompile_budget >= 0, ">= 0"),
        ("optim.came.betas", list(came.betas), all(0.0 <= b < 1.0 for b in came.betas), "each in [0, 1)"),
        ("optim.came.eps", list(came.eps), min(came.eps) > 0, "each > 0"),
        ("optim.came.clip_threshold", came.clip_threshold, came.clip_threshold > 0, "> 0"),
        ("spike.zscore_loss", cfg.spike.zscore_loss, cfg.spike.zscore_loss >= 0, ">= 0 (0 = loss not judged)"),
        ("spike.zscore_grad", cfg.spike.zscore_grad, cfg.spike.zscore_grad >= 0, ">= 0 (0 = norm not judged)"),
        ("spike.min_history", cfg.spike.min_history, cfg.spike.min_history >= 3, ">= 3 (a median and MAD of "
                                                                                  "fewer steps mean nothing)"),
        ("spike.window", cfg.spike.window, cfg.spike.window >= cfg.spike.min_history,
         f">= spike.min_history={cfg.spike.min_history}"),
        ("spike.max_rollbacks", cfg.spike.max_rollbacks, cfg.spike.max_rollbacks >= 0, ">= 0"),
        *_node_health_rules(cfg),
    ):
        if not ok:
            raise ConfigError(f"{key}={value} must be {rule}")
    if cfg.spike.enabled and cfg.spike.zscore_loss == 0 and cfg.spike.zscore_grad == 0:
        raise ConfigError("spike.enabled=true with spike.zscore_loss=0 and spike.zscore_grad=0 judges nothing; set "
                          "a threshold (e.g. 8) or spike.enabled=false")
    if cfg.optim.name == "came" and cfg.checkpoint.load_universal:
        raise ConfigError("optim.name=came with checkpoint.load_universal=true: CAME's row/column statistics have no "
                          "DeepSpeed universal-checkpoint form; valid: load_universal with optim.name=adamw, or resume "
                          "a CAME run on the world size it was saved with")
    if cfg.checkpoint.init_from and cfg.checkpoint.resume_from:
        raise ConfigError("checkpoint.init_from and checkpoint.resume_from are both set: init_from starts a run from "
                          "release weights (fresh optimizer), resume_from continues a checkpoint; set one")
    resolve_s3_settings(d.s3)  # unknown keys and bad values named here (ConfigError), before anything starts
    if any(v == REDACTED for v in leaves(d.storage_options)):
        raise ConfigError(f"data.storage_options holds {REDACTED!r} values: this config was read back from a run "
                          f"folder, where credentials are never saved; remove them and give the credentials as AWS_* "
                          f"environment variables or an AWS profile")


def _node_health_rules(cfg: RunConfig) -> list[tuple[str, Any, bool, str]]:
    """(key, value, ok, rule) of the distributed / node_check / straggler sections."""
    d, n, s = cfg.distributed, cfg.node_check, cfg.straggler
    return [
        ("distributed.startup_timeout_s", d.startup_timeout_s, d.startup_timeout_s > 0, "> 0"),
        ("distributed.step_timeout_s", d.step_timeout_s, d.step_timeout_s > 0, "> 0"),
        ("distributed.sigterm_grace_s", d.sigterm_grace_s, 0 < d.sigterm_grace_s <= 3.5,
         "in (0, 3.5] (a SIGTERM'd trainer must be gone within 5 s; faulthandler's backstop fires 1 s later)"),
        ("node_check.matmul_size", n.matmul_size, n.matmul_size > 0, "> 0"),
        ("node_check.allreduce_mb", n.allreduce_mb, n.allreduce_mb > 0, "> 0"),
        ("node_check.min_allreduce_gb_s", n.min_allreduce_gb_s, n.min_allreduce_gb_s >= 0, ">= 0 (0 = report only)"),
        ("node_check.read_mb", n.read_mb, n.read_mb > 0, "> 0"),
        ("node_check.min_read_mb_s", n.min_read_mb_s, n.min_read_mb_s >= 0, ">= 0 (0 = report only)"),
        ("node_check.disk_fail_checkpoints", n.disk_fail_checkpoints, n.disk_fail_checkpoints >= 0, ">= 0"),
        ("node_check.disk_warn_checkpoints", n.disk_warn_checkpoints,
         n.disk_warn_checkpoints >= n.disk_fail_checkpoints, ">= node_check.disk_fail_checkpoints"),
        ("straggler.every", s.every, s.every >= 0, ">= 0 (0 = off)"),
        ("straggler.threshold", s.threshold, s.threshold > 0, "> 0"),
        ("straggler.windows", s.windows, s.windows > 0, "> 0"),
    ]
