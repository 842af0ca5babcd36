"""The distributed trainer (DeepSpeed ZeRO-1/2/3, curriculum, exact resume).

One concern per module, each with a ``build_*`` factory or a small stateful object:

- ``config``: the typed ``RunConfig`` tree, ``load_config(path, overrides)``, ``save_config``
- ``ds_config``: ZeRO JSON of ``ds_configs/`` completed/checked from the run config
- ``curriculum``: stage spans and per-stage objective
- ``sources`` + ``bucket_sampler`` + ``loader``: the stage's dataset roots checked against their manifests,
  the world-size independent plan of global batches (one bucket each), node-cached shard reads,
  ``build_loader``; ``ledger``: ``pixeldit-ledger``
- ``activation_checkpointing`` + ``engine``: ``build_engine`` (model + REPA projector -> DeepSpeed)
- ``optim``: AdamW and the warmup + constant/cosine ``LRSchedule``
- ``ema``: ``EMA`` under every ZeRO stage, ``consolidate_ema(checkpoint_dir)``
- ``checkpoint``: ``CheckpointManager`` (atomic step folders, ``latest`` pointer, keep-k), ``consolidate_model``
- ``conditioning``: class ids / text encoder / embedding cache, REPA teacher
- ``metrics`` + ``preview``: JSONL, tqdm, wandb, MFU; EMA image grids
- ``trainer``: ``run_training(cfg, stop_requested) -> TrainResult``; ``cli``: ``pixeldit-train``
"""
