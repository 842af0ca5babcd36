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


ROPE_SPAN = 16.0  # "normalized" positions run over [0, ROPE_SPAN] along each axis at every resolution


def rope_2d(head_dim: int, grid_h: int, grid_w: int, device=None, theta: float = 10000.0,
            positions: str = "normalized") -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables of 2D rotary embedding over an (grid_h, grid_w) grid, row-major tokens.

    Channel layout of one head (q = head_dim / 4): channels k and q + k rotate together by the row position
    times frequency theta^(-4k/head_dim); channels 2q + k and 3q + k by the column position at the same
    frequency. ``positions="normalized"``: rows at ``linspace(0, 16, grid_h)`` and columns at
    ``linspace(0, 16, grid_w)``, the official convention: every resolution spans the same range.
    ``positions="integer"``: grid indices 0..n-1. Returns two (grid_h * grid_w, head_dim) float32 tensors.
    """
    if head_dim % 4:
        raise ValueError(f"2D RoPE needs head_dim divisible by 4, got {head_dim}")
    if positions == "normalized":
        rows = torch.linspace(0, ROPE_SPAN, grid_h, device=device)
        cols = torch.linspace(0, ROPE_SPAN, grid_w, device=device)
    elif positions == "integer":
        rows = torch.arange(grid_h, device=device, dtype=torch.float32)
        cols = torch.arange(grid_w, device=device, dtype=torch.float32)
    else:
        raise ValueError(f"positions={positions!r}; valid values: normalized, integer")
    quarter = head_dim // 4
    freqs = 1.0 / theta ** (torch.arange(0, head_dim, 4, device=device).float() / head_dim)  # (hd/4,)
    ang_r = torch.outer(rows, freqs)[:, None, :].expand(grid_h, grid_w, quarter)  # (h, w, hd/4)
    ang_c = torch.outer(cols, freqs)[None, :, :].expand(grid_h, grid_w, quarter)  # (h, w, hd/4)
    ang = torch.cat([ang_r, ang_r, ang_c, ang_c], dim=-1).reshape(grid_h * grid_w, head_dim)  # (L, hd)
    return ang.cos(), ang.sin()


def rope_text(head_dim: int, length: int, device=None, theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables of 1D rotary embedding of text positions 0..length-1, in the channel layout of ``rope_2d``.

    Standard 1D RoPE rotates channel pairs (2j, 2j+1) by position * theta^(-2j/head_dim). Written in the
    layout of ``rope_2d`` (the official checkpoints' head channels 4k..4k+3 land at k, q+k, 2q+k, 3q+k, see
    ``pixeldit.release.official``), pair j = 2k + 1 occupies the row half and pair j = 2k the column half.
    Returns two (length, head_dim) float32 tensors.
    """
    if head_dim % 4:
        raise ValueError(f"text RoPE needs head_dim divisible by 4, got {head_dim}")
    freqs = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim)  # (hd/2,) pair j
    pos = torch.arange(length, device=device, dtype=torch.float32)
    ang_r = torch.outer(pos, freqs[1::2])  # (T, hd/4): odd pairs
    ang_c = torch.outer(pos, freqs[0::2])  # (T, hd/4): even pairs
    ang = torch.cat([ang_r, ang_r, ang_c, ang_c], dim=-1)  # (T, hd)
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
    """SwiGLU MLP: w2(silu(w1 x) * w3 x); ``bias=False`` as in the official layers."""

    def __init__(self, dim: int, hidden: int, bias: bool = True):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=bias)
        self.w3 = nn.Linear(dim, hidden, bias=bias)
        self.w2 = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))  # (..., dim)


class GeluMLP(nn.Module):
    """Two-layer GELU MLP (the pixel MLP, 16 -> 64 -> 16); tanh-approximated GELU, or the exact (erf) one."""

    def __init__(self, dim: int, hidden: int, exact_gelu: bool = False):
        super().__init__()
        self.approximate = "none" if exact_gelu else "tanh"
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate=self.approximate))  # (..., dim)


# ------------------------------------------------------------------------------ embedders


class TimestepEmbedder(nn.Module):
    """t in [0, 1] -> sinusoidal features of ``scale * t`` (of ``scale * (1 - t)`` when ``reverse``) -> MLP -> (B, D).

    Frequencies max_period^(-k / half), k < half: max_period 10000 here, 10 in the official layers.
    """

    def __init__(self, dim: int, freq_dim: int = 256, max_period: float = 10000.0, scale: float = 1000.0,
                 reverse: bool = False):
        super().__init__()
        self.freq_dim, self.max_period, self.scale, self.reverse = freq_dim, max_period, scale, reverse
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(self.max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        t = 1 - t.float() if self.reverse else t.float()  # (B,)
        args = (t * self.scale)[:, None] * freqs[None]  # (B, half)
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


def sincos_2d(dim: int, height: int, width: int, device=None, column_first: bool = False) -> torch.Tensor:
    """Fixed 2D sin-cos position code for a (height, width) grid: (height * width, dim) float32, row-major.

    Half of the channels encode the row, half the column, each as [sin, cos] (MAE/DiT style); the row half
    comes first, or the column half with ``column_first`` (the official layers). Computed in float64.
    """
    if dim % 4:
        raise ValueError(f"2D sin-cos code needs dim divisible by 4, got {dim}")
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, device=device, dtype=torch.float64) / quarter)  # (dim/4,)
    rows = torch.arange(height, device=device, dtype=torch.float64)
    cols = torch.arange(width, device=device, dtype=torch.float64)
    er = torch.outer(rows, omega)[:, None, :].expand(height, width, quarter)  # (H, W, dim/4)
    ec = torch.outer(cols, omega)[None, :, :].expand(height, width, quarter)  # (H, W, dim/4)
    first, second = (ec, er) if column_first else (er, ec)
    code = torch.cat([first.sin(), first.cos(), second.sin(), second.cos()], dim=-1)  # (H, W, dim)
    return code.reshape(height * width, dim).float()
