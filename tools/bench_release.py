"""Conversion time and peak memory of an XL/16 training checkpoint -> release / universal checkpoint (CPU).

    python -m tools.bench_release                                  # XL/16, ZeRO-2, bf16 training, 1 CPU rank
    python -m tools.bench_release --size debug                     # quick check of the bench itself

1. ``make`` (child processes, not timed as conversions): the trainer's own code writes a real checkpoint of
   randomly initialised weights on one CPU rank: ``build_engine`` (DeepSpeed ZeRO-1/2, AdamW, the run's
   precision) with the AdamW state a first step would create (step 1, zero moments: a backward of 800M
   parameters on 2 cores would dominate the run and its memory), ``CheckpointManager.save``; then the
   trainer's ``EMA`` of the same initial weights saves its file (full fp32 layout of ZeRO-1/2). The files have
   the size and layout of any checkpoint of that model: the bf16 module, fp32 master weights + Adam moments,
   the fp32 EMA.
2. each conversion runs in its own child process, which reports the wall time of the call and its own peak
   resident memory (``getrusage`` ru_maxrss, including ~0.4 GiB of interpreter + torch):
   ``ema``: the default ``pixeldit-release`` (EMA weights -> bf16 release); ``raw``: raw fp32 master weights
   via DeepSpeed's zero_to_fp32 -> bf16 release; ``universal``: ``to_universal`` (ds_to_universal + our files).
At XL/16: ~12 GiB of memory at most (writing the checkpoint), ~30 GB of temporary disk (removed at the end), about
5 minutes on 2 cores. A child is stopped if the machine's available memory falls below 1.5 GiB.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PHASES = ("ema", "raw", "universal")
MIN_FREE_GIB = 1.5


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def make_checkpoint(run_dir: Path, size: str, zero: str, precision: str) -> dict:
    """Write step_00001000 through the trainer's engine and checkpoint manager (1 rank, no EMA yet)."""
    import torch

    from pixeldit.train.checkpoint import CheckpointManager
    from pixeldit.train.config import load_config
    from pixeldit.train.engine import build_engine
    from pixeldit.train.startup import checkpoint_meta, init_distributed

    info = init_distributed()
    cfg = load_config(None, [f"run_dir={run_dir}", f"model.size={size}", f"deepspeed.zero={zero}",
                             f"deepspeed.precision={precision}", "stages.0.data_path=unused-by-the-bench",
                             "stages.0.micro_batch=1"])
    bundle = build_engine(cfg, 0, info.world_size, None)
    inner = bundle.engine.optimizer.optimizer  # torch AdamW over DeepSpeed's fp32 partitions
    for group in inner.param_groups:  # the state AdamW's first step creates (zero moments), without a backward
        for p in group["params"]:
            inner.state[p] = {"step": torch.tensor(1.0), "exp_avg": torch.zeros_like(p),
                              "exp_avg_sq": torch.zeros_like(p)}
    params = sum(getattr(p, "ds_numel", p.numel()) for p in bundle.model.parameters())
    client = {"stage_index": 0, "step": 1000, "loader": {"epoch": 0, "position": 0}}
    ckpt = CheckpointManager(run_dir, keep=1, rank=info.rank, world_size=info.world_size)
    path = ckpt.save(bundle.engine, 1000, client, checkpoint_meta(cfg, 0, info.world_size), ema=None)
    torch.distributed.destroy_process_group()
    return {"params": params, "checkpoint": str(path), "seed": cfg.seed, "decay": cfg.ema_decay}


def make_ema(step_dir: Path, size: str, seed: int, decay: float) -> dict:
    """The EMA file of the step folder, written by the trainer's ``EMA`` of a model with the run's initial
    weights (the trainer seeds ``build_model`` with cfg.seed): the full fp32 layout of ZeRO-1/2."""
    import torch

    from pixeldit.models import build_model, get_model_args
    from pixeldit.train.ema import EMA

    torch.manual_seed(seed)
    EMA(build_model(get_model_args(size)), decay, zero3=False).save(step_dir)
    return {}


def run_phase(phase: str, step_dir: Path, out: Path) -> dict:
    from pixeldit.release.export import export_release
    from pixeldit.release.zero import to_universal

    t0 = time.perf_counter()
    if phase == "universal":
        to_universal(step_dir, out)
    else:
        export_release(step_dir, out, weights=phase, dtype="bf16")
    return {"seconds": time.perf_counter() - t0}


def mem_available_gib() -> float:
    """MemAvailable of /proc/meminfo (Linux); inf elsewhere."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return float("inf")


def child(argv: list[str], min_free_gib: float = MIN_FREE_GIB) -> dict:
    """Run this script in a fresh process; returns its JSON result (with its peak RSS). The child is stopped
    if the machine's available memory falls below ``min_free_gib`` (a shared machine must not hit the OOM killer)."""
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONPATH=os.pathsep.join(
        filter(None, [str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH")])))
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen([sys.executable, "-m", "tools.bench_release", *argv], env=env, stdout=out, stderr=err)
        while proc.poll() is None:
            if mem_available_gib() < min_free_gib:
                proc.kill()
                proc.wait()
                raise MemoryError(f"bench child {argv[-3:]} stopped: less than {min_free_gib} GiB of memory left "
                                  f"on this machine; run the bench on a machine with more free memory")
            time.sleep(0.2)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if proc.returncode != 0:
        raise RuntimeError(f"bench child {argv} failed:\n{stdout[-2000:]}\n{stderr[-4000:]}")
    return json.loads(stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="XL/16")
    ap.add_argument("--zero", default="zero2", choices=("zero1", "zero2"),
                    help="ZeRO-3 keeps its Adam state elsewhere; its conversion is covered by tests/test_release.py")
    ap.add_argument("--precision", default="bf16", choices=("bf16", "fp32"))
    ap.add_argument("--phases", nargs="+", default=list(PHASES), choices=PHASES)
    ap.add_argument("--workdir", default=None, help="temporary folder (default: a new one under $TMPDIR)")
    ap.add_argument("--child", nargs=3, metavar=("PHASE", "IN", "OUT"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:  # inside a child process
        phase, src, dst = a.child
        if phase == "make":
            result = make_checkpoint(Path(dst), a.size, a.zero, a.precision)
        elif phase == "make_ema":
            seed, decay = json.loads(src)
            result = make_ema(Path(dst), a.size, seed, decay)
        else:
            result = run_phase(phase, Path(src), Path(dst))
        result["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
        print(json.dumps(result))
        return
    tmp = Path(tempfile.mkdtemp(prefix="bench_release_", dir=a.workdir))
    try:
        made = child(["--size", a.size, "--zero", a.zero, "--precision", a.precision, "--child", "make", "-",
                      str(tmp / "run")])
        step_dir = Path(made["checkpoint"])
        made_ema = child(["--size", a.size, "--child", "make_ema", json.dumps([made["seed"], made["decay"]]),
                          str(step_dir)])
        print(f"{a.size}: {made['params'] / 1e6:.1f}M params; {a.zero} checkpoint of a {a.precision} run on 1 CPU "
              f"rank: {folder_bytes(step_dir) / 2**30:.2f} GiB (writing it: peak RSS "
              f"{made['peak_rss_gib']:.1f} GiB, EMA {made_ema['peak_rss_gib']:.1f} GiB)", flush=True)
        print("| conversion | output | time | peak RSS |\n|---|---|---|---|")
        for phase in a.phases:
            out = tmp / f"out_{phase}"
            r = child(["--child", phase, str(step_dir), str(out)])
            what = {"ema": "EMA -> bf16 release", "raw": "raw fp32 master -> bf16 release",
                    "universal": "universal checkpoint"}[phase]
            print(f"| {what} | {folder_bytes(out) / 2**30:.2f} GiB | {r['seconds']:.1f} s | "
                  f"{r['peak_rss_gib']:.2f} GiB |", flush=True)
            shutil.rmtree(out, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
