"""Conditions of a batch and the frozen networks that make them (outside the DeepSpeed engine).

``build_conditioner`` returns a callable ``batch -> (cond, null_cond)``, the model's keyword arguments:
 - class-conditional: ``{"y": (B,) class ids}`` from the ``label`` column; null = the null class id;
 - text-to-image, ``conditioning.text_mode=online``: the frozen ``TextEncoder`` encodes the captions of
   every batch: ``{"context": (B, T, C), "context_mask": (B, T) bool}``; null = the empty-prompt embedding;
 - text-to-image, ``text_mode=cached``: embeddings precomputed per shard (``TextEmbeddingCache``, one per
   dataset root of the stage, checked against the encoder fingerprint) looked up by (source, shard,
   sample_index, caption_index: the caption the loader drew); null = the cache's null embedding. A cache on
   S3 is read through the node cache, and ``TextConditioner.prefetch_files`` lets the loader fetch each
   shard's embeddings with the shard.
   The encoder is loaded only if ``conditioning.text_encoder`` is set (for the preview prompts); without
   it, previews use the captions of the first batch.
``build_teacher`` loads the frozen DINOv2 teacher when any stage uses REPA (else None).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from pixeldit.errors import ConfigError
from pixeldit.models import ModelArgs

from .config import RunConfig

Cond = dict[str, torch.Tensor]


class ClassConditioner:
    def __init__(self, num_classes: int, device: torch.device):
        self.num_classes, self.device = num_classes, device

    def __call__(self, batch: dict[str, Any]) -> tuple[Cond, Cond]:
        y = batch["label"].to(self.device)  # (B,)
        return {"y": y}, {"y": torch.full_like(y, self.num_classes)}

    def for_prompts(self, count: int) -> tuple[Cond, Cond]:
        """Conditions of a preview grid: classes 0, 1, ... (mod num_classes)."""
        y = torch.arange(count, device=self.device) % self.num_classes
        return {"y": y}, {"y": torch.full_like(y, self.num_classes)}


class TextConditioner:
    """Captions -> text-encoder states, online (``encoder``) or from the embedding caches (``caches``: one per
    dataset root of the stage, indexed by the batch's ``source``)."""

    def __init__(self, device: torch.device, encoder=None, caches: list | None = None,
                 preview_prompts: list[str] | None = None):
        if encoder is None and not caches:
            raise ValueError("text conditioning needs a text encoder or an embedding cache")
        self.device, self.encoder, self.caches = device, encoder, list(caches or [])
        self.cache = self.caches[0] if self.caches else None
        self.preview_prompts = preview_prompts or []
        self._first: Cond | None = None  # first batch's condition: preview fallback without an encoder

    def _pack(self, emb: torch.Tensor, mask: torch.Tensor) -> Cond:
        return {"context": emb.to(self.device), "context_mask": mask.to(self.device)}  # (B, T, C), (B, T)

    def null(self, batch_size: int) -> Cond:
        source = self.cache if self.cache is not None else self.encoder
        emb, mask = source.null(batch_size) if source is self.cache else source.encode_null(batch_size)
        return self._pack(emb, mask)

    def prefetch_files(self, source: int, shard: str) -> list:
        """Files of the node cache to fetch together with a data shard (its caption embeddings)."""
        f = self.caches[source].remote_file(shard) if self.caches else None
        return [f] if f is not None else []

    def check_captions(self, sources) -> None:
        """Every root whose samples have several captions (``pixeldit.train.sources.SourceSet.caption_sets``)
        needs an embedding cache holding all of them: per shard, as many captions in the cache's meta.json as in
        captions.parquet. Raises ``ConfigError`` naming the cache and a shard; nothing to check when online."""
        if not self.caches:
            return
        for s, sets in enumerate(sources.caption_sets):
            if sets is None:
                continue
            index, cache = sources.indexes[s], self.caches[s]
            want = np.bincount(index.shard_id, weights=np.diff(sets.offsets), minlength=len(index.shards))
            held = cache.meta.get("captions") or cache.num_samples  # format 2: one caption per sample
            wrong = [(shard, held.get(shard), int(n)) for shard, n in zip(index.shards, want) if held.get(shard) != n]
            if wrong:
                shard, have, need = wrong[0]
                raise ConfigError(f"caption-embedding cache {cache.url} holds {have} captions of shard {shard} where "
                                  f"{sources.roots[s]} draws among {need} ({len(wrong)} such shards): rebuild the "
                                  f"cache after the score stage (precompute_text_embeddings) or use text_mode=online")

    def _lookup(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        sources = batch.get("source") or [0] * len(batch["shard"])
        captions = batch.get("caption_index")  # the caption drawn for each sample (None: caption 0)
        if len(set(sources)) == 1:
            return self.caches[sources[0]].lookup(batch["shard"], batch["sample_index"], captions)
        emb = mask = None
        for s in sorted(set(sources)):
            idx = [i for i, x in enumerate(sources) if x == s]
            e, m = self.caches[s].lookup([batch["shard"][i] for i in idx], batch["sample_index"][idx],
                                         None if captions is None else captions[idx])
            if emb is None:
                emb = e.new_zeros((len(sources),) + e.shape[1:])  # (B, T, C)
                mask = m.new_zeros((len(sources),) + m.shape[1:])  # (B, T)
            emb[idx], mask[idx] = e, m
        return emb, mask

    def __call__(self, batch: dict[str, Any]) -> tuple[Cond, Cond]:
        if self.caches:
            cond = self._pack(*self._lookup(batch))
        else:
            cond = self._pack(*self.encoder.encode(batch["caption"]))
        if self._first is None:
            self._first = {k: v.detach().clone() for k, v in cond.items()}
        return cond, self.null(len(batch["caption"]))

    def for_prompts(self, count: int) -> tuple[Cond, Cond]:
        if self.encoder is not None and self.preview_prompts:
            prompts = [self.preview_prompts[i % len(self.preview_prompts)] for i in range(count)]
            cond = self._pack(*self.encoder.encode(prompts))
        elif self._first is not None:
            idx = torch.arange(count) % self._first["context"].shape[0]
            cond = {k: v[idx.to(v.device)] for k, v in self._first.items()}
        else:
            raise RuntimeError("no preview prompts: set conditioning.text_encoder or train one step first")
        return cond, self.null(count)


def resolved_system_prompt(cfg: RunConfig, args: ModelArgs) -> str:
    """The system prompt a text model is trained with ("" for class models), for checkpoint metadata."""
    if args.conditioning == "class":
        return ""
    from pixeldit.conditioning import resolve_system_prompt

    return resolve_system_prompt(cfg.conditioning.system_prompt)


def load_text_encoder(cfg: RunConfig, args: ModelArgs, device: torch.device):
    """The frozen TextEncoder of a text-to-image run (None for class models or a cache-only run)."""
    c = cfg.conditioning
    if args.conditioning == "class" or not c.text_encoder:
        return None
    from pixeldit.conditioning import TextEncoder

    dtype = torch.bfloat16 if cfg.deepspeed.precision == "bf16" and device.type == "cuda" else torch.float32
    encoder = TextEncoder.from_pretrained(c.text_encoder, system_prompt=c.system_prompt, max_length=args.text_len,
                                          dtype=dtype, device=device,
                                          keep_padding_states=args.text_padding == "unmasked")
    if encoder.dim != args.text_dim:
        raise ValueError(f"conditioning.text_encoder {c.text_encoder} has width {encoder.dim} but the model "
                         f"expects text_dim={args.text_dim}; set model.overrides.text_dim={encoder.dim}")
    return encoder


def build_conditioner(cfg: RunConfig, args: ModelArgs, device: torch.device, stage_index: int, encoder=None,
                      node_cache=None):
    """Conditioner of stage ``stage_index`` (the embedding caches belong to the stage's dataset roots;
    ``node_cache``: where caches on S3 are read through)."""
    if args.conditioning == "class":
        return ClassConditioner(args.num_classes, device)
    c = cfg.conditioning
    caches = []
    if c.text_mode == "cached" and args.text_padding == "unmasked":
        raise ValueError("model text_padding=unmasked sees the encoder's padding states, which the embedding cache "
                         "does not store; set conditioning.text_mode=online")
    if c.text_mode == "cached":
        from data_pipeline.dataset_format import text_embedding_dir
        from pixeldit.conditioning import TextEmbeddingCache

        expect = encoder.fingerprint() if encoder is not None else {
            "system_prompt": resolved_system_prompt(cfg, args), "max_length": args.text_len, "dim": args.text_dim}
        roots = [src.path for src in cfg.stages[stage_index].data_sources()]
        if c.embedding_cache and len(roots) > 1:
            raise ValueError(f"conditioning.embedding_cache names one cache but stage {stage_index} has {len(roots)} "
                             f"dataset roots; leave it empty (each root's {text_embedding_dir('ROOT')})")
        caches = [TextEmbeddingCache(c.embedding_cache or text_embedding_dir(root), expect=expect,
                                     storage_options=cfg.data.storage_options, node_cache=node_cache)
                  for root in roots]
    return TextConditioner(device, encoder, caches, cfg.logging.image_prompts)


def build_teacher(cfg: RunConfig, device: torch.device):
    """The frozen DINOv2 teacher for REPA, or None when no stage uses REPA."""
    if not cfg.uses_repa:
        return None
    from pixeldit.conditioning import DinoV2Teacher

    return DinoV2Teacher.from_pretrained(cfg.conditioning.repa_teacher).to(device).eval()
