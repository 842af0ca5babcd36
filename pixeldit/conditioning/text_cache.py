"""Precomputed caption embeddings, so training does not run the text encoder every step.

Layout of a cache folder (local or any fsspec URL; by default the dataset's
``data_pipeline.dataset_format.text_embedding_dir``)::

    meta.json                       format, encoder fingerprint, dtype, max_length, dim, samples and captions
                                    per shard (written LAST)
    null.safetensors                the unconditional embedding: emb (1, T, C) float32, mask (1, T) uint8
    emb/{shard}.safetensors         per data shard (same relative path as the tar): one tensor
                                    emb (sum of lengths, C) float16|bfloat16 holding every caption's valid
                                    token states back to back, in (sample_index, caption_index) order; header
                                    metadata: lengths (JSON list, one per caption), caption_counts (JSON list,
                                    captions per sample), captions_sha (SHA-256 of the captions), num_samples,
                                    fingerprint

Format 3 stores every caption of a sample (``dataset_format.caption_sets_by_shard``: the original caption and
the recaptions of captions.parquet, caption_index order; ``lookup(..., caption_indices)`` picks one). Format 2
caches (one caption per sample, no caption_counts) still load: caption index 0 only.

A caption's mask is always a prefix of ones (right padding), so only its ``length`` valid states are
stored (captions are mostly far shorter than max_length = 300: ~5x less disk). ``lookup`` reads the
shard header once (then cached) and then exactly each sample's byte range. A cache on S3 is read through
the node-local cache of the loader (``pixeldit.node_cache``, given as ``node_cache``): one file per data
shard, fetched whole (coalesced ranged GETs, with the S3 timeouts and retries of ``pixeldit.storage``), usually
ahead of time by the loader's prefetcher (``remote_file``), then read locally. Without a node cache each
lookup reads the samples' byte ranges concurrently (``fs.cat_ranges``), one small GET per sample.

``precompute_text_embeddings`` reads the dataset's caption sets per shard (``dataset_format.caption_sets_by_shard``),
encodes them shard by shard (resumable: shards already written with the same fingerprint and captions are skipped;
``part``/``num_parts`` split the shards over several processes), and the process that finds every shard
present and matching writes meta.json. ``TextEmbeddingCache`` refuses a cache made by a different
encoder / system prompt / max_length.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from tqdm.auto import tqdm

from data_pipeline.dataset_format import SAMPLES, caption_sets_by_shard, text_embedding_dir
from pixeldit.node_cache import NodeCache, RemoteFile
from pixeldit.storage import fs_and_path, is_local, join, write_bytes_atomic, write_json_atomic

from .text_encoder import TextEncoder

FORMAT = 3
READ_FORMATS = (2, 3)  # 2: one caption per sample (no caption_counts in the shard headers)
CACHE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
_ST_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}
_HEADER_PROBE = 1 << 16  # first read of a shard file: covers the header of shards up to ~10k samples
META, NULL = "meta.json", "null.safetensors"


def shard_file(shard: str) -> str:
    """Cache file of a data shard, relative to the cache root: emb/{shard path}.safetensors."""
    if not shard or shard.startswith("/") or ".." in shard.split("/"):
        raise ValueError(f"shard path {shard!r} must be relative to the dataset root (as in {SAMPLES})")
    return f"emb/{shard}.safetensors"


@dataclass
class ShardHeader:
    """Where each sample's states sit inside one shard file."""

    path: str
    data_start: int  # byte offset of the emb tensor's data
    dtype: torch.dtype
    dim: int
    lengths: list[int]  # per caption
    offsets: list[int]  # token offset of each caption, len = num_captions + 1
    first_caption: list[int]  # caption number of each sample's caption 0, len = num_samples + 1
    fingerprint: dict
    captions_sha: str | None  # None in format 2 files

    @property
    def num_samples(self) -> int:
        return len(self.first_caption) - 1

    def caption_counts(self) -> list[int]:
        return [b - a for a, b in zip(self.first_caption[:-1], self.first_caption[1:])]


def read_shard_header(fs, path: str) -> ShardHeader:
    """Parse the safetensors header of a shard file (one ranged read, two for very large shards)."""
    return parse_shard_header(lambda start, end: fs.cat_file(path, start=start, end=end), path)


def parse_shard_header(read: Callable[[int, int], bytes], path: str) -> ShardHeader:
    """The header of a shard file given ``read(start, end) -> bytes`` of it (``path`` names it in errors)."""
    head = read(0, _HEADER_PROBE)
    n = int.from_bytes(head[:8], "little")
    if 8 + n > len(head):
        head = read(0, 8 + n)
    header = json.loads(head[8:8 + n])
    meta, emb = header.get("__metadata__", {}), header.get("emb")
    if emb is None or "lengths" not in meta:
        raise ValueError(f"{path}: not a text-embedding shard (no emb tensor / lengths); rebuild the cache")
    lengths = json.loads(meta["lengths"])
    counts = json.loads(meta["caption_counts"]) if "caption_counts" in meta else [1] * len(lengths)  # format 2
    if sum(counts) != len(lengths) or min(counts, default=1) < 1:
        raise ValueError(f"{path}: caption_counts {counts[:8]}... do not add up to {len(lengths)} captions; rebuild "
                         "the cache")
    offsets, first = [0], [0]
    for length in lengths:
        offsets.append(offsets[-1] + length)
    for count in counts:
        first.append(first[-1] + count)
    return ShardHeader(path=path, data_start=8 + n + emb["data_offsets"][0], dtype=_ST_DTYPES[emb["dtype"]],
                       dim=int(emb["shape"][1]), lengths=lengths, offsets=offsets, first_caption=first,
                       fingerprint=json.loads(meta["fingerprint"]), captions_sha=meta.get("captions_sha"))


def captions_digest(caption_sets: list[list[str]]) -> str:
    """SHA-256 of one shard's caption sets (what its cache file encodes)."""
    return hashlib.sha256(json.dumps(caption_sets, ensure_ascii=False).encode()).hexdigest()


def _encode_shard(encoder: TextEncoder, captions: list[str], batch_size: int, dtype: torch.dtype,
                  shard: str) -> tuple[torch.Tensor, list[int]]:
    """Packed valid states (sum of lengths, C) and the per-caption lengths."""
    packed, lengths = [], []
    for s in range(0, len(captions), batch_size):
        emb, mask = encoder.encode(captions[s:s + batch_size])  # (b, T, C), (b, T)
        if dtype == torch.float16 and emb.abs().max() > torch.finfo(torch.float16).max:
            raise ValueError(f"shard {shard}: encoder states exceed the float16 range; cache with dtype='bf16'")
        for i in range(emb.shape[0]):
            length = int(mask[i].sum())
            if not mask[i, :length].all():
                raise ValueError(f"shard {shard} caption {s + i}: the encoder's mask is not a prefix of ones "
                                 "(left padding?); the cache stores prefixes only")
            packed.append(emb[i, :length].to("cpu", dtype))
            lengths.append(length)
    return torch.cat(packed), lengths


def precompute_text_embeddings(data_root: str, encoder: TextEncoder, cache_dir: str | None = None, *,
                               batch_size: int = 64, dtype: str = "fp16", storage_options: dict | None = None,
                               progress: bool = True, part: int = 0, num_parts: int = 1,
                               overwrite: bool = False) -> str:
    """Encode every caption of every sample of the dataset at ``data_root`` (default cache:
    ``text_embedding_dir(data_root)``).

    Returns the cache URL. Shards whose file already holds this encoder's fingerprint and these captions are
    skipped unless ``overwrite``. With ``num_parts`` > 1, process ``part`` encodes shards part, part + num_parts, ...
    """
    if dtype not in CACHE_DTYPES:
        raise ValueError(f"unknown cache dtype {dtype!r}; valid: {', '.join(CACHE_DTYPES)}")
    if encoder.keep_padding_states:
        raise ValueError("the embedding cache stores only the valid caption states; an encoder that keeps padding "
                         "states (text_padding=unmasked models) must encode online")
    if not 0 <= part < num_parts:
        raise ValueError(f"part {part} must be in 0..{num_parts - 1}")
    cache_dir = cache_dir or text_embedding_dir(data_root)
    captions = caption_sets_by_shard(data_root, storage_options)
    cfs, croot = fs_and_path(cache_dir, storage_options)
    fp = encoder.fingerprint()
    meta_path = f"{croot}/{META}"
    if cfs.exists(meta_path) and json.loads(cfs.cat_file(meta_path)).get("fingerprint") != fp:
        cfs.rm(meta_path)  # a cache of another encoder setup: incomplete until every shard is rewritten
    shards = sorted(captions)
    for shard in tqdm(shards[part::num_parts], desc=f"text embeddings {part}/{num_parts}", disable=not progress):
        path = f"{croot}/{shard_file(shard)}"
        sets = captions[shard]
        if not overwrite and cfs.exists(path) and _fresh(read_shard_header(cfs, path), fp, dtype, sets):
            continue
        flat = [c for caps in sets for c in caps]
        packed, lengths = _encode_shard(encoder, flat, batch_size, CACHE_DTYPES[dtype], shard)
        meta = {"lengths": json.dumps(lengths), "caption_counts": json.dumps([len(c) for c in sets]),
                "captions_sha": captions_digest(sets), "num_samples": str(len(sets)), "fingerprint": json.dumps(fp)}
        write_bytes_atomic(join(cache_dir, shard_file(shard)), st_save({"emb": packed}, metadata=meta),
                           storage_options)
    ne, nm = encoder.encode_null(1)
    write_bytes_atomic(join(cache_dir, NULL), st_save({"emb": ne.cpu(), "mask": nm.to(torch.uint8).cpu()}),
                       storage_options)
    _write_meta_if_complete(cache_dir, captions, fp, dtype, encoder, storage_options)
    return cache_dir


def _fresh(header: ShardHeader, fp: dict, dtype: str, sets: list[list[str]]) -> bool:
    """A shard file written by this encoder setup for exactly these caption sets (format 2 files: the counts)."""
    if header.fingerprint != fp or header.dtype != CACHE_DTYPES[dtype]:
        return False
    if header.caption_counts() != [len(c) for c in sets]:
        return False
    return header.captions_sha is None or header.captions_sha == captions_digest(sets)


def _write_meta_if_complete(cache_dir: str, captions: dict[str, list[list[str]]], fp: dict, dtype: str,
                            encoder: TextEncoder, storage_options: dict | None) -> bool:
    """Write meta.json (atomically, last) once every shard file exists with this fingerprint."""
    cfs, croot = fs_and_path(cache_dir, storage_options)
    for shard in sorted(captions):
        path = f"{croot}/{shard_file(shard)}"
        if not cfs.exists(path):
            return False  # another part is still working
        header = read_shard_header(cfs, path)
        if header.fingerprint != fp or header.caption_counts() != [len(c) for c in captions[shard]]:
            return False  # a stale file another part has not rewritten yet
    meta = {"format": FORMAT, "fingerprint": fp, "dtype": dtype, "max_length": encoder.max_length,
            "dim": encoder.dim, "shards": {s: len(captions[s]) for s in sorted(captions)},
            "captions": {s: sum(len(c) for c in captions[s]) for s in sorted(captions)}}
    write_json_atomic(join(cache_dir, META), meta, storage_options)  # last: the cache is complete
    return True


class TextEmbeddingCache:
    """Reads a cache: ``lookup(shards, sample_indices[, caption_indices]) -> (emb (B, T, C) float32, mask (B, T)
    bool)``.

    ``expect``: fingerprint fields (e.g. ``encoder.fingerprint()``) the cache must match, else ValueError.
    """

    def __init__(self, cache_dir: str, expect: dict | None = None, storage_options: dict | None = None,
                 max_headers: int = 4096, node_cache: NodeCache | None = None):
        self.url = str(cache_dir)
        self.fs, self.root = fs_and_path(cache_dir, storage_options)
        self.local = is_local(self.url)
        self.node_cache = None if self.local else node_cache
        meta_path = f"{self.root}/{META}"
        if not self.fs.exists(meta_path):
            raise FileNotFoundError(f"{meta_path} not found: the text-embedding cache is missing or incomplete; "
                                    "run precompute_text_embeddings for this dataset (every part)")
        raw_meta = self.fs.cat_file(meta_path)
        self.version = hashlib.sha256(raw_meta).hexdigest()[:16]  # a rebuilt cache gets new node-cache copies
        self.meta = json.loads(raw_meta)
        if self.meta.get("format") not in READ_FORMATS:
            raise ValueError(f"{meta_path}: cache format {self.meta.get('format')!r}, this code reads formats "
                             f"{', '.join(map(str, READ_FORMATS))}; rebuild the cache with precompute_text_embeddings")
        self.fingerprint = self.meta["fingerprint"]
        if expect is not None:
            diff = {k: (self.fingerprint.get(k), v) for k, v in expect.items() if self.fingerprint.get(k) != v}
            if diff:
                raise ValueError(f"text-embedding cache {self.url} was made with a different encoder setup "
                                 f"(key: (cache, expected)) {diff}; rebuild it or encode online")
        self.max_length, self.dim = int(self.meta["max_length"]), int(self.meta["dim"])
        self.num_samples: dict[str, int] = self.meta["shards"]
        self._headers: OrderedDict[str, ShardHeader] = OrderedDict()
        self.max_headers = max_headers
        self._null: tuple[torch.Tensor, torch.Tensor] | None = None
        self._files: OrderedDict[str, object] = OrderedDict()  # open local copies (local cache or node cache)

    def remote_file(self, shard: str) -> RemoteFile | None:
        """The file of a data shard as the node cache fetches it (None for a local cache or without one)."""
        if self.node_cache is None:
            return None
        return RemoteFile(join(self.url, shard_file(shard)), None, self.version)

    def _read(self, shard: str, start: int, end: int) -> bytes:
        if self.node_cache is None and not self.local:
            return self.fs.cat_file(f"{self.root}/{shard_file(shard)}", start=start, end=end)
        handle = self._files.get(shard)
        if handle is None:
            if self.local:
                handle = open(f"{self.root}/{shard_file(shard)}", "rb")
            else:
                handle = self.node_cache.open(self.remote_file(shard))
            self._files[shard] = handle
            while len(self._files) > 64:
                self._files.popitem(last=False)[1].close()
        self._files.move_to_end(shard)
        return os.pread(handle.fileno(), end - start, start)

    def _header(self, shard: str) -> ShardHeader:
        if shard not in self._headers:
            if shard not in self.num_samples:
                raise KeyError(f"shard {shard!r} is not in the text-embedding cache {self.url}; rebuild the cache "
                               "for this dataset")
            stale = self._files.pop(shard, None)  # a header read afresh opens the file afresh
            if stale is not None:
                stale.close()
            header = parse_shard_header(lambda a, b: self._read(shard, a, b), f"{self.root}/{shard_file(shard)}")
            if header.fingerprint != self.fingerprint:
                raise ValueError(f"{header.path} was written by another encoder setup than meta.json "
                                 f"({header.fingerprint} vs {self.fingerprint}); rebuild the cache")
            self._headers[shard] = header
            while len(self._headers) > self.max_headers:
                self._headers.popitem(last=False)
        self._headers.move_to_end(shard)
        return self._headers[shard]

    def lookup(self, shards: str | Sequence[str], sample_indices,
               caption_indices=None) -> tuple[torch.Tensor, torch.Tensor]:
        """States of samples (shard, sample_index): one shard name for all, or one per sample; caption
        ``caption_indices[b]`` of each sample (default 0, the samples.parquet caption)."""
        idx = [int(i) for i in sample_indices]
        cidx = [0] * len(idx) if caption_indices is None else [int(c) for c in caption_indices]
        shards = [shards] * len(idx) if isinstance(shards, str) else list(shards)
        if len(shards) != len(idx) or len(cidx) != len(idx):
            raise ValueError(f"lookup: {len(shards)} shards and {len(cidx)} caption indices for {len(idx)} samples")
        headers, starts, ends, caps = [], [], [], []
        for shard, i, c in zip(shards, idx, cidx):
            h = self._header(shard)
            if not 0 <= i < h.num_samples:
                raise IndexError(f"sample_index {i} outside shard {shard} of {h.num_samples} samples")
            count = h.first_caption[i + 1] - h.first_caption[i]
            if not 0 <= c < count:
                raise IndexError(f"caption_index {c} outside the {count} captions of sample {i} of shard {shard} in "
                                 f"{self.url}; rebuild the cache after the score stage (precompute_text_embeddings)")
            k = h.first_caption[i] + c  # caption number inside the shard file
            row = h.dim * h.dtype.itemsize  # bytes of one token state
            headers.append(h)
            caps.append(k)
            starts.append(h.data_start + h.offsets[k] * row)
            ends.append(h.data_start + h.offsets[k + 1] * row)
        if self.node_cache is None and not self.local:  # one small concurrent GET per sample
            blobs = self.fs.cat_ranges([h.path for h in headers], starts, ends, on_error="raise") if headers else []
        else:
            blobs = [self._read(shard, a, b) for shard, a, b in zip(shards, starts, ends)]
        emb = torch.zeros(len(idx), self.max_length, self.dim)  # (B, T, C)
        mask = torch.zeros(len(idx), self.max_length, dtype=torch.bool)  # (B, T)
        for b, (blob, h, k) in enumerate(zip(blobs, headers, caps)):
            length = h.lengths[k]
            if length == 0:  # an empty caption with a tokenizer that adds no special token
                continue
            states = torch.frombuffer(bytearray(blob), dtype=h.dtype).view(length, h.dim)  # (len, C)
            emb[b, :length] = states.float()
            mask[b, :length] = True
        return emb, mask

    def null(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The cached unconditional embedding repeated ``batch`` times: (B, T, C), (B, T)."""
        if self._null is None:
            d = st_load(self.fs.cat_file(f"{self.root}/{NULL}"))
            self._null = d["emb"].float(), d["mask"].bool()
        emb, mask = self._null
        return emb.expand(batch, -1, -1).clone(), mask.expand(batch, -1).clone()
