"""Benchmark of the trainer's step: step time, images/s per rank, peak memory, MFU and the step-time breakdown,
through the real engine (``pixeldit.train.engine.build_engine``) and the real step (``pixeldit.train.step``).

    python -m tools.bench_train                                  # the default cases of this device
    python -m tools.bench_train --case T2I@512:bs=64:ckpt --compile on --json t2i512.json
    python -m tools.bench_train --case XL/16@256:bs=64 --compile on --count-syncs --steps 3
    torchrun --nproc_per_node 8 -m tools.bench_train --case XL/16@256:bs=64   # per-rank numbers on 8 GPUs

Run one case per process for clean peak-memory numbers (``tools.bench_gpu`` does): the allocator's cache of an
earlier case can shift a later case's peak.

A case is ``SIZE@RES[:bs=N][:ckpt]``: model size from the size table, square resolution, micro batch per rank,
activation checkpointing of the patch and PiT blocks. One step = ``train_step``: the micro-batch from the device
prefetcher (random images in [-1, 1]; class ids, or random text-encoder states for text models), forward + loss
(``compute_loss``, REPA off), the step's all-reduce, backward, ZeRO AdamW (fused on CUDA), then the EMA update, as
the trainer runs it. ``--compile``: ``on``/``off`` set ``compile.enabled``; ``auto`` = the run config's default
(on with CUDA). Step time: median over ``--steps`` after ``--warmup`` steps (the warm-up includes compilation),
device synchronised around each step. Breakdown: ``StepPhases`` (CUDA events), median per phase. Peak memory:
``torch.cuda.max_memory_allocated`` on GPU, peak RSS of the process on CPU (``/proc/self/status`` VmHWM, reset per
case). MFU counts 3x forward FLOPs per image (``pixeldit.models.flops``; the recomputation of checkpointing is not
counted) against the device's dense bf16 peak. ``--count-syncs`` (CUDA): counts host synchronisations per step
with ``torch.cuda.set_sync_debug_mode("warn")`` and names the function that made each one.
"""
from __future__ import annotations

import argparse
import collections
import gc
import json
import os
import statistics
import time
import warnings

import torch

from pixeldit.models.flops import train_flops
from pixeldit.train.config import RunConfig, StageConfig
from pixeldit.train.ema import EMA
from pixeldit.train.engine import build_engine
from pixeldit.train.metrics import StepPhases, device_peak_tflops
from pixeldit.train.prefetch import DevicePrefetcher
from pixeldit.train.step import train_step
from pixeldit.train.startup import init_distributed
from tools.bench_cases import Case

GPU_CASES = ["XL/16@256:bs=64", "T2I@512:bs=64:ckpt", "T2I@1024:bs=16:ckpt"]
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


class RandomBatches:
    """A loader stand-in (``next``/``state_dict``/``close``): random images of one size, random class ids."""

    def __init__(self, batch: int, res: int, num_classes: int, seed: int):
        self.batch, self.res, self.num_classes = batch, res, num_classes
        self.gen = torch.Generator().manual_seed(seed)
        self.count = 0

    def next(self) -> dict:
        self.count += 1
        x0 = torch.rand(self.batch, 3, self.res, self.res, generator=self.gen) * 2 - 1  # (B, 3, H, W)
        label = torch.randint(0, max(1, self.num_classes), (self.batch,), generator=self.gen)
        return {"x0": x0, "label": label, "bucket": f"{self.res}x{self.res}"}

    def state_dict(self) -> dict:
        return {"count": self.count}

    def close(self) -> None:
        pass


def conditioner_for(args, device: torch.device, seed: int):
    """batch -> (cond, null_cond): class ids, or random text-encoder states (B, T, C) for text models."""
    if args.conditioning == "class":
        from pixeldit.train.conditioning import ClassConditioner

        return ClassConditioner(args.num_classes, device)
    gen = torch.Generator(device=device).manual_seed(seed)

    def text(batch: dict) -> tuple[dict, dict]:
        B = batch["x0"].shape[0]
        ctx = torch.randn(B, args.text_len, args.text_dim, generator=gen, device=device)  # (B, T, C)
        mask = torch.ones(B, args.text_len, dtype=torch.bool, device=device)
        return {"context": ctx, "context_mask": mask}, {"context": torch.zeros_like(ctx), "context_mask": mask}

    return text


def run_case(case: Case, zero: str, precision: str, compile_mode: str, steps: int, warmup: int, rank: int,
             world: int, count_syncs: bool) -> dict:
    stage = StageConfig(name="bench", steps=steps + warmup, data_path="unused", resolution=case.res,
                        bucket_align=16, micro_batch=case.batch, grad_checkpointing=case.ckpt)
    cfg = RunConfig(stages=[stage])
    cfg.model.size, cfg.deepspeed.zero, cfg.deepspeed.precision = case.size, zero, precision
    cfg.compile.enabled = {"on": True, "off": False, "auto": None}[compile_mode]
    args = cfg.model.args()
    objective = cfg.stage_objective(stage)
    baseline = reset_peak_memory()
    bundle = build_engine(cfg, 0, world, teacher_dim=None)
    device, engine = bundle.device, bundle.engine
    ema = EMA(bundle.model, cfg.ema_decay, bundle.zero3, world, rank)
    batches = DevicePrefetcher(RandomBatches(case.batch, case.res, args.num_classes, rank), device,
                               conditioner_for(args, device, rank), remaining=steps + warmup)
    cuda = torch.cuda.is_available()
    times, phases_list, syncs = [], [], collections.Counter()
    warm_s = 0.0
    for i in range(warmup + steps):
        if cuda:
            torch.cuda.synchronize()
        phases = StepPhases(device)
        t0 = time.perf_counter()
        counting = count_syncs and cuda and i >= warmup
        if counting:
            torch.cuda.set_sync_debug_mode("warn")
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            out = train_step(engine, batches, objective, None, device=device, seed=0, rank=rank, step=i, stop=False,
                             phases=phases)
            if out.applied:
                with phases.phase("optimizer"):
                    ema.update()
            if counting:
                torch.cuda.set_sync_debug_mode("default")
        if counting:
            for w in seen:
                if "synchroniz" in str(w.message):
                    syncs[str(w.filename).split("site-packages/")[-1] + f":{w.lineno}"] += 1
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        if i < warmup:
            warm_s += seconds
        else:
            times.append(seconds)
            phases_list.append(phases.seconds())
    step_s = statistics.median(times)
    peak = device_peak_tflops()
    flops = train_flops(args, case.res, case.res) * case.batch
    breakdown = {k: statistics.median(p[k] for p in phases_list) for k in phases_list[0]}
    row = {"case": str(case), "zero": zero, "precision": precision, "world": world,
           "compile": bundle.compile.enabled, "step_s": step_s, "img_per_s_per_rank": case.batch / step_s,
           "peak_mem_gib": peak_memory_gib(baseline), "tflops_per_rank": flops / step_s / 1e12,
           "mfu": flops / step_s / (peak * 1e12) if peak else None, "warmup_s": warm_s, "loss": out.loss,
           "graphs": bundle.monitor.total if bundle.monitor is not None else 0, "breakdown": breakdown}
    if count_syncs and cuda:
        row["syncs_per_step"] = {site: n / steps for site, n in syncs.most_common()}
    batches.close()
    engine.destroy()
    del bundle, engine, ema, batches
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--case", action="append", help="SIZE@RES[:bs=N][:ckpt]; repeatable")
    p.add_argument("--zero", default="zero2", choices=["zero1", "zero2", "zero3", "zero3_offload"])
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--compile", default="auto", choices=["auto", "on", "off"], help="compile.enabled")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--count-syncs", action="store_true", help="CUDA: count host synchronisations per step")
    p.add_argument("--json", default=None, help="write the rows to this JSON file")
    a = p.parse_args(argv)
    info = init_distributed()
    cases = [Case.parse(c) for c in (a.case or (GPU_CASES if torch.cuda.is_available() else CPU_CASES))]
    rows = []
    for case in cases:
        try:
            rows.append(run_case(case, a.zero, a.precision, a.compile, a.steps, a.warmup, info.rank,
                                 info.world_size, a.count_syncs))
        except torch.OutOfMemoryError:
            rows.append({"case": str(case), "zero": a.zero, "precision": a.precision, "error": "out of memory"})
            torch.cuda.empty_cache()
        if info.rank == 0:
            print(json.dumps(rows[-1]), flush=True)
    if info.rank == 0:
        device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
        print(f"\n{device}, {info.world_size} rank(s), {a.zero}, {a.precision}, median of {a.steps} steps\n")
        print("| case | compile | step (s) | img/s per rank | peak mem (GiB) | MFU | data / fwd / bwd / opt (ms) |")
        print("|---|---|---|---|---|---|---|")
        for r in rows:
            if "error" in r:
                print(f"| {r['case']} | | {r['error']} | | | | |")
                continue
            mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
            b = r["breakdown"]
            ms = " / ".join(f"{1e3 * b[f'time_{k}_s']:.0f}" for k in ("data", "forward", "backward", "optimizer"))
            print(f"| {r['case']} | {'yes' if r['compile'] else 'no'} | {r['step_s']:.3f} | "
                  f"{r['img_per_s_per_rank']:.1f} | {r['peak_mem_gib']:.2f} | {mfu} | {ms} |")
        if a.json:
            with open(a.json, "w") as f:
                json.dump({"device": device, "torch": torch.__version__, "rows": rows}, f, indent=2)
    import deepspeed.comm

    if info.owns_group:
        deepspeed.comm.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
