"""Frozen text encoder (Gemma-2 by default; any transformers encoder folder works).

A system prompt (Sana's "complex human instruction" style) is prepended to each user prompt. The
(first token + system + prompt) sequence is padded/truncated to 1 + len(system) + max_length - 1 tokens and
the states kept are the first token plus the last ``max_length - 1`` positions: every caption gives
exactly ``max_length`` states, the user prompt's tokens (contextualised by the system prompt that precedes
them in a causal encoder such as Gemma-2) and padding. The unconditional (CFG) embedding encodes
the empty prompt WITHOUT the system prompt.
"""
from __future__ import annotations

import os

import torch

DEFAULT_SYSTEM_PROMPT = (
    "Given a user prompt, generate an 'Enhanced prompt' that provides detailed visual descriptions suitable "
    "for image generation. Evaluate the level of detail in the user prompt: if it is simple, add details about "
    "colour, shape, texture, composition and lighting while keeping its meaning. Here is the user prompt: "
)


class TextEncoder:
    """Tokenizer + frozen encoder. ``encode(prompts) -> (emb (B, T, C) float32, mask (B, T) bool)``."""

    def __init__(self, tokenizer, model, system_prompt: str = "", max_length: int = 300, name: str = ""):
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {max_length}")
        self.tokenizer, self.model = tokenizer, model.eval().requires_grad_(False)
        self.system_prompt, self.max_length, self.name = system_prompt, max_length, name
        self.dim = int(model.config.hidden_size)
        self.sys_tokens = len(tokenizer(system_prompt, add_special_tokens=False)["input_ids"]) if system_prompt else 0
        self._null: tuple[torch.Tensor, torch.Tensor] | None = None

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, system_prompt: str | None = None, max_length: int = 300,
                        dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> "TextEncoder":
        """Load tokenizer + encoder from a local folder (never downloads). For a causal LM checkpoint
        such as Gemma-2 the base model's last hidden states are used."""
        if not path or not os.path.isdir(path):
            raise FileNotFoundError(f"text encoder folder {path!r} not found: pass a local transformers model folder "
                                    "(e.g. a Gemma-2-2B-IT snapshot) with config.json, weights and tokenizer files")
        from transformers import AutoModel, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token or tok.unk_token
        tok.padding_side = "right"
        model = AutoModel.from_pretrained(path, torch_dtype=dtype, local_files_only=True).to(device)
        sp = DEFAULT_SYSTEM_PROMPT if system_prompt is None else system_prompt
        return cls(tok, model, system_prompt=sp, max_length=max_length, name=str(path))

    def to(self, device: str | torch.device) -> "TextEncoder":
        self.model.to(device)
        self._null = None
        return self

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def _run(self, texts: list[str], total: int) -> tuple[torch.Tensor, torch.Tensor]:
        batch = self.tokenizer(texts, padding="max_length", max_length=total, truncation=True, return_tensors="pt")
        ids = batch["input_ids"].to(self.device)
        att = batch["attention_mask"].to(self.device)
        hidden = self.model(input_ids=ids, attention_mask=att).last_hidden_state  # (B, total, C)
        keep = [0] + list(range(total - self.max_length + 1, total))  # first token + last max_length-1
        return hidden[:, keep].float(), att[:, keep].bool()  # (B, T, C), (B, T)

    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Embed user prompts (the system prompt is prepended)."""
        if isinstance(prompts, str):
            raise TypeError("encode() takes a list of prompts, not a single string")
        texts = [self.system_prompt + (p or "") for p in prompts]
        return self._run(texts, 1 + self.sys_tokens + self.max_length - 1)

    def encode_null(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The unconditional embedding: the empty prompt without the system prompt, repeated ``batch`` times."""
        if self._null is None:
            self._null = self._run([""], self.max_length)
        emb, mask = self._null
        return emb.expand(batch, -1, -1).clone(), mask.expand(batch, -1).clone()

    def fingerprint(self) -> dict:
        """What must match between a cache and the encoder that reads it."""
        return {"encoder": self.name, "system_prompt": self.system_prompt, "max_length": self.max_length, "dim": self.dim}
