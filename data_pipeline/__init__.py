"""data_pipeline: URL + caption lists -> aspect-ratio-bucketed webdataset shards (local or S3).

Stages: ingest (img2dataset) -> build_shards (verify, normalise, bucket, shard) -> compute_stats; then, on a
committed root, score_dataset (CLIP / aesthetic / pHash / caption scores) -> dedupe_dataset (near-duplicates).
Shared bucket tables: data_pipeline.buckets (light import: no pyarrow / PIL). Heavier names below are
imported lazily so `import data_pipeline.buckets` stays cheap for the trainer.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "bucket_table": "buckets", "nearest_ratio_key": "buckets", "RATIO_KEYS": "buckets",
    "IngestConfig": "ingest", "IngestSummary": "ingest", "ingest": "ingest",
    "ShardConfig": "shard", "ShardSummary": "shard", "build_shards": "shard",
    "compute_stats": "stats", "format_report": "stats",
    "read_manifest": "dataset_format", "read_samples": "dataset_format", "read_stats": "dataset_format",
    "make_synthetic_dataset": "synthetic", "serve_folder": "serve",
    "ScoreConfig": "score", "ScoreSummary": "score", "score_dataset": "score",
    "DedupeConfig": "dedupe", "dedupe_dataset": "dedupe", "keep_mask": "dedupe",
    "draw_caption": "captions", "read_caption_sets": "captions", "DEFAULT_CAPTION_TEMPERATURE": "captions",
    "ClipEmbedder": "clip", "AestheticHead": "clip",
}  # fmt: skip
__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'data_pipeline' has no attribute {name!r}")
