"""The one size table of PixelDiT.

Every model size lives in ``MODEL_SIZES``: the CLI choices, checkpoint/release metadata and the FLOP
counter all read it. Architecture arguments (``ModelArgs``) are separate from the run config: the
model never sees the job config.

Sizes (paper, arXiv 2511.20645, and its public release):

| name      | N patch blocks | M PiT blocks | D    | heads | pixel attention width / heads |
|-----------|----------------|--------------|------|-------|-------------------------------|
| B/16      | 12             | 2            | 768  | 12    | 768 / 12                      |
| L/16      | 22             | 4            | 1024 | 16    | 1024 / 16                     |
| XL/16     | 26             | 4            | 1152 | 16    | 1152 / 16                     |
| T2I       | 14 (MM-DiT)    | 2            | 1536 | 24    | 1152 / 16                     |
| debug     | 2              | 1            | 64   | 4     | 64 / 4                        |
| debug-T2I | 2 (MM-DiT)     | 1            | 64   | 4     | 64 / 4                        |
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Literal

Conditioning = Literal["class", "text"]
CONDITIONINGS: tuple[str, ...] = ("class", "text")
RopePositions = Literal["normalized", "integer"]
ROPE_POSITIONS: tuple[str, ...] = ("normalized", "integer")
LayerStyle = Literal["pixeldit", "official"]
LAYER_STYLES: tuple[str, ...] = ("pixeldit", "official")
TextPadding = Literal["masked", "unmasked"]
TEXT_PADDINGS: tuple[str, ...] = ("masked", "unmasked")
# Fields added after the first release format, with the value that reproduces models saved before them:
# a ``model_args`` dict without the key was written by code that had only this behaviour.
LEGACY_DEFAULTS: dict[str, Any] = {"rope_positions": "integer"}


@dataclass(frozen=True)
class ModelArgs:
    """Architecture arguments of one PixelDiT.

    ``conditioning="class"``: patch pathway of plain DiT blocks, global condition SiLU(t_emb + y_emb).
    ``conditioning="text"``: patch pathway of MM-DiT blocks (image + text streams, joint attention),
    both streams modulated by the timestep only.

    ``rope_positions``: where 2D RoPE places the patch grid. ``"normalized"`` (the official model and the
    default): ``linspace(0, 16, n)`` along each axis, so every resolution spans the same position range and
    the 1024 stage reuses the positions learned at 512. ``"integer"``: positions 0..n-1 (models trained
    before this field existed; ``from_dict`` fills it in for them).

    ``post_modulation``: PiT blocks scale and shift the attention and MLP *outputs* per pixel (4 chunks:
    scale1, shift1, scale2, shift2; no gates) instead of AdaLN-Zero's 6-way pre-modulation with gates
    (the official fix for the loss spikes of NVlabs/PixelDiT issue 6, their PR 8).

    ``layer_style="official"``: the layer details of the NVlabs reference, so its checkpoints load exactly
    (``pixeldit.release.official``): learnable RMSNorm weights in every block, bias-free SwiGLU, erf GELU
    in the pixel MLP, timestep features of period 10 on 1000 t (text) or on 1 - t (class: the reference
    runs time from noise at 0 to data at 1), the pixel sin-cos code column-first, and for text models a
    Linear-then-RMSNorm text projection plus a learned position embedding and 1D RoPE on text tokens.

    ``text_padding="unmasked"``: attention ignores ``context_mask`` and sees every text state, padding
    included, as the official text-to-image pipeline runs (its encoder states are not zeroed either).
    """

    name: str
    depth: int  # N: patch-level blocks
    pixel_depth: int  # M: pixel-level PiT blocks
    hidden_size: int  # D: patch-level width
    num_heads: int  # patch-level attention heads
    conditioning: Conditioning = "class"
    patch_size: int = 16  # p: pixels per patch side
    pixel_dim: int = 16  # D_pix: width of one pixel token
    pixel_attn_dim: int | None = None  # width of compacted pixel attention (None: = hidden_size)
    pixel_heads: int | None = None  # heads of compacted pixel attention (None: = num_heads)
    pixel_mlp_ratio: float = 4.0  # pixel MLP 16 -> 64 -> 16
    in_channels: int = 3
    num_classes: int = 1000  # class-conditional only; index num_classes is the null class (CFG)
    text_dim: int = 2304  # text-to-image only: width of the frozen text encoder (Gemma-2-2B-IT)
    text_len: int = 300  # text-to-image only: tokens kept per caption
    repa_block: int = 8  # patch block (1-based) whose output REPA aligns to DINOv2
    qk_norm: bool = True
    rope_positions: RopePositions = "normalized"
    post_modulation: bool = False
    layer_style: LayerStyle = "pixeldit"
    text_padding: TextPadding = "masked"

    def __post_init__(self) -> None:
        for name, valid in (("conditioning", CONDITIONINGS), ("rope_positions", ROPE_POSITIONS),
                            ("layer_style", LAYER_STYLES), ("text_padding", TEXT_PADDINGS)):
            if getattr(self, name) not in valid:
                raise ValueError(f"{name}={getattr(self, name)!r}; valid values: {', '.join(valid)}")
        for name in ("post_modulation", "qk_norm"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r}; valid values: true, false")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"{self.name}: hidden_size {self.hidden_size} not divisible by num_heads {self.num_heads}")
        if self.attn_dim % self.attn_heads:
            raise ValueError(f"{self.name}: pixel_attn_dim {self.attn_dim} not divisible by pixel_heads {self.attn_heads}")
        for head_dim, what in ((self.hidden_size // self.num_heads, "patch"), (self.attn_dim // self.attn_heads, "pixel")):
            if head_dim % 4:
                raise ValueError(f"{self.name}: {what} head dim {head_dim} must be a multiple of 4 for 2D RoPE")
        if not 1 <= self.repa_block <= self.depth:
            raise ValueError(f"{self.name}: repa_block {self.repa_block} outside 1..{self.depth}")

    @property
    def attn_dim(self) -> int:
        return self.pixel_attn_dim or self.hidden_size

    @property
    def attn_heads(self) -> int:
        return self.pixel_heads or self.num_heads

    @property
    def mlp_hidden(self) -> int:
        """SwiGLU hidden size int(2 * 4D / 3) of the patch-level MLP."""
        return int(2 * 4 * self.hidden_size / 3)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelArgs":
        """Read saved arguments; keys missing from older files take ``LEGACY_DEFAULTS`` (their behaviour then)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown ModelArgs keys {unknown}; valid keys: {sorted(known)}")
        return cls(**{**LEGACY_DEFAULTS, **d})


MODEL_SIZES: dict[str, ModelArgs] = {
    "B/16": ModelArgs("B/16", depth=12, pixel_depth=2, hidden_size=768, num_heads=12, repa_block=4),
    "L/16": ModelArgs("L/16", depth=22, pixel_depth=4, hidden_size=1024, num_heads=16, repa_block=8),
    "XL/16": ModelArgs("XL/16", depth=26, pixel_depth=4, hidden_size=1152, num_heads=16, repa_block=8),
    "T2I": ModelArgs(
        "T2I", depth=14, pixel_depth=2, hidden_size=1536, num_heads=24, conditioning="text",
        pixel_attn_dim=1152, pixel_heads=16, repa_block=6,
    ),
    "debug": ModelArgs("debug", depth=2, pixel_depth=1, hidden_size=64, num_heads=4, num_classes=10, repa_block=1),
    "debug-T2I": ModelArgs(
        "debug-T2I", depth=2, pixel_depth=1, hidden_size=64, num_heads=4, conditioning="text",
        text_dim=32, text_len=16, repa_block=1,
    ),
}


def get_model_args(name: str, **overrides: Any) -> ModelArgs:
    """Look up a size by name; keyword overrides replace fields (e.g. text_dim of another encoder)."""
    if name not in MODEL_SIZES:
        raise ValueError(f"unknown model size {name!r}; valid sizes: {', '.join(MODEL_SIZES)}")
    args = MODEL_SIZES[name]
    return replace(args, **overrides) if overrides else args
