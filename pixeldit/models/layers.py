"""Building blocks shared by the patch-level and pixel-level pathways.

Pure single-device PyTorch: RMSNorm, 2D rotary position embedding, attention with RMSNorm on
queries/keys, SwiGLU, timestep and label embedders, fixed 2D sin-cos codes.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """RMSNorm over the last dimension, computed in float32 for bf16 stability."""

    def __init__(self, dim: int, eps: float = 1e-6, affine: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.float() if self.weight is not None else None
        return F.rms_norm(x.float(), (x.shape[-1],), weight, self.eps).to(x.dtype)  # (..., C)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """AdaLN: x * (1 + scale) + shift, with shift/scale broadcastable to x."""
    return x * (1 + scale) + shift


# ----------------------------------------------------------------------------------- 2D RoPE


def rope_2d(head_dim: int, grid_h: int, grid_w: int, device=None, theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables of 2D rotary embedding over an (grid_h, grid_w) grid, row-major tokens.

    The first half of each head's channels rotates with the row index, the second half with the
    column index. Positions are integer grid coordinates, so any grid size works without retraining.
    Returns two (grid_h * grid_w, head_dim) float32 tensors.
    """
    if head_dim % 4:
        raise ValueError(f"2D RoPE needs head_dim divisible by 4, got {head_dim}")
    quarter = head_dim // 4
    freqs = 1.0 / theta ** (torch.arange(quarter, device=device, dtype=torch.float32) / quarter)  # (hd/4,)
    rows = torch.arange(grid_h, device=device, dtype=torch.float32)
    cols = torch.arange(grid_w, device=device, dtype=torch.float32)
    ang_r = torch.outer(rows, freqs)[:, None, :].expand(grid_h, grid_w, quarter)  # (h, w, hd/4)
    ang_c = torch.outer(cols, freqs)[None, :, :].expand(grid_h, grid_w, quarter)  # (h, w, hd/4)
    ang = torch.cat([ang_r, ang_r, ang_c, ang_c], dim=-1).reshape(grid_h * grid_w, head_dim)  # (L, hd)
    return ang.cos(), ang.sin()


def _rotate_half_pairs(x: torch.Tensor) -> torch.Tensor:
    """Rotate within each of the two halves (row half, column half) of the head dimension."""
    q = x.shape[-1] // 4
    a1, a2, b1, b2 = x.split(q, dim=-1)
    return torch.cat([-a2, a1, -b2, b1], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, heads, L, hd) by per-token tables cos/sin (L, hd); computed in float32."""
    dtype = x.dtype
    xf = x.float()
    return (xf * cos + _rotate_half_pairs(xf) * sin).to(dtype)  # (B, heads, L, hd)


# ------------------------------------------------------------------------------- attention


class Attention(nn.Module):
    """Multi-head self-attention, RMSNorm on q/k, 2D RoPE on the first ``rope_len`` tokens.

    Split into ``qkv`` and ``attend`` so MM-DiT can project two streams with separate weights and
    attend jointly.
    """

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = True, kv_only: bool = False):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.kv_only = kv_only  # a stream that only provides keys/values (no queries, no output)
        self.qkv = nn.Linear(dim, (2 if kv_only else 3) * dim, bias=False)
        self.q_norm = RMSNorm(self.head_dim) if qk_norm and not kv_only else nn.Identity()
        self.k_norm = RMSNorm(self.head_dim) if qk_norm else nn.Identity()
        self.proj = None if kv_only else nn.Linear(dim, dim)

    def qkv_heads(self, x: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """(B, L, C) -> q, k, v each (B, heads, L, hd), q/k normalised (q is None when kv_only)."""
        B, L, _ = x.shape
        n = 2 if self.kv_only else 3
        qkv = self.qkv(x).view(B, L, n, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (n, B, h, L, hd)
        if self.kv_only:
            k, v = qkv.unbind(0)
            return None, self.k_norm(k), v
        q, k, v = qkv.unbind(0)
        return self.q_norm(q), self.k_norm(k), v

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        """x: (B, L, C) image tokens in row-major grid order; rope: tables for L tokens."""
        q, k, v = self.qkv_heads(x)  # (B, h, L, hd)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, h, L, hd)
        return self.proj(out.transpose(1, 2).flatten(2))  # (B, L, C)


class SwiGLU(nn.Module):
    """SwiGLU MLP: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden)
        self.w3 = nn.Linear(dim, hidden)
        self.w2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))  # (..., dim)


class GeluMLP(nn.Module):
    """Two-layer GELU MLP (the pixel MLP, 16 -> 64 -> 16)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))  # (..., dim)


# ------------------------------------------------------------------------------ embedders


class TimestepEmbedder(nn.Module):
    """t in [0, 1] -> sinusoidal features of 1000*t -> MLP -> (B, D)."""

    def __init__(self, dim: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        args = 1000.0 * t.float()[:, None] * freqs[None]  # (B, half)
        emb = torch.cat([args.cos(), args.sin()], dim=-1)  # (B, freq_dim)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))  # (B, D)


class LabelEmbedder(nn.Module):
    """Class ids -> (B, D); index ``num_classes`` is the null class used for classifier-free guidance."""

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.num_classes = num_classes
        self.table = nn.Embedding(num_classes + 1, dim)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.table(y)  # (B, D)


def sincos_2d(dim: int, height: int, width: int, device=None) -> torch.Tensor:
    """Fixed 2D sin-cos position code for a (height, width) grid: (height * width, dim), row-major.

    Half of the channels encode the row, half the column (MAE/DiT style).
    """
    if dim % 4:
        raise ValueError(f"2D sin-cos code needs dim divisible by 4, got {dim}")
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, device=device, dtype=torch.float32) / quarter)  # (dim/4,)
    rows = torch.arange(height, device=device, dtype=torch.float32)
    cols = torch.arange(width, device=device, dtype=torch.float32)
    er = torch.outer(rows, omega)[:, None, :].expand(height, width, quarter)  # (H, W, dim/4)
    ec = torch.outer(cols, omega)[None, :, :].expand(height, width, quarter)  # (H, W, dim/4)
    code = torch.cat([er.sin(), er.cos(), ec.sin(), ec.cos()], dim=-1)  # (H, W, dim)
    return code.reshape(height * width, dim)
