"""CAME vs AdamW: optimizer-state memory, step time side by side, and training loss on the quickstart data.

    python -m tools.bench_came memory            # B/16, XL/16, T2I on the meta device; debug on 2 CPU ranks, ZeRO-1/2/3
    python -m tools.bench_came step              # optimizer.step() of B/16 on the CPU, AdamW and CAME interleaved
    python -m tools.bench_came loss              # quickstart data, 2 CPU ranks, ZeRO-2: AdamW and CAME, 400 steps each

memory: the bytes of every tensor in ``optimizer.state`` after one step, counted from the real optimizers of
``pixeldit.train.optim.build_optimizer`` over the training module (model, no REPA projector) built on the
meta device (no memory is allocated; the step runs on meta tensors). Then the same on 2 CPU ranks through the
trainer's ``build_engine`` for the debug model under ZeRO-1/2/3 (``zero-state`` worker): per-rank state, which
checks the per-rank formula used for 8 ranks (AdamW 8 B x params / N; CAME 4 B x params / N for the first
moment and the vectors' second moments, plus 8 B x (rows + columns) of every matrix a rank holds a piece of,
replicated: all of them under ZeRO-3, where every parameter is cut across all ranks). The worker keeps the
AdamW and the CAME engine of a ZeRO stage alive together and times ``--timed-steps`` training steps of each,
alternating (AdamW step, CAME step, ...), so both see the same machine load: median whole step (forward +
backward + ``engine.step()``) and median ``engine.step()`` (ZeRO's reduction, clipping, the optimizer, the
parameter update) on rank 0.

step: one process, ``--size`` (B/16) in fp32 on the CPU with random gradients; ``optimizer.step()`` of AdamW
(torch's default implementation) and of CAME alternate for ``--repeats`` rounds after one warm-up step each;
medians and their ratio. This is the optimizer alone, without ZeRO's communication.

loss: ``pixeldit-quickstart`` once with 1 training step to make its data (synthetic shapes -> img2dataset ->
shards -> caption embeddings), then its stage 1 (64 px fixed crops, debug-T2I, batch 8 per rank, fp32,
ZeRO-2, 2 ranks, seed 0) for ``--steps`` steps per optimizer and learning rate; mean loss over the first and
last 100 steps, and the colour accuracy of samples from the EMA release
(``pixeldit.evaluation.synthetic_checks``).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

SIZES = ("B/16", "XL/16", "T2I")
ROOT = Path(__file__).resolve().parents[1]


def state_bytes(optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes of the optimizer's state tensors by key (scalars such as AdamW's step included)."""
    out: dict[str, int] = {}
    for state in optimizer.state.values():
        for key, v in state.items():
            if torch.is_tensor(v):
                out[key] = out.get(key, 0) + v.numel() * v.element_size()
    return out


def meta_state(size: str, name: str) -> tuple[int, dict[str, int]]:
    from pixeldit.models import build_model, get_model_args
    from pixeldit.train.config import OptimConfig
    from pixeldit.train.engine import TrainModule
    from pixeldit.train.optim import build_optimizer

    module = TrainModule(build_model(get_model_args(size), device="meta"))
    opt = build_optimizer(module, OptimConfig(name=name), 1e-4)
    for p in module.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    return sum(p.numel() for p in module.parameters()), state_bytes(opt)


def memory(a: argparse.Namespace) -> dict:
    gib = 2 ** 30
    rows, results = [], {}
    for size in SIZES:
        params, adamw = meta_state(size, "adamw")
        _, came = meta_state(size, "came")
        stats = sum(v for k, v in came.items() if k.endswith(("_row", "_col")))
        first, vectors = came["exp_avg"], came["exp_avg_sq"]
        total_a, total_c = sum(adamw.values()), sum(came.values())
        n = a.ranks
        rank_a, rank_c = total_a / n, (first + vectors) / n + stats
        results[size] = {"params": params, "adamw": adamw, "came": came}
        rows.append(f"| {size} | {params / 1e6:.1f}M | {total_a / gib:.2f} | {total_c / gib:.2f} "
                    f"({first / gib:.2f} + {vectors / 2**20:.1f} MiB + {stats / 2**20:.1f} MiB) | "
                    f"{total_c / total_a:.3f} | {rank_a / gib:.3f} | {rank_c / gib:.3f} |")
    print(f"\n| size | params | AdamW state (GiB) | CAME state (GiB) (first moment + vectors' 2nd moment + "
          f"row/col statistics) | CAME / AdamW | AdamW per rank, {a.ranks} ranks (GiB) | CAME per rank, "
          f"{a.ranks} ranks, ZeRO-3 bound (GiB) |\n|---|---|---|---|---|---|---|")
    print("\n".join(rows))

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", WANDB_MODE="disabled",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(a.port), "-m", "tools.bench_came", "zero-state", "--out", str(out), "--timed-steps", str(a.timed_steps)]
    subprocess.run(cmd, env=env, cwd=ROOT, check=True, capture_output=True)
    print(f"\n| ZeRO | optimizer | rank 0 state (KiB) | rank 1 state (KiB) | CAME formula rank 0 / rank 1 (KiB) | "
          f"whole step, median of {a.timed_steps} (ms) | engine.step() (ms) |\n|---|---|---|---|---|---|---|")
    ranks = {}
    for zero in ("zero1", "zero2", "zero3"):
        for name in ("adamw", "came"):
            r = [json.loads((out / f"{zero}_{name}_rank{k}.json").read_text()) for k in range(2)]
            ranks[f"{zero}/{name}"] = r
            formula = " / ".join(f"{x['formula'] / 1024:.1f}" for x in r) if name == "came" else ""
            print(f"| {zero} | {name} | {r[0]['bytes'] / 1024:.1f} | {r[1]['bytes'] / 1024:.1f} | {formula} | "
                  f"{r[0]['median_step_s'] * 1e3:.0f} | {r[0]['median_optimizer_s'] * 1e3:.0f} |")
    results["debug_2_ranks"] = ranks
    (out / "memory.json").write_text(json.dumps(results, indent=1))
    return results


def zero_state(a: argparse.Namespace) -> None:
    """torchrun worker: per-rank optimizer state of the debug model under ZeRO-1/2/3 after one step, and the step
    times of the AdamW and CAME engines taken in turns."""
    import torch.distributed as dist

    from pixeldit.diffusion.objective import ObjectiveConfig
    from pixeldit.train.came import CAME, is_factored
    from pixeldit.train.config import RunConfig, StageConfig
    from pixeldit.train.engine import build_engine
    from pixeldit.train.startup import init_distributed

    info = init_distributed()
    for zero in ("zero1", "zero2", "zero3"):
        engines = {}
        for name in ("adamw", "came"):
            cfg = RunConfig(stages=[StageConfig(name="s", data_path="/unused", resolution=32, bucket_align=16,
                                                micro_batch=2)])
            cfg.optim.name, cfg.deepspeed.zero = name, zero
            engines[name] = build_engine(cfg, 0, dist.get_world_size(), None).engine
        args = cfg.model.args()
        x0 = torch.rand(2, 3, 32, 32) * 2 - 1
        cond, null = {"y": torch.tensor([1, 2])}, {"y": torch.full((2,), args.num_classes)}
        times = {name: {"step": [], "optimizer": []} for name in engines}
        for k in range(a.timed_steps + 1):  # step 0 creates the states (not timed)
            for name, engine in engines.items():  # in turns: both see the same load
                dist.barrier()
                t0 = time.perf_counter()
                out = engine(x0, cond, null, ObjectiveConfig(), None, torch.Generator().manual_seed(k))
                engine.backward(out["loss"])
                t1 = time.perf_counter()
                engine.step()
                t2 = time.perf_counter()
                if k:
                    times[name]["step"].append(t2 - t0)
                    times[name]["optimizer"].append(t2 - t1)
        for name, engine in engines.items():
            opt = engine.optimizer.optimizer
            result = {"bytes": sum(state_bytes(opt).values()),
                      **{f"median_{key}_s": statistics.median(v) for key, v in times[name].items()}}
            if isinstance(opt, CAME):  # 4 B per local element (first moment, vectors' 2nd moment),
                # 8 B per row and per column (r and R; c and C) of every matrix held
                segs = [s for part in opt.partitions() for s in part.segments]
                local = sum(part.tensor.numel() for part in opt.partitions())
                vec = sum(s.numel for s in segs if not is_factored(s.shape))
                rc = sum(s.shape[0] + s.shape[1] for s in segs if is_factored(s.shape))
                result["formula"] = 4 * (local + vec) + 8 * rc
            Path(a.out, f"{zero}_{name}_rank{dist.get_rank()}.json").write_text(json.dumps(result))
        for engine in engines.values():
            engine.destroy()
    if info.owns_group:
        import deepspeed.comm

        deepspeed.comm.destroy_process_group()


def step_time(a: argparse.Namespace) -> dict:
    """Median ``optimizer.step()`` seconds of AdamW and CAME over the same module, taken in turns."""
    from pixeldit.models import build_model, get_model_args
    from pixeldit.train.config import OptimConfig
    from pixeldit.train.engine import TrainModule
    from pixeldit.train.optim import build_optimizer

    torch.set_num_threads(a.threads)
    module = TrainModule(build_model(get_model_args(a.size)))
    params = [p for p in module.parameters() if p.requires_grad]
    gen = torch.Generator().manual_seed(0)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen) * 1e-3
    opts = {name: build_optimizer(module, OptimConfig(name=name), 1e-4) for name in ("adamw", "came")}
    times: dict[str, list[float]] = {name: [] for name in opts}
    for k in range(a.repeats + 1):  # round 0 creates the states (not timed)
        for name, opt in opts.items():
            t0 = time.perf_counter()
            opt.step()
            if k:
                times[name].append(time.perf_counter() - t0)
    med = {name: statistics.median(v) for name, v in times.items()}
    params_m = sum(p.numel() for p in params) / 1e6
    print(f"\n| size | params | threads | AdamW step (s, median of {a.repeats}) | CAME step (s) | CAME / AdamW |"
          f"\n|---|---|---|---|---|---|\n| {a.size} | {params_m:.1f}M | {a.threads} | {med['adamw']:.3f} | "
          f"{med['came']:.3f} | {med['came'] / med['adamw']:.2f} |")
    return {"size": a.size, "params": params_m, "times": times, "median": med}


def loss(a: argparse.Namespace) -> dict:
    from pixeldit.release.export import export_release
    from pixeldit.release.sample import run as sample
    from tools.bench_learning import prompts
    from launchers.quickstart import default_text_encoder
    from launchers.quickstart import main as quickstart
    from pixeldit.evaluation.synthetic_checks import colour_accuracy_of_folder

    out = Path(a.out).resolve()
    text_encoder = default_text_encoder()
    if not (out / "run.yaml").exists():
        quickstart(["--out", str(out), "--steps-per-stage", "1", "--stage2-steps", "1", "--sample-steps", "1",
                    "--text-encoder", text_encoder])
    base = yaml.safe_load((out / "run.yaml").read_text())
    results = {}
    for spec in a.runs:
        name, lr = spec.split("@")
        cfg = copy.deepcopy(base)
        stage = {**cfg["stages"][0], "steps": a.steps, "lr": float(lr), "warmup_steps": 20}
        cfg.update(run_dir=str(out / f"run_{name}_{lr}"), stages=[stage])
        cfg["optim"] = {**cfg.get("optim", {}), "name": name}
        cfg["checkpoint"] = {"every": a.steps, "keep": 1}
        cfg["logging"] = {**cfg["logging"], "wandb": "disabled", "progress_bar": False, "image_every": 0}
        path = out / f"run_{name}_{lr}.yaml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", WANDB_MODE="disabled",
                   PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(a.port), "-m", "pixeldit.train.cli", "--config", str(path)]
        t0 = time.time()
        with open(out / f"run_{name}_{lr}.log", "w") as log:
            subprocess.run(cmd, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, check=True)
        seconds = time.time() - t0
        losses = [json.loads(x)["loss"] for x in (Path(cfg["run_dir"]) / "losses.jsonl").read_text().splitlines()]
        release = export_release(cfg["run_dir"], out / f"release_{name}_{lr}", weights="ema", dtype="fp32")
        folder = out / f"samples_{name}_{lr}"
        args = ["--model", str(release), "--out", str(folder), "--steps", "20", "--cfg-scale", "3.0", "--height",
                str(stage["resolution"]), "--width", str(stage["resolution"]), "--num-per-prompt", "2", "--seed",
                "1000", "--text-encoder", text_encoder]
        for p in prompts():
            args += ["--prompt", p]
        sample(args)
        results[spec] = {"first100": sum(losses[:100]) / 100, "last100": sum(losses[-100:]) / 100,
                         "final": losses[-1], "minutes": round(seconds / 60, 1),
                         "colour_accuracy": colour_accuracy_of_folder(folder), "steps": len(losses)}
        assert all(math.isfinite(x) for x in losses), spec
    print(f"\n| optimizer @ LR | mean loss, steps 1-100 | mean loss, last 100 of {a.steps} | colour accuracy "
          f"(48 images, chance 17%) | minutes |\n|---|---|---|---|---|")
    for spec, r in results.items():
        print(f"| {spec} | {r['first100']:.4f} | {r['last100']:.4f} | {r['colour_accuracy']:.0%} | {r['minutes']} |")
    (out / "loss.json").write_text(json.dumps(results, indent=1))
    return results


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("memory")
    m.add_argument("--out", default="runs/bench_came/memory")
    m.add_argument("--ranks", type=int, default=8, help="ranks of the per-rank columns")
    m.add_argument("--port", type=int, default=29561)
    m.add_argument("--timed-steps", type=int, default=20, help="timed training steps per optimizer and ZeRO stage")
    w = sub.add_parser("zero-state")
    w.add_argument("--out", required=True)
    w.add_argument("--timed-steps", type=int, default=20)
    st = sub.add_parser("step")
    st.add_argument("--size", default="B/16")
    st.add_argument("--repeats", type=int, default=5)
    st.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    lo = sub.add_parser("loss")
    lo.add_argument("--out", default="runs/bench_came/loss")
    lo.add_argument("--steps", type=int, default=400)
    lo.add_argument("--runs", nargs="+", default=["adamw@1e-3", "came@1e-3", "came@3e-4"], help="optimizer@lr")
    lo.add_argument("--port", type=int, default=29562)
    a = ap.parse_args(argv)
    {"memory": memory, "zero-state": zero_state, "step": step_time, "loss": loss}[a.cmd](a)


if __name__ == "__main__":
    main()
