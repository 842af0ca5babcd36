"""Check a run completely before anything starts: no process group, no DeepSpeed, no wandb, no run folder.

``preflight(cfg, world_size)`` runs ``validate(cfg)`` (the config on its own), then checks what it names:
 - every stage's dataset root (``data_path`` or each of ``sources``): ``manifest.parquet`` (written last, so
   the dataset is complete) and ``samples.parquet`` exist, local or on S3 (each shard against the manifest:
   ``pixeldit.train.sources``, in the trainer, once the process group exists);
   a stage's row filter (``stages.N.filter``) names columns that each root's samples.parquet has (its footer);
 - the text encoder folder (text models, when ``conditioning.text_encoder`` is set) and the DINOv2 teacher
   folder (a stage has REPA) hold a transformers ``config.json``;
 - the caption-embedding cache of every stage (``text_mode=cached``) is complete and was made for this
   model's text width, caption length and system prompt;
 - ``checkpoint.resume_from`` exists when the run has no checkpoint of its own yet; so does the release folder of
   ``checkpoint.init_from``, with its weights and the run config's architecture (``warm_start.check_init_release``);
 - the ZeRO JSON of ``deepspeed.zero`` is found and agrees with every stage at this world size.
It reads a few small files (stat / HEAD requests on S3, under the run's ``data.s3`` timeouts and retries, which
it applies to this process: ``pixeldit.s3.configure_s3``) and loads no network. ``pixeldit-train`` and
``run_training`` run it before joining the process group; ``pixeldit-submit`` runs it before submitting.
Every problem is a ``ConfigError`` (or ``FileNotFoundError``) naming the key and the path.
"""
from __future__ import annotations

import os

from data_pipeline.dataset_format import MANIFEST, SAMPLES, text_embedding_dir
from data_pipeline.filters import check_stage_filter
from pixeldit import run_folder, storage
from pixeldit.errors import ConfigError
from pixeldit.s3 import configure_s3

from .conditioning import resolved_system_prompt
from .config import RunConfig, validate
from .ds_config import build_ds_config
from .warm_start import check_init_release

HF_CONFIG = "config.json"  # every transformers model folder has one


def preflight(cfg: RunConfig, world_size: int | None = None) -> None:
    """Raise on the first problem of the run; ``world_size`` defaults to $WORLD_SIZE (1 when unset)."""
    validate(cfg)
    world_size = int(os.environ.get("WORLD_SIZE", "1")) if world_size is None else world_size
    options = cfg.data.storage_options
    args = cfg.model.args()
    configure_s3(cfg.data.s3)  # the run's S3 timeouts / retries: a silent endpoint fails these checks
    for i, stage in enumerate(cfg.stages):
        for j, source in enumerate(stage.data_sources()):
            key = f"stages.{i} ({stage.name}).{f'sources.{j}.path' if stage.sources else 'data_path'}"
            for name in (MANIFEST, SAMPLES):
                if not storage.exists(storage.join(source.path, name), options):
                    raise FileNotFoundError(
                        f"{key}={source.path!r}: {name} not found there; point it at a dataset root written by "
                        f"`pixeldit-data shard` (its {MANIFEST} is written last)")
            if stage.filter:  # its columns exist in this root's samples.parquet (the footer only)
                check_stage_filter(source.path, stage.filter, f"stages.{i} ({stage.name}).filter", options)
    c = cfg.conditioning
    if args.conditioning == "text" and c.text_encoder:
        _require_model_folder("conditioning.text_encoder", c.text_encoder)
    if cfg.uses_repa:
        _require_model_folder("conditioning.repa_teacher", c.repa_teacher)
    if args.conditioning == "text" and c.text_mode == "cached":
        from pixeldit.conditioning import TextEmbeddingCache

        expect = {"system_prompt": resolved_system_prompt(cfg, args), "max_length": args.text_len,
                  "dim": args.text_dim}
        checked = set()
        for i, stage in enumerate(cfg.stages):
            for j, source in enumerate(stage.data_sources()):
                root = c.embedding_cache or text_embedding_dir(source.path)
                if root in checked:
                    continue
                checked.add(root)
                try:
                    TextEmbeddingCache(root, expect=expect, storage_options=options)
                except (FileNotFoundError, ValueError) as e:
                    key = "conditioning.embedding_cache" if c.embedding_cache else (
                        f"stages.{i} ({stage.name}).{f'sources.{j}.path' if stage.sources else 'data_path'}")
                    raise ConfigError(f"{key} (text_mode=cached): {e}") from None
    # a run with a `latest` of its own resumes from it (a damaged one falls back to an intact step folder)
    has_own = (run_folder.checkpoints_dir(cfg.run_dir) / run_folder.LATEST).exists()
    if cfg.checkpoint.resume_from and not has_own:
        if not os.path.isdir(cfg.checkpoint.resume_from):
            raise FileNotFoundError(f"checkpoint.resume_from={cfg.checkpoint.resume_from!r} not found (the run "
                                    f"{cfg.run_dir} has no checkpoint of its own yet, so it would start there)")
    if cfg.checkpoint.init_from and not has_own:
        check_init_release(cfg)
    for stage in cfg.stages:
        build_ds_config(cfg, stage, world_size)


def _require_model_folder(key: str, path: str) -> None:
    if not os.path.isfile(os.path.join(path, HF_CONFIG)):
        raise FileNotFoundError(f"{key}={path!r}: no {HF_CONFIG} there; set it to a local transformers model folder "
                                f"(save_pretrained / a hub snapshot)")
