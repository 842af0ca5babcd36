"""The dataset format: what `pixeldit-data shard` writes under a dataset root and what every reader reads.

One package, one owner: ``layout`` holds the names, the format version and the row classes (the parquet
schemas); ``access`` reads and writes a root; import every name from ``data_pipeline.dataset_format``.

Layout of a root (a local folder or a URL such as ``s3://bucket/prefix``)::

    shards/{ratio}/{ratio}-{n:06d}.tar   webdataset shards, one aspect-ratio bucket each (``shard_name``); members
                                         {key}.{jpg|png|webp}, {key}.txt, {key}.json[, {key}.cls] (tarshard.py)
    samples.parquet                      one ``SampleRow`` per sample: its shard, the byte range of its image
                                         inside the tar (ranged reads, no tar scan), caption, size, label;
                                         then the dataset's metadata columns (below)
    stats.json                           counts by reason and per bucket (written by shard_sink.commit_root)
    manifest.parquet                     one ``ShardRow`` per shard -- written LAST
    text_emb/                            default folder of the caption-embedding cache (pixeldit.conditioning)
    score_parts/{shard}.parquet          the score stage's per-shard results (``ScorePartRow``, one row per sample,
                                         with its CLIP image embedding): resumable work, kept for dedupe
    scores.parquet                       one ``ScoreRow`` per sample (CLIP score, aesthetic, phash) -- keyed like
                                         samples.parquet (key; shard + sample_index); the score stage's commit point
    captions.parquet                     one ``CaptionRow`` per caption of a sample (original + recaptions), with the
                                         score the loader's caption draw uses (data_pipeline.captions)
    dedupe.parquet                       one ``DedupeRow`` per dropped near-duplicate: the kept sample it duplicates
    _build/                              the state of the (possibly multi-task) build that wrote the root: plan,
                                         task records, job ids, the tasks' uncommitted parts (data_pipeline.build);
                                         never read by training

Commit order: shards, then samples.parquet, then stats.json, then manifest.parquet (``write_index``). The
curation files come after a committed root: score parts, then captions.parquet, then scores.parquet (the score
stage commits it last, see data_pipeline/score.py); dedupe.parquet is derived from the parts and scores. The
manifest is the commit point: a root without it is incomplete and is not read, and samples.parquet rows of
shards the manifest does not list belong to a crashed run (``committed_samples`` drops them). The manifest's
parquet key-value metadata holds the format version (``FORMAT_VERSION``) and the pipeline's incremental
state (``STATE_KEY``: consumed ingest shards, cumulative counters).

Metadata columns: every samples.parquet column after the ``SampleRow`` ones is a metadata column carried from
the input URL list (``pixeldit-data ingest --meta-cols aesthetic,punsafe,LICENSE:license``: the LAION / DataComp /
COYO scores, licence, original size, anything the user names), one value per sample, null where the input had
none. Types: int64, float64, bool or string (``META_TYPES``). Their names are not ``SampleRow`` names; filters
(``data_pipeline.filters``) read them like any other column, so a training stage can select rows of the same
shards (``stages.N.filter``). Other tools may add columns keyed the same way (one value per row).
Held-out split: samples.parquet's ``split`` column says which samples are held out of training
(``SPLIT_HELDOUT``; the trainer's loader never plans them, its validation loss reads only them) and which are
training samples (``SPLIT_TRAIN``). The shard stage carves it (``data_pipeline.holdout``: a hash of the key, so
a sample's split never changes and does not depend on the order of the input); a row's split is set once, when
the row is committed. ``read_sample_index`` gives it as the boolean ``heldout``.

Versions: a manifest written before the version was recorded reads as version 1; a version newer than
``FORMAT_VERSION`` is refused with the root named. Version 2 added the ``split`` column: a version-1 root (or a
row whose split is null) reads as training data, none held out. Adding a column means adding one field to ``SampleRow``
or ``ShardRow`` (layout.py: the parquet schemas are derived from them) and filling it in the writer.
"""
from __future__ import annotations

from .access import (
    SampleIndex, ShardProblem, caption_sets_by_shard, check_shards, committed_samples, curation_metadata,
    format_version, heldout_mask, read_captions, read_committed_columns, read_dedupe, read_manifest,
    read_sample_index, read_samples, read_samples_schema, read_score_part, read_score_part_metadata,
    read_scores, read_state, read_stats, require_committed, write_index, write_samples, write_table,
)
from .layout import (
    BUILD_DIR, CAPTIONS, CAPTIONS_SCHEMA, CaptionRow, DEDUPE, DEDUPE_SCHEMA, DedupeRow, FORMAT_VERSION,
    FORMAT_VERSION_KEY, MANIFEST, MANIFEST_SCHEMA, META_TYPES, NO_LABEL, RowT, SAMPLES, SAMPLES_SCHEMA,
    SAMPLE_COLUMNS, SCORES, SCORES_META_KEY, SCORES_SCHEMA, SCORES_VERSION, SCORE_PARTS_DIR, SCORE_PART_SCHEMA,
    SHARDS_DIR, SHARD_EXT, SPLITS, SPLIT_HELDOUT, SPLIT_TRAIN, STATE_KEY, STATE_VERSION, STATS, SampleRow,
    ScorePartRow, ScoreRow, ShardRow, TEXT_EMB_DIR, concat_samples, conform_samples, meta_columns,
    parse_shard_name, rows_to_table, schema_of, score_part_name, shard_name, table_rows, text_embedding_dir,
    with_split_column,
)

__all__ = [
    'BUILD_DIR', 'CAPTIONS', 'CAPTIONS_SCHEMA', 'CaptionRow', 'DEDUPE', 'DEDUPE_SCHEMA', 'DedupeRow',
    'FORMAT_VERSION', 'FORMAT_VERSION_KEY', 'MANIFEST', 'MANIFEST_SCHEMA', 'META_TYPES', 'NO_LABEL', 'RowT',
    'SAMPLES', 'SAMPLES_SCHEMA', 'SAMPLE_COLUMNS', 'SCORES', 'SCORES_META_KEY', 'SCORES_SCHEMA',
    'SCORES_VERSION', 'SCORE_PARTS_DIR', 'SCORE_PART_SCHEMA', 'SHARDS_DIR', 'SHARD_EXT', 'SPLITS',
    'SPLIT_HELDOUT', 'SPLIT_TRAIN', 'STATE_KEY', 'STATE_VERSION', 'STATS', 'SampleIndex', 'SampleRow',
    'ScorePartRow', 'ScoreRow', 'ShardProblem', 'ShardRow', 'TEXT_EMB_DIR', 'caption_sets_by_shard',
    'check_shards', 'committed_samples', 'concat_samples', 'conform_samples', 'curation_metadata',
    'format_version', 'heldout_mask', 'meta_columns', 'parse_shard_name', 'read_captions',
    'read_committed_columns', 'read_dedupe', 'read_manifest', 'read_sample_index', 'read_samples',
    'read_samples_schema', 'read_score_part', 'read_score_part_metadata', 'read_scores', 'read_state',
    'read_stats', 'require_committed', 'rows_to_table', 'schema_of', 'score_part_name', 'shard_name',
    'table_rows', 'text_embedding_dir', 'with_split_column', 'write_index', 'write_samples', 'write_table',
]
