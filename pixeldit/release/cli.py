"""pixeldit-release: training checkpoint (any ZeRO stage, any world size) -> release folder, or -> universal.

    pixeldit-release runs/t2i releases/pixeldit-t2i                    # EMA weights, bf16, from checkpoints/latest
    pixeldit-release runs/t2i/checkpoints/step_00100000 out --weights raw --dtype fp32 --max-shard-size 2GB
    pixeldit-release runs/t2i --universal                              # universal checkpoint for another world size
    pixeldit-release runs/t2i releases/best --best fid                 # the step with the best recorded FID

A release folder holds config.json, model.safetensors (or shards + model.safetensors.index.json) and a
model card README.md; load it with ``pixeldit.release.from_pretrained`` or sample with ``pixeldit-sample``.
Sampler defaults stored in config.json: the paper's (FlowDPM-Solver; class models 100 steps, CFG 3.25 on
t in [0.0, 0.9], t = 1 noise: the official [0.1, 1.0] in its reversed time; text models 25 steps, CFG 4.5)
with the stage's time shift, unless the flags below say otherwise.
A user error (no checkpoint, a damaged file, a bad flag) is one line and exit code 2; --traceback (or
PIXELDIT_TRACEBACK=1) shows the traceback.
"""
from __future__ import annotations

import argparse
import re
import time

from pixeldit import run_folder
from pixeldit.errors import CliParser, cli_main

from .best import BEST_METRICS, best_checkpoint
from .config import DEFAULT_DTYPE, DEFAULT_WEIGHTS, DTYPES, WEIGHTS, add_sampler_flags, sampler_flags
from .export import export_release
from .writer import DEFAULT_MAX_SHARD_BYTES
from .zero import to_universal

PROG = "pixeldit-release"
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str) -> int:
    """'5GB', '500MiB', '1048576' -> bytes."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).upper() not in _UNITS:
        raise argparse.ArgumentTypeError(f"size {text!r}: use a number with an optional unit "
                                         f"({', '.join(u for u in _UNITS if u)}), e.g. 5GB")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def build_parser() -> argparse.ArgumentParser:
    ap = CliParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="run folder (uses checkpoints/latest) or a step folder")
    ap.add_argument("out", nargs="?", help="release folder to write (with --universal: optional output folder)")
    ap.add_argument("--weights", choices=WEIGHTS, default=DEFAULT_WEIGHTS, help="default: %(default)s")
    ap.add_argument("--dtype", choices=list(DTYPES), default=DEFAULT_DTYPE, help="default: %(default)s")
    ap.add_argument("--max-shard-size", type=parse_size, default=DEFAULT_MAX_SHARD_BYTES,
                    help="shard model.safetensors above this size, e.g. 2GB (default: %(default)s bytes)")
    add_sampler_flags(ap)
    ap.add_argument("--best", default=None, metavar="METRIC",
                    help="release the checkpoint of the run with the best value in its metrics.jsonl: "
                         f"{', '.join(BEST_METRICS)} (lower is better but for clip_score)")
    ap.add_argument("--universal", action="store_true",
                    help="write a DeepSpeed universal checkpoint (resume on another number of ranks) instead")
    ap.add_argument("--workers", type=int, default=1, help="processes of the universal conversion")
    ap.add_argument("--verify", choices=run_folder.VERIFY_MODES, default="size",
                    help="checks of the checkpoint before reading it: every file of its manifest with its size "
                         "(size, a stat per file), or also its SHA-256 (full, ~1 s per GB); a damaged `latest` "
                         "falls back to the newest intact step folder, said on stderr (default: %(default)s)")
    return ap


def run(argv: list[str]) -> None:
    """The command itself; raises on user errors (``main`` turns them into one line and exit code 2)."""
    ap = build_parser()
    a = ap.parse_args(argv)
    t0 = time.time()
    if a.universal:
        out = to_universal(a.checkpoint, a.out, workers=a.workers, verify=a.verify)
        print(f"universal checkpoint: {out} ({time.time() - t0:.1f} s). Resume it on any number of ranks in a new "
              f"run folder:\n  pixeldit-train --config RUN.yaml run_dir=NEW_RUN checkpoint.resume_from={out} "
              f"checkpoint.load_universal=true")
        return
    if not a.out:
        ap.error("the release folder (out) is required unless --universal")
    checkpoint = a.checkpoint
    if a.best is not None:
        step_dir, value, note = best_checkpoint(a.checkpoint, a.best)
        print(f"best {a.best}: {value:.6g} at step {run_folder.step_of(step_dir)} ({step_dir})")
        if note:
            print(f"note: {note}")
        checkpoint = str(step_dir)
    out = export_release(checkpoint, a.out, weights=a.weights, dtype=a.dtype, max_shard_bytes=a.max_shard_size,
                         sampler=sampler_flags(a), verify=a.verify)
    print(f"release: {out} ({a.weights} weights, {a.dtype}, {time.time() - t0:.1f} s)")


def main(argv: list[str] | None = None) -> int:
    return cli_main(PROG, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
