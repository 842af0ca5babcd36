"""Frozen text encoder (Gemma-2 by default; any transformers encoder folder works).

A system prompt (Sana's "complex human instruction" style, configurable) is prepended to each user
prompt. The sequence [first token, system prompt, user prompt] is right-padded / truncated to
``1 + len(system) + max_length - 1`` tokens and the states kept are the first token plus the last
``max_length - 1`` positions, i.e. the user prompt's tokens (contextualised by the system prompt before
them in a causal encoder such as Gemma-2) and padding: every caption gives exactly ``max_length`` states
(300 by default: the first token + the last 299), a longer prompt keeps its first ``max_length - 1``
tokens. States at padding positions (mask False) are zero, as in the embedding cache, which stores only
the valid ones; ``keep_padding_states=True`` returns them as the encoder computed them, as the official
PixelDiT pipeline feeds its model (``ModelArgs.text_padding="unmasked"``; online encoding only). The
unconditional (CFG) embedding encodes the empty prompt WITHOUT the system prompt.

The system prompt counts as the tokens it occupies in front of a user prompt: a trailing space that the
tokenizer merges into the user's first word (SentencePiece "▁", e.g. Gemma) is not counted twice, which
is the official pipeline's "- 2" ([bos] and [▁]). Named system prompts (``SYSTEM_PROMPTS``): "pixeldit"
(``DEFAULT_SYSTEM_PROMPT``) and "official", the complex human instruction the official text-to-image model
was trained with (its seven lines joined by newlines).

Loading: a causal-LM checkpoint (e.g. gemma-2-2b-it) loads as its base model (``AutoModel``) whose last
hidden states (after the final norm) are the embeddings; an encoder-decoder one (T5) uses its encoder.
Nothing is ever downloaded: ``path`` is a local folder.
"""
from __future__ import annotations

import hashlib
import os
from typing import Literal

import torch

DEFAULT_SYSTEM_PROMPT = (
    "Given a user prompt, generate an 'Enhanced prompt' that provides detailed visual descriptions suitable "
    "for image generation. Evaluate the level of detail in the user prompt: if it is simple, add details about "
    "colour, shape, texture, composition and lighting while keeping its meaning. Here is the user prompt: "
)
OFFICIAL_SYSTEM_PROMPT = "\n".join([
    'Given a user prompt, generate an "Enhanced prompt" that provides detailed visual descriptions suitable for '
    'image generation. Evaluate the level of detail in the user prompt:',
    "- If the prompt is simple, focus on adding specifics about colors, shapes, sizes, textures, and spatial "
    "relationships to create vivid and concrete scenes.",
    "- If the prompt is already detailed, refine and enhance the existing details slightly without overcomplicating.",
    "Here are examples of how to transform or refine prompts:",
    "- User Prompt: A cat sleeping -> Enhanced: A small, fluffy white cat curled up in a round shape, sleeping "
    "peacefully on a warm sunny windowsill, surrounded by pots of blooming red flowers.",
    "- User Prompt: A busy city street -> Enhanced: A bustling city street scene at dusk, featuring glowing street "
    "lamps, a diverse crowd of people in colorful clothing, and a double-decker bus passing by towering glass "
    "skyscrapers.",
    "Please generate only the enhanced description for the prompt below and avoid including any additional "
    "commentary or evaluations:",
    "User Prompt: ",
])
SYSTEM_PROMPTS: dict[str, str] = {"pixeldit": DEFAULT_SYSTEM_PROMPT, "official": OFFICIAL_SYSTEM_PROMPT}


def resolve_system_prompt(value: str | None) -> str:
    """None -> ``DEFAULT_SYSTEM_PROMPT``; a name of ``SYSTEM_PROMPTS`` -> its text; any other string as written."""
    if value is None:
        return DEFAULT_SYSTEM_PROMPT
    return SYSTEM_PROMPTS.get(value, value)


DtypeName = Literal["fp32", "bf16", "fp16"]
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_dtype(dtype: DtypeName | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; valid: {', '.join(DTYPES)} or a torch.dtype")
    return DTYPES[dtype]


class TextEncoder:
    """Tokenizer + frozen encoder. ``encode(prompts) -> (emb (B, T, C) float32, mask (B, T) bool)``, T = max_length."""

    def __init__(self, tokenizer, model, system_prompt: str = "", max_length: int = 300, name: str = "",
                 keep_padding_states: bool = False):
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {max_length}")
        if getattr(model.config, "is_encoder_decoder", False):
            model = model.get_encoder()
        self.tokenizer, self.model = tokenizer, model.eval().requires_grad_(False)
        self.system_prompt, self.max_length, self.name = system_prompt, max_length, name
        self.keep_padding_states = keep_padding_states
        self.dim = int(model.config.hidden_size)
        self.sys_tokens = self._prompt_tokens(tokenizer, system_prompt)
        self._null: tuple[torch.Tensor, torch.Tensor] | None = None

    @staticmethod
    def _prompt_tokens(tokenizer, system_prompt: str) -> int:
        """Tokens the system prompt keeps in front of a user prompt: the common prefix of its tokens alone and
        followed by a word (a trailing space merged into that word does not count)."""
        if not system_prompt:
            return 0
        alone = tokenizer(system_prompt, add_special_tokens=False)["input_ids"]
        joined = tokenizer(system_prompt + "a", add_special_tokens=False)["input_ids"]
        n = 0
        while n < min(len(alone), len(joined)) and alone[n] == joined[n]:
            n += 1
        return n

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, system_prompt: str | None = None, max_length: int = 300,
                        dtype: DtypeName | torch.dtype = torch.float32, device: str | torch.device = "cpu",
                        keep_padding_states: bool = False) -> "TextEncoder":
        """Load tokenizer + encoder from a local folder. ``system_prompt``: None (``DEFAULT_SYSTEM_PROMPT``),
        a name of ``SYSTEM_PROMPTS`` or the text itself."""
        if not path or not os.path.isdir(path):
            raise FileNotFoundError(f"text encoder folder {str(path)!r} not found: pass a local transformers model "
                                    "folder (e.g. a gemma-2-2b-it snapshot) with config.json, weights and tokenizer")
        from transformers import AutoModel, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token or tok.unk_token
        if tok.pad_token is None:
            raise ValueError(f"{path}: the tokenizer has no pad, eos or unk token to pad with")
        tok.padding_side = "right"
        tok.truncation_side = "right"
        model = AutoModel.from_pretrained(path, dtype=resolve_dtype(dtype), local_files_only=True).to(device)
        vocab = model.get_input_embeddings().num_embeddings
        if len(tok) > vocab:
            raise ValueError(f"{path}: tokenizer has {len(tok)} tokens but the model's embedding only {vocab}")
        return cls(tok, model, system_prompt=resolve_system_prompt(system_prompt), max_length=max_length,
                   name=os.path.basename(os.path.normpath(str(path))), keep_padding_states=keep_padding_states)

    def to(self, device: str | torch.device) -> "TextEncoder":
        self.model.to(device)
        self._null = None
        return self

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def _run(self, texts: list[str], total: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokenise to ``total`` tokens, keep the first + the last max_length - 1 states."""
        batch = self.tokenizer(texts, padding="max_length", max_length=total, truncation=True, return_tensors="pt")
        ids = batch["input_ids"].to(self.device)  # (B, total)
        att = batch["attention_mask"].to(self.device)  # (B, total)
        hidden = self.model(input_ids=ids, attention_mask=att).last_hidden_state  # (B, total, C)
        keep = torch.tensor([0] + list(range(total - self.max_length + 1, total)), device=self.device)
        mask = att[:, keep].bool()  # (B, T)
        states = hidden[:, keep].float()  # (B, T, C)
        if self.keep_padding_states:
            return states, mask  # (B, T, C) as encoded, (B, T)
        return states * mask[..., None], mask  # (B, T, C) zero at padding, (B, T)

    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Embed user prompts (system prompt prepended) -> (emb (B, T, C) float32, mask (B, T) bool)."""
        if isinstance(prompts, str) or not all(isinstance(p, str) or p is None for p in prompts):
            raise TypeError("encode() takes a list of prompt strings")
        texts = [self.system_prompt + (p or "") for p in prompts]
        return self._run(texts, 1 + self.sys_tokens + self.max_length - 1)

    def encode_null(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The unconditional embedding: the empty prompt without the system prompt, repeated ``batch`` times."""
        if self._null is None:
            self._null = self._run([""], self.max_length)
        emb, mask = self._null
        return emb.expand(batch, -1, -1).clone(), mask.expand(batch, -1).clone()  # (B, T, C), (B, T)

    def weights_digest(self) -> str:
        """Short hash of the first input-embedding rows (in bf16, so fp32/bf16 loads agree): tells encoders apart."""
        rows = self.model.get_input_embeddings().weight[:8].detach().to("cpu", torch.bfloat16)
        return hashlib.sha256(rows.view(torch.int16).numpy().tobytes()).hexdigest()[:16]

    def fingerprint(self) -> dict:
        """What must match between an embedding cache and the encoder setup that reads it."""
        fp = {"encoder": self.name, "weights": self.weights_digest(), "system_prompt": self.system_prompt,
              "max_length": self.max_length, "dim": self.dim}
        if self.keep_padding_states:  # only then, so caches written before this key keep matching
            fp["padding_states"] = "keep"
        return fp
