"""Patch-level pathway blocks: the DiT block (class-conditional) and the MM-DiT block (text-to-image).

Both use RMSNorm, AdaLN-Zero modulation from the global condition broadcast to every token,
self-attention with 2D RoPE and RMSNorm on queries/keys, and a SwiGLU MLP of hidden int(2*4D/3).
``official=True`` (``ModelArgs.layer_style``): learnable RMSNorm weights and a bias-free SwiGLU.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layers import Attention, RMSNorm, SwiGLU, apply_rope, modulate


class AdaLNZero(nn.Module):
    """SiLU'd global condition (B, D) -> n chunks of (B, 1, D); zero-initialised by ``init_weights``."""

    def __init__(self, dim: int, n: int = 6):
        super().__init__()
        self.n = n
        self.linear = nn.Linear(dim, n * dim)

    def forward(self, c: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.linear(c).unsqueeze(1).chunk(self.n, dim=-1)  # n x (B, 1, D)


class PatchBlock(nn.Module):
    """DiT block on patch tokens: the same per-feature AdaLN parameters for every token.

    ``pre_only=True`` keeps only what produces keys/values (AdaLN shift/scale, norm, K/V projection):
    the text stream of the last MM-DiT block, whose outputs nothing reads.
    """

    def __init__(self, dim: int, num_heads: int, mlp_hidden: int, qk_norm: bool = True, pre_only: bool = False,
                 official: bool = False):
        super().__init__()
        self.norm1 = RMSNorm(dim, affine=official)
        self.attn = Attention(dim, num_heads, qk_norm, kv_only=pre_only)
        self.adaln = AdaLNZero(dim, n=2 if pre_only else 6)
        if not pre_only:
            self.norm2 = RMSNorm(dim, affine=official)
            self.mlp = SwiGLU(dim, mlp_hidden, bias=not official)

    def forward(self, x: torch.Tensor, c: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """x: (B, L, D) patch tokens; c: (B, D) SiLU'd condition; rope tables for L tokens."""
        sh1, sc1, g1, sh2, sc2, g2 = self.adaln(c)  # 6 x (B, 1, D)
        x = x + g1 * self.attn(modulate(self.norm1(x), sh1, sc1), rope)  # (B, L, D)
        x = x + g2 * self.mlp(modulate(self.norm2(x), sh2, sc2))  # (B, L, D)
        return x


class MMDiTBlock(nn.Module):
    """MM-DiT block: image and text streams with separate QKV, MLP and AdaLN; one joint attention.

    Both streams are modulated by the timestep only. 2D RoPE rotates the image tokens; text tokens carry
    1D RoPE when ``text_rope`` is given (official layers), else no position code. ``text_mask`` (B, T)
    marks real text tokens; padded keys are masked out (None: every text token is attended).
    """

    def __init__(self, dim: int, num_heads: int, mlp_hidden: int, qk_norm: bool = True, last: bool = False,
                 official: bool = False):
        super().__init__()
        self.last = last
        self.img = PatchBlock(dim, num_heads, mlp_hidden, qk_norm, official=official)
        self.txt = PatchBlock(dim, num_heads, mlp_hidden, qk_norm, pre_only=last, official=official)

    def forward(
        self,
        x: torch.Tensor,
        txt: torch.Tensor,
        c: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        text_mask: torch.Tensor | None,
        text_rope: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (B, L, D) image tokens; txt: (B, T, D) text tokens; c: (B, D); text_mask: (B, T) bool."""
        L = x.shape[1]
        mi, mt = self.img.adaln(c), self.txt.adaln(c)  # 6 x (B, 1, D) each
        qi, ki, vi = self.img.attn.qkv_heads(modulate(self.img.norm1(x), mi[0], mi[1]))  # (B, h, L, hd)
        qt, kt, vt = self.txt.attn.qkv_heads(modulate(self.txt.norm1(txt), mt[0], mt[1]))  # (B, h, T, hd)
        qi, ki = apply_rope(qi, *rope), apply_rope(ki, *rope)
        if text_rope is not None:
            kt = apply_rope(kt, *text_rope)  # (B, h, T, hd)
            qt = None if qt is None else apply_rope(qt, *text_rope)  # (B, h, T, hd); None in the last block
        k, v = torch.cat([ki, kt], 2), torch.cat([vi, vt], 2)  # (B, h, L+T, hd)
        q = qi if self.last else torch.cat([qi, qt], 2)  # (B, h, L[+T], hd): last block: image queries only
        mask = None
        if text_mask is not None:
            keep_img = torch.ones(x.shape[0], L, dtype=torch.bool, device=x.device)
            mask = torch.cat([keep_img, text_mask.bool()], dim=1)[:, None, None, :]  # (B, 1, 1, L+T)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).flatten(2)  # (B, L[+T], D)
        x = x + mi[2] * self.img.attn.proj(out[:, :L])  # (B, L, D)
        x = x + mi[5] * self.img.mlp(modulate(self.img.norm2(x), mi[3], mi[4]))  # (B, L, D)
        if self.last:  # nothing reads the text stream after the last block
            return x, txt
        txt = txt + mt[2] * self.txt.attn.proj(out[:, L:])  # (B, T, D)
        txt = txt + mt[5] * self.txt.mlp(modulate(self.txt.norm2(txt), mt[3], mt[4]))  # (B, T, D)
        return x, txt
