"""The run folder and checkpoint on-disk format: its names, ``meta.json``, the ``latest`` pointer, EMA files.

The one owner of this format: the trainer writes it (``pixeldit.train.checkpoint``, ``pixeldit.train.ema``),
release tools and launchers read it, tests build fixtures through it. Imports torch, the standard library and
``pixeldit.storage`` / ``pixeldit.errors`` only. Its modules: ``layout`` (names, ``meta.json``,
``latest``), ``integrity`` (manifests, which folder to trust), ``ema_files``, ``metrics`` (``metrics.jsonl``);
every name is importable from ``pixeldit.run_folder``.

    {run_dir}/config.yaml                        the resolved run config
    {run_dir}/losses.jsonl                       one JSON record per optimizer step
    {run_dir}/trainer.lock                       the trainer holding the run folder (``pixeldit.train.run_lock``)
    {run_dir}/samples/step_{N:08d}.png           EMA preview grids
    {run_dir}/metrics.jsonl                      evaluation records keyed by step: the trainer's validation loss
                                                 (kind "val"), eval jobs' results (kind "eval"), the runtime
                                                 preflight (kind "preflight") and straggler windows (kind
                                                 "straggler"); ``read_metrics``
    {run_dir}/evals/step_{N:08d}/                an eval job of that checkpoint: its pinned weights (checkpoint/),
                                                 images and results.json (launchers.eval_jobs)
    {run_dir}/checkpoints/latest                 text: the name of the newest complete step folder
    {run_dir}/checkpoints/step_{N:08d}/          one checkpoint: DeepSpeed's model + optimizer states (ZeRO
                                                 partitions), meta.json, ema_rank{r:05d}.pt, rng_rank{r:05d}.pt,
                                                 manifest.json (size and SHA-256 of every other file)
    {run_dir}/checkpoints/universal_step_{N:08d}/  the same step as a DeepSpeed universal checkpoint (a ``zero/``
                                                 folder; resumable on any number of ranks)

A step folder is built by every rank under ``staging_dirname(N)`` (a ``pixeldit.storage.is_tmp`` name); rank 0
writes ``meta.json`` and then ``manifest.json`` (every rank's files, hashed by the ranks in parallel) and
renames it to ``step_{N:08d}``; ``latest`` is replaced after that, so it never names a half folder.

Integrity (``checkpoint_problem``): a step folder is intact when every file of its manifest is there with its
size ("size", the default: a stat per file, so a truncated or missing file is found at once: 0.4 ms for a 1 GiB
folder) and, with "full", its SHA-256. Hashing streams the bytes in 8 MiB chunks: measured 1.0-1.2 GB/s per
core (about 1 CPU-second per GB; sha256 with SHA-NI, 1 GiB file in the page cache, AMD EPYC), so a 20 GB T2I
checkpoint costs ~20 CPU-seconds, which the trainer spreads over its ranks (each hashes the files it wrote).
That is why every save hashes (once, in parallel) but a resume only checks sizes unless asked for "full".
Folders saved before checksums have no manifest: they are read when ``latest`` names them but are not
fallback candidates.

``find_latest`` reads ``latest`` defensively (binary garbage, a wrong name, a missing or damaged folder) and
falls back to the newest intact step folder at or below the step ``latest`` names (any, when its name is
unreadable), with a one-line note; ``fallback=False`` raises instead.

EMA files hold ``{"layout", "decay", "world_size", "rank", "shapes": {name: shape}, "shadow": {name: tensor}}``:
layout ``"full"``: one file (rank 0) of full tensors (ZeRO-1/2); layout ``"zero3"``: one file per rank holding
rank r's ZeRO-3 partition of every flattened parameter, elements [r * n, (r + 1) * n) with
n = ceil(numel / world_size), zero-padded. ``consolidate_ema`` rebuilds the full state dict from either.
"""
from .ema_files import consolidate_ema, partition_bounds, partition_state, read_ema_file, save_ema_file
from .integrity import (check_files, checkpoint_files, checkpoint_problem, file_sha256, find_latest, pin_weights,
                        read_latest, read_manifest, resolve_checkpoint, write_manifest)
from .layout import (CHECKPOINTS, EMA_FILE, EMA_LAYOUTS, EVALS, HASH, LATEST, LATEST_MAX_BYTES, LOCK, LOSSES,
                     MANIFEST, MANIFEST_VERSION, META, METRICS, METRIC_KINDS, RNG_FILE, RUN_CONFIG, SAMPLES,
                     STEP_NAME, STEP_PREFIX, UNIVERSAL_PREFIX, VERIFY_MODES, checkpoints_dir, eval_dir,
                     is_save_leftover, is_universal_checkpoint, latest_name, lock_path, preview_path, rank_files,
                     read_meta, staging_dirname, step_dirname, step_dirs, step_of, universal_dirname, write_latest,
                     write_meta)
from .metrics import append_metrics, read_metrics

__all__ = [
    "CHECKPOINTS", "EMA_FILE", "EMA_LAYOUTS", "EVALS", "HASH", "LATEST", "LATEST_MAX_BYTES", "LOCK", "LOSSES",
    "MANIFEST", "MANIFEST_VERSION", "META", "METRICS", "METRIC_KINDS", "RNG_FILE", "RUN_CONFIG", "SAMPLES",
    "STEP_NAME", "STEP_PREFIX", "UNIVERSAL_PREFIX", "VERIFY_MODES", "append_metrics", "check_files",
    "checkpoint_files", "checkpoint_problem", "checkpoints_dir", "consolidate_ema", "eval_dir", "file_sha256",
    "find_latest", "is_save_leftover", "is_universal_checkpoint", "latest_name", "lock_path", "partition_bounds",
    "partition_state", "pin_weights", "preview_path", "rank_files", "read_ema_file", "read_latest", "read_manifest",
    "read_meta", "read_metrics", "resolve_checkpoint", "save_ema_file", "staging_dirname", "step_dirname",
    "step_dirs", "step_of", "universal_dirname", "write_latest", "write_manifest", "write_meta",
]
