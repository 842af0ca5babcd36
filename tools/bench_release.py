"""Time and peak memory of converting an XL/16 training checkpoint to a release (CPU).

    python -m tools.bench_release                      # XL/16, EMA saved by 8 ZeRO-3 ranks, bf16 release
    python -m tools.bench_release --size debug --world-size 2

The checkpoint folder is made of random XL/16 weights in exactly the trainer's EMA layout (``ema.EMA`` files
of a ZeRO-3 run: one partition file per rank, plus meta.json), then ``export_release`` (the default EMA
path of ``pixeldit-release``) runs in a child process, whose wall time and peak resident memory
(getrusage of the child) are printed. Building the input is not timed.
"""
from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from pixeldit.models import build_model, get_model_args


def write_zero3_ema_checkpoint(step_dir: Path, size: str, world_size: int) -> int:
    """EMA files of a ZeRO-3 run of ``world_size`` ranks for random weights; returns the parameter count."""
    from pixeldit.train.ema import EMA_FILE, partition_state

    args = get_model_args(size)
    torch.manual_seed(0)
    state = {k: v.float() for k, v in build_model(args).state_dict().items()}
    step_dir.mkdir(parents=True)
    shapes = {k: list(v.shape) for k, v in state.items()}
    for rank in range(world_size):
        torch.save({"layout": "zero3", "decay": 0.9999, "world_size": world_size, "rank": rank, "shapes": shapes,
                    "shadow": partition_state(state, world_size, rank)}, step_dir / EMA_FILE.format(rank=rank))
    meta = {"step": 1000, "stage_index": 0, "stage_name": "bench", "model_args": args.to_dict(), "resolution": 256,
            "text_encoder": "", "system_prompt": "", "world_size": world_size, "zero": "zero3", "shift": 1.0}
    (step_dir / "meta.json").write_text(json.dumps(meta))
    return sum(v.numel() for v in state.values())


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="XL/16")
    ap.add_argument("--world-size", type=int, default=8)
    ap.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    a = ap.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="bench_release_"))
    try:
        step_dir = tmp / "run" / "checkpoints" / "step_00001000"
        n = write_zero3_ema_checkpoint(step_dir, a.size, a.world_size)
        ckpt_bytes = sum(f.stat().st_size for f in step_dir.iterdir())
        code = ("from pixeldit.train.export import export_release; import sys; "
                f"export_release(sys.argv[1], sys.argv[2], weights='ema', dtype='{a.dtype}')")
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", code, str(step_dir), str(tmp / "release")], check=True)
        seconds = time.perf_counter() - t0
        peak_gib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20  # KiB -> GiB
        out_bytes = sum(f.stat().st_size for f in (tmp / "release").iterdir())
        print(f"| {a.size} | {n / 1e6:.1f}M params | EMA from {a.world_size} ZeRO-3 ranks ({ckpt_bytes / 2**30:.2f} GiB) "
              f"| {a.dtype} release {out_bytes / 2**30:.2f} GiB | {seconds:.1f} s | peak RSS {peak_gib:.2f} GiB |")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
