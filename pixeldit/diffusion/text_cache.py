"""Precomputed caption embeddings, so training does not run the text encoder every step.

Layout of a cache folder (local or any fsspec URL, e.g. s3://bucket/prefix/text_emb)::

    meta.json                 encoder fingerprint (name, system prompt, max_length, dim) and the shard list
    null.safetensors          the unconditional embedding (1, T, C) + mask (1, T)
    shards/{shard}.safetensors  per data shard: emb (N, T, C) float16 and mask (N, T) uint8, row i = sample_index i

``precompute_text_embeddings`` reads the dataset's samples.parquet (data_pipeline layout), encodes every
caption shard by shard, and writes meta.json last. ``TextEmbeddingCache`` refuses a cache made by a
different encoder / system prompt / max_length.
"""
from __future__ import annotations

import json
from collections import OrderedDict

import fsspec
from fsspec.implementations.local import LocalFileSystem
import pyarrow.parquet as pq
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from tqdm.auto import tqdm

from .text_encoder import TextEncoder


def _fs(url: str, storage_options: dict | None):
    fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
    return fs, root.rstrip("/")


def _shard_file(shard: str) -> str:
    return "shards/" + shard.replace("/", "__") + ".safetensors"


def _write_bytes(fs, path: str, data: bytes) -> None:
    """Whole-object write: a temp name then a rename on local disks; one PUT (atomic) on object stores."""
    if isinstance(fs, LocalFileSystem):
        tmp = path + ".tmp"
        with fs.open(tmp, "wb") as f:
            f.write(data)
        fs.mv(tmp, path)
    else:
        fs.pipe_file(path, data)


def precompute_text_embeddings(data_root: str, encoder: TextEncoder, cache_dir: str | None = None,
                               batch_size: int = 64, storage_options: dict | None = None,
                               progress: bool = True) -> str:
    """Encode every caption of the dataset at ``data_root``; returns the cache folder URL."""
    cache_dir = cache_dir or data_root.rstrip("/") + "/text_emb"
    dfs, droot = _fs(data_root, storage_options)
    cfs, croot = _fs(cache_dir, storage_options)
    samples_path = f"{droot}/samples.parquet"
    if not dfs.exists(samples_path):
        raise FileNotFoundError(f"{samples_path} not found: build the dataset with `pixeldit-data shard` first")
    with dfs.open(samples_path, "rb") as f:
        table = pq.read_table(f, columns=["shard", "sample_index", "caption"])
    rows: dict[str, list[tuple[int, str]]] = {}
    for shard, idx, cap in zip(*(table.column(c).to_pylist() for c in ("shard", "sample_index", "caption"))):
        rows.setdefault(shard, []).append((idx, cap or ""))
    cfs.makedirs(f"{croot}/shards", exist_ok=True)
    for shard, items in tqdm(sorted(rows.items()), desc="text embeddings", disable=not progress):
        items.sort()
        if [i for i, _ in items] != list(range(len(items))):
            raise ValueError(f"{samples_path}: sample_index of shard {shard} is not 0..{len(items) - 1}")
        embs, masks = [], []
        for s in range(0, len(items), batch_size):
            e, m = encoder.encode([c for _, c in items[s:s + batch_size]])
            embs.append(e.half().cpu())
            masks.append(m.to(torch.uint8).cpu())
        _write_bytes(cfs, f"{croot}/{_shard_file(shard)}", st_save({"emb": torch.cat(embs), "mask": torch.cat(masks)}))
    ne, nm = encoder.encode_null(1)
    _write_bytes(cfs, f"{croot}/null.safetensors", st_save({"emb": ne.half().cpu(), "mask": nm.to(torch.uint8).cpu()}))
    meta = {"fingerprint": encoder.fingerprint(), "shards": sorted(rows)}
    _write_bytes(cfs, f"{croot}/meta.json", json.dumps(meta, indent=1).encode())  # last: marks the cache complete
    return cache_dir


class TextEmbeddingCache:
    """Reads a cache; ``lookup(shards, sample_indices) -> (emb (B, T, C) float32, mask (B, T) bool)``."""

    def __init__(self, cache_dir: str, expect: dict | None = None, storage_options: dict | None = None,
                 max_shards_in_memory: int = 8):
        self.url = cache_dir
        self.fs, self.root = _fs(cache_dir, storage_options)
        meta_path = f"{self.root}/meta.json"
        if not self.fs.exists(meta_path):
            raise FileNotFoundError(f"{meta_path} not found: the text-embedding cache is missing or incomplete; "
                                    "run precompute_text_embeddings (pixeldit-data embed) for this dataset")
        self.meta = json.loads(self.fs.cat_file(meta_path))
        if expect is not None:
            got = self.meta["fingerprint"]
            diff = {k: (got.get(k), v) for k, v in expect.items() if got.get(k) != v}
            if diff:
                raise ValueError(f"text-embedding cache {cache_dir} was made with a different encoder setup "
                                 f"(key: (cache, expected)) {diff}; rebuild it or use text_mode=online")
        self.shards = set(self.meta["shards"])
        self._loaded: OrderedDict[str, dict[str, torch.Tensor]] = OrderedDict()
        self.max_shards = max_shards_in_memory

    def _shard(self, shard: str) -> dict[str, torch.Tensor]:
        if shard not in self._loaded:
            if shard not in self.shards:
                raise KeyError(f"shard {shard!r} is not in the text-embedding cache {self.url}; rebuild the cache")
            self._loaded[shard] = st_load(self.fs.cat_file(f"{self.root}/{_shard_file(shard)}"))
            while len(self._loaded) > self.max_shards:
                self._loaded.popitem(last=False)
        self._loaded.move_to_end(shard)
        return self._loaded[shard]

    def lookup(self, shards, sample_indices) -> tuple[torch.Tensor, torch.Tensor]:
        idx = [int(i) for i in sample_indices]
        embs, masks = [], []
        for shard, i in zip(shards, idx):
            d = self._shard(shard)
            embs.append(d["emb"][i])
            masks.append(d["mask"][i])
        return torch.stack(embs).float(), torch.stack(masks).bool()

    def null(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        d = st_load(self.fs.cat_file(f"{self.root}/null.safetensors"))
        return d["emb"].float().expand(batch, -1, -1).clone(), d["mask"].bool().expand(batch, -1).clone()
