"""Pixel-level pathway: pixel tokens, per-pixel AdaLN, pixel-token compaction and the PiT block.

Layout: pixel tokens are grouped by patch, ``(B * L, p*p, D_pix)`` with L = (H/p) * (W/p) patches in
row-major order and the p*p pixels of a patch in row-major order inside it.
"""
from __future__ import annotations

import torch
from torch import nn

from .layers import Attention, GeluMLP, RMSNorm, modulate, sincos_2d


def patchify_pixels(x: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, H, W) image -> (B * L, p*p, C) pixels grouped by patch."""
    B, C, H, W = x.shape
    torch._check(H % p == 0)  # tells torch.compile (symbolic H/W) the sizes divide: no guard on them
    torch._check(W % p == 0)
    x = x.view(B, C, H // p, p, W // p, p).permute(0, 2, 4, 3, 5, 1)  # (B, H/p, W/p, p, p, C)
    return x.reshape(-1, p * p, C)


def unpatchify_pixels(x: torch.Tensor, B: int, H: int, W: int, p: int) -> torch.Tensor:
    """(B * L, p*p, C) pixels grouped by patch -> (B, C, H, W) image (inverse of ``patchify_pixels``)."""
    C = x.shape[-1]
    x = x.view(B, H // p, W // p, p, p, C).permute(0, 5, 1, 3, 2, 4)  # (B, C, H/p, p, W/p, p)
    return x.reshape(B, C, H, W)


class PixelEmbed(nn.Module):
    """One token per pixel: linear RGB -> D_pix plus a fixed 2D sin-cos code of the pixel position
    (row half first; column half first in the official layers)."""

    def __init__(self, in_channels: int, pixel_dim: int, patch_size: int, column_first: bool = False):
        super().__init__()
        self.p = patch_size
        self.pixel_dim = pixel_dim
        self.column_first = column_first
        self.proj = nn.Linear(in_channels, pixel_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B * L, p*p, D_pix)."""
        B, _, H, W = x.shape
        pos = sincos_2d(self.pixel_dim, H, W, device=x.device, column_first=self.column_first)  # (H*W, Dp)
        pos = pos.view(1, H, W, self.pixel_dim)  # (1, H, W, Dp)
        tok = self.proj(x.permute(0, 2, 3, 1)) + pos.to(x.dtype)  # (B, H, W, Dp)
        return patchify_pixels(tok.permute(0, 3, 1, 2), self.p)  # (B*L, p*p, Dp)


class PixelwiseAdaLN(nn.Module):
    """Per-pixel AdaLN: one linear map D -> 6 * D_pix * p*p, a separate shift/scale/gate per pixel.

    A patch-level AdaLN would repeat one set of parameters for all p*p pixels of a patch; here every
    pixel of the patch gets its own, computed from the patch's semantic token.
    """

    def __init__(self, cond_dim: int, pixel_dim: int, patch_size: int, n: int = 6):
        super().__init__()
        self.n = n
        self.pp = patch_size * patch_size
        self.pixel_dim = pixel_dim
        self.linear = nn.Linear(cond_dim, n * pixel_dim * self.pp)

    def forward(self, s_cond: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """s_cond: (B * L, D) -> n tensors of (B * L, p*p, D_pix)."""
        mod = self.linear(s_cond).view(-1, self.pp, self.n * self.pixel_dim)  # (B*L, p*p, n*Dp)
        return mod.chunk(self.n, dim=-1)


class TokenCompaction(nn.Module):
    """Compress the p*p*D_pix features of each patch to one attention token, attend globally over
    patches with 2D RoPE, expand back to p*p*D_pix. Shortens the attention sequence by p*p."""

    def __init__(self, pixel_dim: int, patch_size: int, attn_dim: int, num_heads: int, qk_norm: bool = True):
        super().__init__()
        self.pp = patch_size * patch_size
        self.pixel_dim = pixel_dim
        self.compress = nn.Linear(self.pp * pixel_dim, attn_dim)
        self.attn = Attention(attn_dim, num_heads, qk_norm)
        self.expand = nn.Linear(attn_dim, self.pp * pixel_dim)

    def forward(self, x: torch.Tensor, B: int, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """x: (B * L, p*p, D_pix) -> (B * L, p*p, D_pix); attention runs on (B, L, attn_dim)."""
        BL = x.shape[0]
        tok = self.compress(x.reshape(B, BL // B, self.pp * self.pixel_dim))  # (B, L, A)
        tok = self.attn(tok, rope)  # (B, L, A)
        return self.expand(tok).view(BL, self.pp, self.pixel_dim)  # (B*L, p*p, Dp)


class PiTBlock(nn.Module):
    """Pixel Transformer block: per-pixel AdaLN around compacted global attention and a pixel MLP.

    Pre-modulation (default, AdaLN-Zero): shift/scale the normalised inputs of attention and MLP and gate
    their outputs, 6 chunks per pixel. ``post_modulation``: attention and MLP see the plain normalised
    tokens and their outputs are scaled and shifted, 4 chunks per pixel in the order scale1, shift1,
    scale2, shift2, no gates (the official fix for loss spikes). ``official``: learnable RMSNorm weights
    and the exact (erf) GELU.
    """

    def __init__(self, cond_dim: int, pixel_dim: int, patch_size: int, attn_dim: int, num_heads: int,
                 mlp_ratio: float = 4.0, qk_norm: bool = True, post_modulation: bool = False, official: bool = False):
        super().__init__()
        self.post_modulation = post_modulation
        self.norm1 = RMSNorm(pixel_dim, affine=official)
        self.compaction = TokenCompaction(pixel_dim, patch_size, attn_dim, num_heads, qk_norm)
        self.norm2 = RMSNorm(pixel_dim, affine=official)
        self.mlp = GeluMLP(pixel_dim, int(pixel_dim * mlp_ratio), exact_gelu=official)
        self.adaln = PixelwiseAdaLN(cond_dim, pixel_dim, patch_size, n=4 if post_modulation else 6)

    def forward(self, x: torch.Tensor, s_cond: torch.Tensor, B: int, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """x: (B * L, p*p, D_pix) pixel tokens; s_cond: (B * L, D) per-patch condition."""
        if self.post_modulation:
            sc1, sh1, sc2, sh2 = self.adaln(s_cond)  # 4 x (B*L, p*p, Dp)
            x = x + modulate(self.compaction(self.norm1(x), B, rope), sh1, sc1)  # (B*L, p*p, Dp)
            x = x + modulate(self.mlp(self.norm2(x)), sh2, sc2)  # (B*L, p*p, Dp)
            return x
        sh1, sc1, g1, sh2, sc2, g2 = self.adaln(s_cond)  # 6 x (B*L, p*p, Dp)
        x = x + g1 * self.compaction(modulate(self.norm1(x), sh1, sc1), B, rope)  # (B*L, p*p, Dp)
        x = x + g2 * self.mlp(modulate(self.norm2(x), sh2, sc2))  # (B*L, p*p, Dp)
        return x


class PixelHead(nn.Module):
    """RMSNorm then linear D_pix -> 3 (zero-initialised): per-pixel velocity."""

    def __init__(self, pixel_dim: int, out_channels: int):
        super().__init__()
        self.norm = RMSNorm(pixel_dim)
        self.linear = nn.Linear(pixel_dim, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.norm(x))  # (B*L, p*p, C)
