"""Model FLOP utilisation (MFU) of a PixelDiT training step on one GPU.

    python -m tools.bench_mfu                                    # XL/16@256, T2I@512 (+ckpt), T2I@1024 (+ckpt)
    python -m tools.bench_mfu --case XL/16@256:bs=64 --compile

One training step = forward + backward + fused AdamW on fp32 master weights under bf16 autocast
(flash/cuDNN attention through scaled_dot_product_attention), random images/conditions: the model's
arithmetic throughput, without the data loader. MFU counts model FLOPs (3x forward,
``pixeldit.models.flops.train_flops``) against the device's dense bf16 peak; with activation checkpointing the
recomputed forward is not counted (hardware utilisation would be 4/3 of the MFU printed).
A case whose batch does not fit is retried at half the batch until it does.
"""
from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path

import torch

from pixeldit.models import build_model, get_model_args
from pixeldit.models.flops import train_flops
from pixeldit.train.activation_checkpointing import apply_activation_checkpointing
from pixeldit.storage import write_text_atomic
from pixeldit.train.metrics import device_peak_tflops
from tools.bench_cases import Case

DEFAULT_CASES = ["XL/16@256:bs=128", "XL/16@256:bs=256:ckpt", "T2I@512:bs=64:ckpt", "T2I@1024:bs=16:ckpt"]


def peak_tflops(override: float | None) -> float:
    peak = device_peak_tflops(override or 0.0)
    if peak is None:
        raise ValueError(f"unknown peak for {torch.cuda.get_device_name()!r}: pass --peak-tflops")
    return peak


def run_case(case: Case, steps: int, warmup: int, compile_model: bool) -> dict:
    args = get_model_args(case.size)
    dev = torch.device("cuda")
    model = build_model(args, device=dev)
    apply_activation_checkpointing(model, case.ckpt)
    fwd = torch.compile(model) if compile_model else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    B, H = case.batch, case.res
    x = torch.randn(B, 3, H, H, device=dev)
    t = torch.rand(B, device=dev)
    target = torch.randn_like(x)
    if args.conditioning == "class":
        cond = {"y": torch.randint(0, args.num_classes, (B,), device=dev)}
    else:
        cond = {"context": torch.randn(B, args.text_len, args.text_dim, device=dev)}

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = (fwd(x, t, **cond).float() - target).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    warm_s = time.perf_counter() - t0
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(steps):
        step()
    end.record()
    torch.cuda.synchronize()
    step_s = start.elapsed_time(end) / 1000 / steps
    flops = train_flops(args, H, H) * B
    return {
        "size": case.size, "res": H, "batch": B, "ckpt": case.ckpt, "compile": compile_model,
        "step_s": step_s, "img_per_s": B / step_s, "tflops": flops / step_s / 1e12,
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30, "warmup_s": warm_s,
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", nargs="+", default=DEFAULT_CASES, help="SIZE@RES[:bs=N][:ckpt]")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--compile", action="store_true", help="torch.compile the model")
    ap.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak (default from device name)")
    ap.add_argument("--json", default=None, help="also write results to this JSON file")
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_mfu needs a CUDA GPU")
    torch.backends.cuda.matmul.allow_tf32 = True
    peak = peak_tflops(a.peak_tflops)
    results = []
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  peak bf16 {peak:.0f} TFLOP/s")
    print("| size | res | batch | act. ckpt | compile | step (s) | img/s | model TFLOP/s | MFU | peak mem (GiB) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for text in a.case:
        case = Case.parse(text)
        while True:
            try:
                r = run_case(case, a.steps, a.warmup, a.compile)
                break
            except torch.OutOfMemoryError:
                gc.collect()
                torch.cuda.empty_cache()
                if case.batch == 1:
                    raise
                case.batch //= 2
        r["mfu"] = r["tflops"] / peak
        results.append(r)
        print(f"| {r['size']} | {r['res']} | {r['batch']} | {'on' if r['ckpt'] else 'off'} | "
              f"{'yes' if r['compile'] else 'no'} | {r['step_s']:.3f} | {r['img_per_s']:.1f} | "
              f"{r['tflops']:.0f} | {r['mfu']:.1%} | {r['peak_mem_gib']:.1f} |"
              f"  (warmup incl. compile {r['warmup_s']:.0f} s)", flush=True)
        gc.collect()
        torch.cuda.empty_cache()
        if a.json:  # after every case, so a run cut short keeps the cases it finished
            write_text_atomic(Path(a.json), json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                                    "results": results}, indent=1))


if __name__ == "__main__":
    main()
