"""pixeldit-release: training checkpoint (any ZeRO stage, any world size) -> release folder, or -> universal.

    pixeldit-release runs/t2i releases/pixeldit-t2i                  # EMA weights, bf16, from checkpoints/latest
    pixeldit-release runs/t2i/checkpoints/step_00100000 out --weights raw --dtype fp32 --max-shard-gb 2
    pixeldit-release runs/t2i --universal                            # DeepSpeed universal checkpoint beside it
"""
from __future__ import annotations

import argparse
import time

from pixeldit.release import SamplerDefaults
from pixeldit.train.export import export_release, to_universal


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="pixeldit-release", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="run folder (uses checkpoints/latest) or a step folder")
    ap.add_argument("out", nargs="?", help="release folder to write (not with --universal)")
    ap.add_argument("--weights", choices=("ema", "raw"), default="ema")
    ap.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    ap.add_argument("--max-shard-gb", type=float, default=5.0, help="shard model.safetensors above this size")
    ap.add_argument("--sampler", default="flow_dpm")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--cfg-scale", type=float, default=4.5)
    ap.add_argument("--cfg-interval", type=float, nargs=2, default=(0.0, 1.0))
    ap.add_argument("--shift", type=float, default=None, help="sampling time shift (default: the checkpoint's stage)")
    ap.add_argument("--universal", action="store_true", help="write a DeepSpeed universal checkpoint instead")
    a = ap.parse_args(argv)
    t0 = time.time()
    if a.universal:
        out = to_universal(a.checkpoint, a.out)
        print(f"universal checkpoint: {out} ({time.time() - t0:.1f}s); resume on any world size with "
              f"resume_from={out}")
        return
    if not a.out:
        ap.error("the release folder (out) is required unless --universal")
    sampler = SamplerDefaults(a.sampler, a.steps, a.cfg_scale, tuple(a.cfg_interval), a.shift)
    out = export_release(a.checkpoint, a.out, weights=a.weights, dtype=a.dtype,
                         max_shard_bytes=int(a.max_shard_gb * 2**30), sampler=sampler)
    print(f"release: {out} ({time.time() - t0:.1f}s)")


if __name__ == "__main__":
    main()
