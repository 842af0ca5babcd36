"""Benchmark of the trainer's step: step time, samples/s per rank, peak memory and MFU, with and without
gradient checkpointing, through the real DeepSpeed engine (``pixeldit.train.engine.build_engine``).

    python -m tools.bench_train                                  # the default cases of this device
    python -m tools.bench_train --case debug@512 --case debug@512:ckpt --zero zero2 --steps 5
    torchrun --nproc_per_node 8 -m tools.bench_train --case XL/16@256:bs=64   # per-rank numbers on 8 GPUs

Run one case per process for clean peak-memory numbers (``for c in ...; do python -m tools.bench_train
--case $c; done``): the allocator's cache of an earlier case can shift a later case's peak.

A case is ``SIZE@RES[:bs=N][:ckpt]``: model size from the size table, square resolution, micro batch per
rank, activation checkpointing of the patch and PiT blocks. One step = forward + loss
(``pixeldit.diffusion.objective.compute_loss``, REPA off) + backward + ZeRO AdamW step on random images
and conditions (class ids, or random text-encoder states for text models): the trainer's arithmetic
without the data loader. Peak memory: ``torch.cuda.max_memory_allocated`` on GPU, peak RSS of the process
on CPU (``/proc/self/status`` VmHWM, reset per case). MFU counts 3x forward FLOPs per image
(``pixeldit.models.flops``; the recomputation of checkpointing is not counted) against the device's dense
bf16 peak. Prints a markdown table and, with --json, writes the rows to a file.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import time

import torch

from pixeldit.models.flops import train_flops
from pixeldit.train.config import RunConfig, StageConfig
from pixeldit.train.curriculum import Curriculum
from pixeldit.train.engine import build_engine
from pixeldit.train.metrics import device_peak_tflops
from pixeldit.train.trainer import init_distributed, step_generator
from tools.bench_cases import Case

GPU_CASES = ["debug@512:bs=8", "debug@512:bs=8:ckpt", "debug@1024:bs=2", "debug@1024:bs=2:ckpt",
             "XL/16@256:bs=64", "XL/16@256:bs=64:ckpt", "T2I@512:bs=16", "T2I@512:bs=16:ckpt"]
CPU_CASES = ["debug@512:bs=1", "debug@512:bs=1:ckpt", "debug@1024:bs=1", "debug@1024:bs=1:ckpt"]


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field))


def reset_peak_memory() -> int:
    """Free what earlier cases left and reset the peak counter; returns the baseline subtracted from the
    peak (GPU: bytes still allocated; CPU: current RSS in KiB)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    with open("/proc/self/clear_refs", "w") as f:  # resets VmHWM to the current RSS
        f.write("5")
    return _status_kib("VmRSS")


def peak_memory_gib(baseline: int) -> float:
    """GPU: peak allocated above the baseline (weights, optimizer states, activations); CPU: peak RSS above it."""
    if torch.cuda.is_available():
        return (torch.cuda.max_memory_allocated() - baseline) / 2**30
    return (_status_kib("VmHWM") - baseline) / 2**20


def run_case(case: Case, zero: str, precision: str, steps: int, warmup: int, rank: int, world: int) -> dict:
    stage = StageConfig(name="bench", steps=steps + warmup, data_path="unused", resolution=case.res,
                        bucket_align=16, micro_batch=case.batch, grad_checkpointing=case.ckpt)
    cfg = RunConfig(stages=[stage])
    cfg.model.size, cfg.deepspeed.zero, cfg.deepspeed.precision = case.size, zero, precision
    args = cfg.model.args()
    objective = Curriculum(cfg.stages).objective(0, cfg.objective)
    baseline = reset_peak_memory()
    bundle = build_engine(cfg, 0, world, teacher_dim=None)
    device, engine = bundle.device, bundle.engine
    gen = torch.Generator(device=device).manual_seed(rank)
    x0 = torch.rand(case.batch, 3, case.res, case.res, generator=gen, device=device) * 2 - 1  # (B, 3, H, W)
    if args.conditioning == "class":
        cond = {"y": torch.randint(0, args.num_classes, (case.batch,), generator=gen, device=device)}
        null = {"y": torch.full((case.batch,), args.num_classes, device=device)}
    else:
        ctx = torch.randn(case.batch, args.text_len, args.text_dim, generator=gen, device=device)  # (B, T, C)
        mask = torch.ones(case.batch, args.text_len, dtype=torch.bool, device=device)
        cond, null = {"context": ctx, "context_mask": mask}, {"context": torch.zeros_like(ctx), "context_mask": mask}
    times = []
    for i in range(warmup + steps):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = engine(x0, cond, null, objective, None, step_generator(0, rank, i, 0, device))
        engine.backward(out["loss"])
        engine.step()
        loss = float(out["loss"].detach())  # synchronises
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    peak = device_peak_tflops()
    flops = train_flops(args, case.res, case.res) * case.batch
    row = {"case": str(case), "zero": zero, "precision": precision, "world": world,
           "step_s": step_s, "samples_per_s_per_rank": case.batch / step_s, "peak_mem_gib": peak_memory_gib(baseline),
           "tflops_per_rank": flops / step_s / 1e12, "mfu": flops / step_s / (peak * 1e12) if peak else None,
           "loss": loss}
    engine.destroy()
    del bundle, engine, out
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--case", action="append", help="SIZE@RES[:bs=N][:ckpt]; repeatable")
    p.add_argument("--zero", default="zero2", choices=["zero1", "zero2", "zero3", "zero3_offload"])
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--json", default=None, help="write the rows to this JSON file")
    a = p.parse_args(argv)
    info = init_distributed()
    cases = [Case.parse(c) for c in (a.case or (GPU_CASES if torch.cuda.is_available() else CPU_CASES))]
    rows = []
    for case in cases:
        try:
            rows.append(run_case(case, a.zero, a.precision, a.steps, a.warmup, info.rank, info.world_size))
        except torch.OutOfMemoryError:
            rows.append({"case": str(case), "zero": a.zero, "precision": a.precision, "error": "out of memory"})
            torch.cuda.empty_cache()
        if info.rank == 0:
            print(json.dumps(rows[-1]), flush=True)
    if info.rank == 0:
        device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
        print(f"\n{device}, {info.world_size} rank(s), {a.zero}, {a.precision}, median of {a.steps} steps\n")
        print("| case | step (s) | samples/s per rank | peak mem (GiB) | TFLOP/s per rank | MFU |")
        print("|---|---|---|---|---|---|")
        for r in rows:
            if "error" in r:
                print(f"| {r['case']} | {r['error']} | | | | |")
                continue
            mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
            print(f"| {r['case']} | {r['step_s']:.3f} | {r['samples_per_s_per_rank']:.2f} | "
                  f"{r['peak_mem_gib']:.2f} | {r['tflops_per_rank']:.2f} | {mfu} |")
        if a.json:
            with open(a.json, "w") as f:
                json.dump({"device": device, "rows": rows}, f, indent=2)
    import deepspeed.comm

    if info.owns_group:
        deepspeed.comm.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
