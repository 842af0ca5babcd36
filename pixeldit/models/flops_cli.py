"""``pixeldit-flops``: parameters, forward and training GFLOPs per image of PixelDiT sizes at given resolutions.

    pixeldit-flops                                   # the README table: B/L/XL at 256, 512; T2I at 512, 1024
    pixeldit-flops --size XL/16 --res 256 384x640    # any size, square or HxW resolutions

Counts come from ``pixeldit.models.flops`` (Linear = 2*n*in*out, attention = 4*L^2*C; training =
``train_flops``, 3x forward, the MFU numerator of the trainer and the benchmarks); parameters are counted on a
model built on the meta device (no memory). "no compaction" is the ablation in which
every pixel token attends globally, to show what pixel-token compaction saves.
"""
from __future__ import annotations

import argparse

from pixeldit.errors import CliParser, cli_main

from .flops import forward_flops_breakdown, train_flops
from .pixeldit import build_model
from .sizes import MODEL_SIZES, get_model_args

Resolution = tuple[int, int]  # (height, width)
DEFAULT_TABLE: list[tuple[str, list[Resolution]]] = [
    ("B/16", [(256, 256), (512, 512)]),
    ("L/16", [(256, 256), (512, 512)]),
    ("XL/16", [(256, 256), (512, 512)]),
    ("T2I", [(512, 512), (1024, 1024)]),
]


def parse_resolution(text: str) -> Resolution:
    """'512' -> (512, 512); '384x640' -> (384, 640) as height x width."""
    try:
        if "x" in text:
            h, w = text.lower().split("x")
            return int(h), int(w)
        return int(text), int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"resolution {text!r}: expected N or HxW, e.g. 512 or 384x640") from None


def count_params(size: str) -> int:
    model = build_model(get_model_args(size), device="meta")
    return sum(p.numel() for p in model.parameters())


def rows(table: list[tuple[str, list[Resolution]]]) -> list[dict]:
    out = []
    for size, resolutions in table:
        args = get_model_args(size)
        params = count_params(size)
        for h, w in resolutions:
            with_c = forward_flops_breakdown(args, h, w, compaction=True)
            without = forward_flops_breakdown(args, h, w, compaction=False)
            out.append({
                "size": size, "res": f"{h}x{w}", "params_M": params / 1e6,
                "gflops": with_c.total / 1e9,
                "train_gflops": train_flops(args, h, w) / 1e9,
                "pixel_attn_gflops": with_c.pixel_attention / 1e9,
                "no_compaction_gflops": without.total / 1e9,
                "no_compaction_pixel_attn_gflops": without.pixel_attention / 1e9,
                "reduction": without.total / with_c.total,
            })
    return out


def format_markdown(table_rows: list[dict]) -> str:
    head = ("| size | resolution | params (M) | forward GFLOPs/img | train GFLOPs/img | pixel-attn GFLOPs "
            "| no-compaction GFLOPs/img | no-compaction pixel-attn GFLOPs | total reduction |\n"
            "|---|---|---|---|---|---|---|---|---|\n")
    body = "".join(
        f"| {r['size']} | {r['res']} | {r['params_M']:.1f} | {r['gflops']:.1f} | {r['train_gflops']:.1f} | "
        f"{r['pixel_attn_gflops']:.2f} | "
        f"{r['no_compaction_gflops']:.1f} | {r['no_compaction_pixel_attn_gflops']:.1f} | {r['reduction']:.1f}x |\n"
        for r in table_rows
    )
    return head + body


def _main(argv: list[str]) -> None:
    ap = CliParser(prog="pixeldit-flops", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=list(MODEL_SIZES), help="one size (default: the README table)")
    ap.add_argument("--res", nargs="+", type=parse_resolution, default=[(256, 256)],
                    help="resolutions: N or HxW (with --size; default 256)")
    a = ap.parse_args(argv)
    if a.size:
        patch = MODEL_SIZES[a.size].patch_size
        for h, w in a.res:
            if h % patch or w % patch or h <= 0 or w <= 0:
                ap.error(f"--res {h}x{w}: height and width must be positive multiples of the patch size {patch} "
                         f"of {a.size}")
    table = [(a.size, a.res)] if a.size else DEFAULT_TABLE
    print(format_markdown(rows(table)), end="")


def main(argv: list[str] | None = None) -> int:
    return cli_main("pixeldit-flops", _main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
