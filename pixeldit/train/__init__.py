"""The distributed trainer (DeepSpeed ZeRO-1/2/3, curriculum, exact resume).

One concern per module, each with a ``build_*`` factory or a small stateful object:

- ``config``: the typed ``RunConfig`` tree, ``load_config(path, overrides)`` (validated), ``save_config``
- ``preflight``: ``preflight(cfg, world_size)``, the files and JSON a run needs, checked before anything starts
- ``ds_config``: ZeRO JSON of ``ds_configs/`` completed/checked from the run config
- ``curriculum``: stage spans (the per-stage objective: ``RunConfig.stage_objective``)
- ``sources`` + ``bucket_sampler`` + ``loader``: the stage's dataset roots checked against their manifests,
  the world-size independent plan of global batches (one bucket each), node-cached shard reads,
  ``build_loader``; ``ledger``: ``pixeldit-ledger``
- ``activation_checkpointing`` + ``engine``: ``build_engine`` (model + REPA projector -> DeepSpeed)
- ``optim``: AdamW or CAME and the warmup + constant/cosine ``LRSchedule``; ``came``: CAME with factored second
  moments that stay factored under ZeRO (``zero_partitions``: which matrix rows/columns each flat ZeRO
  partition holds)
- ``warm_start``: start a run from a release folder's weights (``checkpoint.init_from``: fine-tuning)
- ``ema``: ``EMA`` under every ZeRO stage (its file format and ``consolidate_ema``: ``pixeldit.run_folder``)
- ``checkpoint``: ``CheckpointManager`` (atomic, checksummed step folders, ``latest`` pointer, keep-k, the
  resume point with its fallback; the names, ``meta.json`` and the manifest: ``pixeldit.run_folder``),
  ``untie_optimizer_steps`` (a DeepSpeed universal-load fix)
- ``run_lock``: ``RunLock``, one trainer per run folder (a lock file that works on shared file systems)
- ``conditioning``: class ids / text encoder / embedding cache, REPA teacher
- ``metrics`` + ``preview``: JSONL, tqdm, wandb, MFU; EMA image grids
- ``signals``: ``StopFlag``, the one stop-signal mechanism (the CLI's and the launcher job's)
- node health (issue 17): ``collectives`` (timeouts for start-up / after the first step, stack dumps on a failed
  collective), ``node_check`` (the runtime preflight of every start: matmul, all-reduce, disk, data read),
  ``stragglers`` (per-rank step-time windows, slow ranks flagged), ``fault_hooks`` (the tests' fault injection)
- ``trainer``: ``run_training(cfg, stop_requested) -> TrainResult``; ``cli``: ``pixeldit-train``

Releases are made from the checkpoints on disk; training reads a release folder only in ``warm_start``, through
the release format modules (``pixeldit.release.config``, ``safe_load``, ``key_map``).
"""
