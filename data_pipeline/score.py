"""The score stage: CLIP and aesthetic scores, perceptual hashes and caption scores of a committed root.

Stream per shard (``STAGES``; what it holds at each point):
  1. ``read``: the shard's samples (samples.parquet rows, sample_index order) and their caption sets
     (data_pipeline.captions: samples.parquet caption + caption_<source> columns + side files);
  2. ``fetch``: each image's bytes by its byte range in the tar (``cat_ranges``: one ranged read per image on
     object stores, no tar scan), ``batch_size`` images at a time;
  3. ``decode`` (``decode_threads`` threads): PIL decode with ``draft`` (JPEGs are decoded at the smallest DCT
     scale whose shorter side is still >= the CLIP input size), RGB; the 64-bit pHash (imagehash.phash: 32x32
     grey DCT, 8x8 low frequencies against their median) of that image. An image PIL cannot decode gets
     clip_score / aesthetic NaN, phash 0, caption scores 0 (a uniform caption draw) and is counted; dedupe
     leaves it alone;
  4. ``embed``: ``ClipEmbedder`` image embeddings (unit norm) and the aesthetic head on them; text embeddings of
     every caption of the shard; the cosine of each caption with its image;
  5. ``write``: one score part per shard (``score_part_name``: ``ScorePartRow`` rows with the fp16 image
     embedding and the caption set with its scores), atomically.

Resumable: a shard whose part already holds this CLIP model's and aesthetic head's fingerprints and the same
caption set (SHA-256 of sources, captions and given scores) is not recomputed; ``part`` / ``num_parts`` split the
shards over processes (a SLURM array: part = task id). The process that finds every committed shard's part
written by this run (same models, same side files) commits: captions.parquet, then scores.parquet LAST (the
stage's commit point), both atomic. Shards added to the root later are scored by rerunning the stage; existing
parts are kept.
"""
from __future__ import annotations

import hashlib
import io
import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image
from tqdm.auto import tqdm

from pixeldit.errors import DataError
from pixeldit.storage import fs_and_path, join

from .captions import CaptionSources, collect_captions
from .dataset_format import (CAPTIONS, CAPTIONS_SCHEMA, SAMPLES, SCORE_PART_SCHEMA, SCORES, SCORES_SCHEMA,
                             committed_samples, read_manifest, read_score_part, read_score_part_metadata,
                             require_committed, score_part_name, write_table)

STAGES = ("read", "fetch", "decode", "embed", "write")


@dataclass(frozen=True)
class ScoreConfig:
    clip: str  # a local transformers CLIPModel folder (data_pipeline.clip)
    aesthetic: str | None = None  # safetensors file of the aesthetic head; None: no aesthetic score
    side_captions: tuple[str, ...] = ()  # side caption files (JSONL / parquet), data_pipeline.captions
    batch_size: int = 64
    device: str = "cpu"
    decode_threads: int = 4
    part: int = 0
    num_parts: int = 1
    overwrite: bool = False  # recompute parts even when they are up to date
    progress: bool = True
    storage_options: dict[str, Any] = field(default_factory=dict)


@dataclass
class ScoreSummary:
    root: str
    shards_scored: int = 0
    shards_skipped: int = 0
    samples_scored: int = 0
    captions_scored: int = 0
    undecodable: list[str] = field(default_factory=list)  # keys
    side_unknown_keys: int = 0
    committed: bool = False
    seconds: float = 0.0  # the whole call
    load_seconds: float = 0.0  # of which loading the models

    @property
    def images_per_second(self) -> float:
        """Scored images per second of scoring (model loading left out)."""
        busy = self.seconds - self.load_seconds
        return self.samples_scored / busy if busy > 0 else 0.0


def phash64(image: Image.Image) -> int:
    """64-bit pHash of an image as an int, bit 63 = the hash's first bit (imagehash.phash, 8 x 8)."""
    import imagehash

    bits = imagehash.phash(image, hash_size=8).hash.reshape(-1)  # (64,) bool, row-major
    return int.from_bytes(np.packbits(bits).tobytes(), "big")


def decode_for_scoring(data: bytes, size: int) -> tuple[np.ndarray, int] | None:
    """(H, W, 3) uint8 pixels (shorter side >= ``size`` when the source allows) and the pHash; None if undecodable."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.draft("RGB", (size, size))  # JPEG: decode at a reduced DCT scale, both sides still >= size
            rgb = img.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError, SyntaxError):  # PIL raises all of these
        return None
    return np.asarray(rgb), phash64(rgb)


def caption_digest(table: pa.Table) -> str:
    """SHA-256 of a shard's caption set (sources, captions, given scores, in order)."""
    cols = [table[c].to_pylist() for c in ("sample_index", "caption_index", "source", "caption", "given_score")]
    return hashlib.sha256(json.dumps(cols, ensure_ascii=False).encode()).hexdigest()


class _Models:
    def __init__(self, cfg: ScoreConfig):
        import torch

        from .clip import AestheticHead, ClipEmbedder

        self.clip = ClipEmbedder(cfg.clip, cfg.device, torch.float16 if cfg.device.startswith("cuda") else None)
        self.head = AestheticHead.from_file(cfg.aesthetic, self.clip.dim) if cfg.aesthetic else None
        self.fingerprints = {"clip": self.clip.fingerprint, "aesthetic": self.head.fingerprint if self.head else None}


def _score_shard(root: str, shard: str, samples: pa.Table, captions: pa.Table, models: _Models, cfg: ScoreConfig,
                 pool: ThreadPoolExecutor, summary: ScoreSummary) -> pa.Table:
    """The score part of one shard (SCORE_PART_SCHEMA); ``samples`` / ``captions`` of this shard, sorted."""
    fs, path = fs_and_path(join(root, shard), cfg.storage_options)
    keys = samples["key"].to_pylist()
    if not np.array_equal(samples["sample_index"].to_numpy(), np.arange(len(keys))):
        raise DataError(f"{join(root, SAMPLES)}: sample_index of shard {shard} is not 0..{len(keys) - 1}; "
                        "rebuild the root")
    offsets, sizes = samples["image_offset"].to_numpy(), samples["image_size"].to_numpy()
    n, dim = len(keys), models.clip.dim
    image_emb = np.zeros((n, dim), dtype=np.float32)
    phash = np.zeros(n, dtype=np.uint64)
    ok = np.zeros(n, dtype=bool)
    for s in range(0, n, cfg.batch_size):
        e = min(n, s + cfg.batch_size)
        blobs = fs.cat_ranges([path] * (e - s), offsets[s:e].tolist(), (offsets[s:e] + sizes[s:e]).tolist(),
                              on_error="raise")  # fetch
        decoded = list(pool.map(lambda b: decode_for_scoring(b, models.clip.size), blobs))  # decode
        good = [i for i, d in enumerate(decoded) if d is not None]
        for i, d in enumerate(decoded):
            if d is None:
                summary.undecodable.append(keys[s + i])
            else:
                phash[s + i] = d[1]
        if good:
            emb = models.clip.image_embeddings([decoded[i][0] for i in good]).numpy()  # (b, E) embed
            image_emb[[s + i for i in good]] = emb
            ok[[s + i for i in good]] = True
    aesthetic = np.full(n, np.nan, dtype=np.float32)
    if models.head is not None and ok.any():
        import torch

        aesthetic[ok] = models.head(torch.from_numpy(image_emb[ok])).numpy()
    # captions: text embeddings, cosine with their image
    texts = captions["caption"].to_pylist()
    owner = captions["sample_index"].to_numpy().astype(np.int64)
    cos = np.zeros(len(texts), dtype=np.float32)
    for s in range(0, len(texts), cfg.batch_size):
        e = min(len(texts), s + cfg.batch_size)
        txt = models.clip.text_embeddings(texts[s:e]).numpy()  # (b, E)
        cos[s:e] = (txt * image_emb[owner[s:e]]).sum(-1)
    cos[~ok[owner]] = 0.0  # an undecodable image: every caption equally likely
    given = captions["given_score"].to_numpy(zero_copy_only=False).astype(np.float32)
    score = np.where(np.isnan(given), cos, given)
    starts = np.searchsorted(owner, np.arange(n + 1))  # captions are sorted by (sample_index, caption_index)
    primary = np.where(ok, cos[starts[:-1]], np.nan).astype(np.float32)
    summary.captions_scored += len(texts)

    def lists(values: list | np.ndarray, arrow_type: pa.DataType) -> pa.Array:
        return pa.ListArray.from_arrays(pa.array(starts, pa.int32()), pa.array(values, arrow_type))

    return pa.table({
        "key": samples["key"], "shard": samples["shard"], "sample_index": samples["sample_index"],
        "clip_score": pa.array(primary), "aesthetic": pa.array(aesthetic if models.head else [None] * n, pa.float32()),
        "phash": pa.array(phash), "num_captions": pa.array(np.diff(starts), pa.int32()),
        "image_embedding": pa.array([r.tobytes() for r in image_emb.astype("<f2")], pa.binary()),
        "caption_sources": lists(captions["source"].to_pylist(), pa.string()),
        "captions": lists(texts, pa.string()), "caption_clip_scores": lists(cos, pa.float32()),
        "caption_scores": lists(score, pa.float32()),
    })  # fmt: skip


def _run_meta(fingerprints: dict, sources: CaptionSources) -> str:
    """The identity of a run: models and side files; a part stamped with it belongs to this run."""
    text = json.dumps({**fingerprints, "side": sources.side_digest}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def score_dataset(root: str, cfg: ScoreConfig) -> ScoreSummary:
    """Score the shards of part ``cfg.part`` of the committed root ``root``; commit when all parts are done."""
    if not 0 <= cfg.part < cfg.num_parts:
        raise ValueError(f"part {cfg.part} must be in 0..{cfg.num_parts - 1}")
    if cfg.batch_size <= 0 or cfg.decode_threads <= 0:
        raise ValueError(f"batch_size {cfg.batch_size} and decode_threads {cfg.decode_threads} must be positive")
    start = time.perf_counter()
    options = cfg.storage_options
    require_committed(root, options)
    samples = committed_samples(root, read_manifest(root, options))
    if samples is None or samples.num_rows == 0:
        raise ValueError(f"{root}: no committed samples to score")
    samples = samples.sort_by([("shard", "ascending"), ("sample_index", "ascending")])
    shards = sorted(set(samples["shard"].to_pylist()))
    mine = shards[cfg.part::cfg.num_parts]
    my_samples = samples.filter(pc.is_in(samples["shard"], pa.array(mine, pa.string())))
    sources = collect_captions(my_samples, cfg.side_captions, samples["key"], options)
    loading = time.perf_counter()
    models = _Models(cfg)
    run = _run_meta(models.fingerprints, sources)
    summary = ScoreSummary(root=root, side_unknown_keys=sources.side_unknown_keys,
                           load_seconds=time.perf_counter() - loading)
    with ThreadPoolExecutor(cfg.decode_threads) as pool:
        for shard in tqdm(mine, desc=f"score {cfg.part}/{cfg.num_parts}", disable=not cfg.progress):
            rows = my_samples.filter(pc.equal(my_samples["shard"], shard))
            caps = sources.table.filter(pc.equal(sources.table["shard"], shard))
            meta = {**models.fingerprints, "captions": caption_digest(caps), "samples": rows.num_rows, "run": run}
            old = read_score_part_metadata(root, shard, options)
            url = join(root, score_part_name(shard))
            if not cfg.overwrite and old is not None and {k: old.get(k) for k in meta if k != "run"} == \
                    {k: v for k, v in meta.items() if k != "run"}:
                if old.get("run") != run:  # same results, another run's stamp (e.g. other side files elsewhere)
                    write_table(url, read_score_part(root, shard, options), SCORE_PART_SCHEMA, meta, options)
                summary.shards_skipped += 1
                continue
            part = _score_shard(root, shard, rows, caps, models, cfg, pool, summary)
            write_table(url, part, SCORE_PART_SCHEMA, meta, options)
            summary.shards_scored += 1
            summary.samples_scored += rows.num_rows
    summary.committed = commit_scores(root, shards, run, models.fingerprints, options)
    summary.seconds = time.perf_counter() - start
    return summary


def commit_scores(root: str, shards: list[str], run: str, fingerprints: dict,
                  storage_options: dict[str, Any] | None = None) -> bool:
    """Write captions.parquet then scores.parquet once every shard's part carries this run's stamp."""
    for shard in shards:
        meta = read_score_part_metadata(root, shard, storage_options)
        if meta is None or meta.get("run") != run:
            return False  # another part is still working (or holds an older run's results)
    score_cols = SCORES_SCHEMA.names
    parts = [read_score_part(root, s, storage_options,
                             columns=score_cols + ["caption_sources", "captions", "caption_clip_scores",
                                                   "caption_scores"]) for s in shards]
    table = pa.concat_tables(parts)
    counts = table["num_captions"].to_numpy().astype(np.int64)
    captions = pa.table({
        "key": pc.take(table["key"], pa.array(np.repeat(np.arange(table.num_rows), counts))),
        "shard": pc.take(table["shard"], pa.array(np.repeat(np.arange(table.num_rows), counts))),
        "sample_index": pc.take(table["sample_index"], pa.array(np.repeat(np.arange(table.num_rows), counts))),
        "caption_index": pa.array(np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts),
                                  pa.int32()),
        "source": pc.list_flatten(table["caption_sources"]), "caption": pc.list_flatten(table["captions"]),
        "clip_score": pc.list_flatten(table["caption_clip_scores"]),
        "score": pc.list_flatten(table["caption_scores"]),
    })  # fmt: skip
    meta = {**fingerprints, "run": run, "sources": sorted(pc.unique(captions["source"]).to_pylist())}
    write_table(join(root, CAPTIONS), captions, CAPTIONS_SCHEMA, meta, storage_options)
    write_table(join(root, SCORES), table.select(score_cols), SCORES_SCHEMA, meta, storage_options)  # LAST
    return True
