"""Compiled vs eager trainer step, side by side in one process (CPU or GPU), and the compile strategy measured.

    python -m tools.bench_compile                                  # debug and B/16 at 64 and 128 px, ZeRO-2
    python -m tools.bench_compile --strategy deepspeed --case debug@64:bs=8      # DeepSpeed's engine.compile()
    python -m tools.bench_compile --strategy blocks --zero zero3 --case debug@64:bs=8
    python -m tools.bench_compile --backend aot_eager --case debug@32:bs=2 debug@32:bs=2:ckpt   # no codegen

One engine per case (``pixeldit.train.engine.build_engine``, 1 rank, fp32 on the CPU, bf16 autocast on a GPU),
stepped by the trainer's own ``train_step`` on random images and class ids. The compiled forward and the eager
one are swapped on the SAME engine between steps (eager, compiled, eager, ...), so both see the same weights,
memory and machine load; the ratio is median compiled step / median eager step (wall, and process CPU seconds, which a shared machine
skews less) over ``--steps`` pairs after
``--warmup`` pairs (the first compiled steps include compilation: "first compiled step" below).
Strategies: ``blocks`` = ``pixeldit.train.compile`` (each block, the pixel embedding and the pixel head, one
graph per class, compiled before DeepSpeed wraps the model); ``deepspeed`` = DeepSpeed's ``engine.compile()``
(``module.compile()`` of the whole TrainModule: model, loss and the objective's random draws).
"Graphs" = graphs dynamo handed to the backend (``--backend``, the run config's ``compile.backend``; more than
the number of unit classes means graph breaks); "recompiles" = graphs compiled after the first compiled step.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import typing

import torch

from pixeldit.train.config import CompileBackend
from tools.bench_cases import Case


class RandomBatches:
    """A loader stand-in (``next``/``state_dict``) of random images and class ids of one size."""

    def __init__(self, case: Case, num_classes: int, seed: int = 0):
        self.case, self.num_classes = case, num_classes
        self.gen = torch.Generator().manual_seed(seed)
        self.count = 0

    def next(self) -> dict:
        self.count += 1
        B, R = self.case.batch, self.case.res
        return {"x0": torch.rand(B, 3, R, R, generator=self.gen) * 2 - 1,
                "label": torch.randint(0, self.num_classes, (B,), generator=self.gen), "bucket": f"{R}x{R}"}

    def state_dict(self) -> dict:
        return {"count": self.count}

    def close(self) -> None:
        pass


def run_case(case: Case, strategy: str, zero: str, steps: int, warmup: int, backend: str = "inductor") -> dict:
    from pixeldit.train.compile import CompileMonitor, compiled_units
    from pixeldit.train.conditioning import ClassConditioner
    from pixeldit.train.config import RunConfig, StageConfig
    from pixeldit.train.engine import build_engine
    from pixeldit.train.metrics import StepPhases
    from pixeldit.train.prefetch import DevicePrefetcher
    from pixeldit.train.step import train_step

    cuda = torch.cuda.is_available()
    stage = StageConfig(name="bench", steps=10**6, data_path="unused", resolution=case.res, bucket_align=16,
                        micro_batch=case.batch, grad_checkpointing=case.ckpt, lr=1e-4)
    cfg = RunConfig(stages=[stage])
    cfg.model.size, cfg.deepspeed.zero = case.size, zero
    cfg.deepspeed.precision = "bf16" if cuda else "fp32"
    cfg.compile.enabled, cfg.compile.backend = strategy == "blocks", backend
    args = cfg.model.args()
    monitor = CompileMonitor(budget=10**6, compiler=backend)
    bundle = build_engine(cfg, 0, 1, teacher_dim=None, monitor=monitor)
    engine, device = bundle.engine, bundle.device
    units = compiled_units(bundle.model)
    if strategy == "blocks":
        compiled = [u.forward for u in units]
        eager = [u._pixeldit_eager_forward for u in units]

        def use(on: bool) -> None:
            for u, c, e in zip(units, compiled, eager):
                u.forward = c if on else e
    else:
        engine.compile(backend=monitor.backend)
        compiled_call = engine.module._compiled_call_impl

        def use(on: bool) -> None:
            engine.module._compiled_call_impl = compiled_call if on else None
    objective = cfg.stage_objective(stage)
    batches = DevicePrefetcher(RandomBatches(case, args.num_classes), device,
                               ClassConditioner(args.num_classes, device), remaining=10**9)
    times: dict[bool, list[float]] = {False: [], True: []}
    cpu: dict[bool, list[float]] = {False: [], True: []}  # process CPU seconds (robust to a shared machine)
    first_compiled, warm_graphs = None, 0
    for i in range(warmup + steps):
        for on in (False, True):
            use(on)
            if cuda:
                torch.cuda.synchronize()
            t0, c0 = time.perf_counter(), time.process_time()
            train_step(engine, batches, objective, None, device=device, seed=0, rank=0, step=2 * i + on, stop=False,
                       phases=StepPhases(device))
            if cuda:
                torch.cuda.synchronize()
            seconds, cpu_s = time.perf_counter() - t0, time.process_time() - c0
            if on and i == 0:
                first_compiled, warm_graphs = seconds, monitor.total
            if i >= warmup:
                times[on].append(seconds)
                cpu[on].append(cpu_s)
    eager_s, compiled_s = statistics.median(times[False]), statistics.median(times[True])
    engine.destroy()
    return {"case": str(case), "strategy": strategy, "zero": zero, "eager_s": eager_s, "compiled_s": compiled_s,
            "ratio": compiled_s / eager_s, "cpu_ratio": statistics.median(cpu[True]) / statistics.median(cpu[False]),
            "first_compiled_s": first_compiled, "graphs": monitor.total, "recompiles": monitor.total - warm_graphs,
            "backend": backend}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", nargs="+", default=["debug@64:bs=8", "debug@128:bs=8", "B/16@64:bs=2", "B/16@128:bs=2"])
    ap.add_argument("--strategy", choices=["blocks", "deepspeed"], default="blocks")
    ap.add_argument("--zero", default="zero2", choices=["zero1", "zero2", "zero3"])
    ap.add_argument("--backend", default="inductor", choices=typing.get_args(CompileBackend),
                    help="dynamo backend (compile.backend): aot_eager/eager skip code generation (no speed-up)")
    ap.add_argument("--steps", type=int, default=10, help="measured eager/compiled step pairs")
    ap.add_argument("--warmup", type=int, default=2, help="pairs before measuring (the first compiles)")
    ap.add_argument("--json", default=None, help="also write the rows to this JSON file")
    a = ap.parse_args(argv)
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    from pixeldit.train.startup import init_distributed

    info = init_distributed()
    rows = []
    for text in a.case:
        rows.append(run_case(Case.parse(text), a.strategy, a.zero, a.steps, a.warmup, a.backend))
        print(rows[-1], flush=True)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    print(f"\n{device}, strategy {a.strategy}, {a.zero}, backend {a.backend}, median of {a.steps} steps each, "
          f"load average {os.getloadavg()[0]:.1f}\n")
    print("| case | eager step (s) | compiled step (s) | compiled / eager (wall) | compiled / eager (CPU s) | "
          "first compiled step (s) | graphs | recompiles |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['eager_s']:.3f} | {r['compiled_s']:.3f} | {r['ratio']:.2f}x | {r['cpu_ratio']:.2f}x | "
              f"{r['first_compiled_s']:.1f} | {r['graphs']} | {r['recompiles']} |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"device": device, "load_average": os.getloadavg()[0], "rows": rows}, f, indent=1)
    if info.owns_group:
        import deepspeed.comm

        deepspeed.comm.destroy_process_group()


if __name__ == "__main__":
    main()
