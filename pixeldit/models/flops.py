"""Analytic parameter and FLOP counts of PixelDiT, read from the size table.

Convention: a Linear applied to n tokens costs 2 * n * in * out; attention over L tokens of width C costs
4 * L^2 * C (Q K^T and A V). Norms, activations, RoPE and other element-wise work are not counted. Every
Linear of the network is counted, so the total equals ``torch.utils.flop_counter.FlopCounterMode`` on a real
forward (checked in tests). Counts are per image. Training counts ``train_flops`` = 3x forward (forward +
backward); the forward that activation checkpointing recomputes is not counted (model FLOPs, as for MFU).
"""
from __future__ import annotations

from dataclasses import dataclass

from .sizes import ModelArgs


def linear(n: int, fan_in: int, fan_out: int) -> int:
    return 2 * n * fan_in * fan_out


def attention(length: int, width: int, kv_length: int | None = None) -> int:
    """Q K^T and A V for ``length`` queries over ``kv_length`` (default: the same) keys."""
    return 4 * length * (length if kv_length is None else kv_length) * width


@dataclass(frozen=True)
class FlopBreakdown:
    """Forward FLOPs of one image, by part of the network."""

    embed: int  # patch + pixel embedding, timestep MLP, text projection
    patch_linear: int  # all Linear layers of the patch-level blocks (incl. AdaLN)
    patch_attention: int  # attention score/value products of the patch-level blocks
    pixel_linear: int  # all Linear layers of the PiT blocks (per-pixel AdaLN, compaction, MLP) and the head
    pixel_attention: int  # attention products of the pixel pathway

    @property
    def total(self) -> int:
        return self.embed + self.patch_linear + self.patch_attention + self.pixel_linear + self.pixel_attention


def forward_flops_breakdown(args: ModelArgs, height: int, width: int, compaction: bool = True) -> FlopBreakdown:
    """FLOPs of one forward pass on one (height, width) image.

    ``compaction=False`` counts the paper's ablation (Table 5) in which every pixel token attends
    globally: each pixel token is lifted D_pix -> A, attended over all H*W pixels at width A, and
    projected back A -> D_pix (XL/16 at 256: ~82,250 GFLOPs, the paper reports 82,247).
    """
    p, D, Dp, A = args.patch_size, args.hidden_size, args.pixel_dim, args.attn_dim
    if height % p or width % p:
        raise ValueError(f"height/width ({height}, {width}) must be multiples of the patch size {p}")
    L = (height // p) * (width // p)  # patch tokens
    P = height * width  # pixel tokens
    pp = p * p
    T = args.text_len if args.conditioning == "text" else 0

    embed = linear(L, pp * args.in_channels, D) + linear(P, args.in_channels, Dp)
    embed += linear(1, 256, D) + linear(1, D, D)  # timestep MLP
    if T:
        embed += linear(T, args.text_dim, D)

    def block_linear(n: int, kv_only: bool = False) -> int:
        if kv_only:  # text stream of the last MM-DiT block: AdaLN shift/scale and K/V only
            return linear(1, D, 2 * D) + linear(n, D, 2 * D)
        return (linear(1, D, 6 * D) + linear(n, D, 3 * D) + linear(n, D, D)
                + linear(n, D, args.mlp_hidden) * 2 + linear(n, args.mlp_hidden, D))

    patch_linear, patch_attn = 0, 0
    for i in range(args.depth):
        last = i == args.depth - 1
        patch_linear += block_linear(L)
        if T:
            patch_linear += block_linear(T, kv_only=last)
        patch_attn += attention(L if (T and last) else L + T, D, kv_length=L + T)

    pix_linear, pix_attn = 0, 0
    for _ in range(args.pixel_depth):
        pix_linear += linear(L, D, (4 if args.post_modulation else 6) * Dp * pp)  # per-pixel AdaLN
        pix_linear += linear(P, Dp, int(Dp * args.pixel_mlp_ratio)) * 2  # pixel MLP in + out
        if compaction:
            pix_linear += linear(L, pp * Dp, A) + linear(L, A, 3 * A) + linear(L, A, A) + linear(L, A, pp * Dp)
            pix_attn += attention(L, A)
        else:
            pix_linear += linear(P, Dp, A) + linear(P, A, 3 * A) + linear(P, A, A) + linear(P, A, Dp)
            pix_attn += attention(P, A)
    pix_linear += linear(P, Dp, args.in_channels)  # head
    return FlopBreakdown(embed, patch_linear, patch_attn, pix_linear, pix_attn)


def forward_flops(args: ModelArgs, height: int, width: int, compaction: bool = True) -> int:
    """Total forward FLOPs of one image."""
    return forward_flops_breakdown(args, height, width, compaction).total


def train_flops(args: ModelArgs, height: int, width: int) -> int:
    """Model FLOPs of training on one (height, width) image: forward + backward = 3x forward (MFU's numerator)."""
    return 3 * forward_flops(args, height, width)
