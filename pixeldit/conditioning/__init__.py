"""The frozen networks that turn captions and images into conditions, and the caption-embedding cache.

- ``text_encoder``: ``TextEncoder`` (Gemma-2 or any local transformers encoder) with the system prompt
- ``text_cache``: ``precompute_text_embeddings`` / ``TextEmbeddingCache``, caption embeddings stored per data
  shard (default folder: ``data_pipeline.dataset_format.text_embedding_dir(root)``)
- ``teacher``: ``DinoV2Teacher``, the frozen DINOv2 of REPA (its projector and loss: ``pixeldit.diffusion.repa``)

Nothing here is trained and nothing is downloaded: every network loads from a local folder.
"""
from .teacher import DinoV2Teacher
from .text_cache import TextEmbeddingCache, precompute_text_embeddings
from .text_encoder import (DEFAULT_SYSTEM_PROMPT, OFFICIAL_SYSTEM_PROMPT, SYSTEM_PROMPTS, TextEncoder,
                           resolve_system_prompt)

__all__ = ["DinoV2Teacher", "TextEmbeddingCache", "precompute_text_embeddings", "DEFAULT_SYSTEM_PROMPT",
           "OFFICIAL_SYSTEM_PROMPT", "SYSTEM_PROMPTS", "TextEncoder", "resolve_system_prompt"]
