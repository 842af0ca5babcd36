"""Pixel-token compaction: attention FLOPs and memory with and without it.

    python -m tools.bench_compaction                  # analytic table at 256/512/1024 + CPU measurement

1. Analytic (every size at 256/512/1024): the pixel pathway's attention FLOPs (``pixeldit.models.flops``)
   and the memory of one attention score matrix (B=1, bf16, all heads; what non-fused attention
   materialises) with compaction (L = HW/p² patch tokens) and without (every pixel a token).
2. Measured side by side, one PiT attention of the debug model on CPU at 32-128 px (without compaction
   the sequence is HW pixels, so larger sizes take too long on a CPU): wall time and the bytes autograd saves
   for backward (saved-tensor hooks), compaction vs the paper's ablation (each pixel lifted D_pix -> A,
   attended over all pixels, projected back); fastest of 3 repeats. CPU SDPA is a fused kernel that never
   materialises the score matrix, so the measured memory grows linearly in tokens, not quadratically.
"""
from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from pixeldit.models import build_model, get_model_args
from pixeldit.models.flops import forward_flops_breakdown
from pixeldit.models.layers import Attention, rope_2d


class NoCompactionAttention(nn.Module):
    """The ablation: every pixel token attends globally at width A (2D RoPE on the pixel grid)."""

    def __init__(self, pixel_dim: int, attn_dim: int, heads: int):
        super().__init__()
        self.lift = nn.Linear(pixel_dim, attn_dim)
        self.attn = Attention(attn_dim, heads)
        self.drop = nn.Linear(attn_dim, pixel_dim)

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        """x: (B, H*W, Dp) -> (B, H*W, Dp)."""
        rope = rope_2d(self.attn.head_dim, H, W)
        return self.drop(self.attn(self.lift(x), rope))  # (B, HW, Dp)


def saved_bytes_and_time(fn) -> tuple[int, float]:
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    t0 = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn().sum().backward()
    return total, time.perf_counter() - t0


def analytic_rows() -> list[str]:
    rows = []
    for size in ("B/16", "XL/16", "T2I"):
        a = get_model_args(size)
        for res in (256, 512, 1024):
            w = forward_flops_breakdown(a, res, res, compaction=True)
            wo = forward_flops_breakdown(a, res, res, compaction=False)
            L, P = (res // a.patch_size) ** 2, res * res
            mem_w = L * L * a.attn_heads * 2
            mem_wo = P * P * a.attn_heads * 2
            rows.append(f"| {size} | {res} | {w.pixel_attention / 1e9:.2f} | {wo.pixel_attention / 1e9:,.0f} | "
                        f"{wo.pixel_attention / w.pixel_attention:,.0f}x | {mem_w / 2**20:.1f} MiB | "
                        f"{mem_wo / 2**30:,.0f} GiB |")
    return rows


def measure_one(block, ablation, args, res: int, repeats: int = 3) -> tuple[int, float, int, float]:
    """(saved bytes, seconds) with compaction, then without, for one image at res x res."""
    gh = gw = res // args.patch_size
    pix = torch.randn(gh * gw, args.patch_size ** 2, args.pixel_dim, requires_grad=True)  # (L, p*p, Dp)
    rope = rope_2d(args.attn_dim // args.attn_heads, gh, gw)
    flat = torch.randn(1, res * res, args.pixel_dim, requires_grad=True)  # (1, HW, Dp)
    with_c = [saved_bytes_and_time(lambda: block(pix, 1, rope)) for _ in range(repeats)]
    without = [saved_bytes_and_time(lambda: ablation(flat, res, res)) for _ in range(repeats)]
    # bytes are the same every repeat; time: the fastest repeat (least disturbed by other processes)
    return with_c[0][0], min(t for _, t in with_c), without[0][0], min(t for _, t in without)


def measured_rows(sizes: list[int]) -> list[str]:
    args = get_model_args("debug")
    block = build_model(args).pixel_blocks[0].compaction
    ablation = NoCompactionAttention(args.pixel_dim, args.attn_dim, args.attn_heads)
    measure_one(block, ablation, args, sizes[0])  # warm-up (first-call allocations), not reported
    rows = []
    for res in sizes:
        b_w, t_w, b_wo, t_wo = measure_one(block, ablation, args, res)
        L = (res // args.patch_size) ** 2
        rows.append(f"| {res} | {L} | {res * res} | {b_w / 2**20:.2f} | {b_wo / 2**20:.1f} | "
                    f"{b_wo / b_w:.0f}x | {t_w * 1e3:.1f} | {t_wo * 1e3:.1f} | {t_wo / t_w:.0f}x |")
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--measure", type=int, nargs="*", default=[32, 64, 96, 128], help="CPU-measured resolutions")
    a = ap.parse_args(argv)
    torch.manual_seed(0)
    print("| size | res | pixel-attn GFLOPs (compaction) | without | ratio | score matrix (compaction) | without |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(analytic_rows()))
    print()
    print("| res | attention tokens (compaction) | without | saved for backward MiB (compaction) | without | ratio "
          "| fwd+bwd ms (compaction) | without | ratio |")
    print("|---|---|---|---|---|---|---|---|---|")
    print("\n".join(measured_rows(a.measure)))


if __name__ == "__main__":
    main()
