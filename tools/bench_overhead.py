"""DeepSpeed overhead: the trainer's engine step vs a plain single-process PyTorch loop, same model and data.

    python -m tools.bench_overhead                        # debug model, 64 px, CPU, one process
    python -m tools.bench_overhead --size debug-T2I --resolution 128 --zero zero1

Both paths run the same optimizer steps on the same micro-batches (read once from the bucketed loader
over a synthetic dataset and kept in memory, so the loader is not timed) with the same loss
(``compute_loss``) and the same AdamW settings:
- trainer: ``pixeldit.train.engine.build_engine`` (the model + DeepSpeed ZeRO engine the trainer uses;
  ``engine.backward`` / ``engine.step``, gradient clipping in the engine);
- plain: ``PixelDiT`` + ``torch.optim.AdamW`` + ``clip_grad_norm_``, nothing else.
Step times are the median over ``--steps`` after ``--warmup`` steps; the ratio is trainer / plain.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch


def batches_from_loader(data: str, resolution: int, micro_batch: int, count: int) -> list[dict]:
    from pixeldit.train.config import RunConfig, StageConfig
    from pixeldit.train.loader import build_loader

    cfg = RunConfig(stages=[StageConfig(data_path=data, resolution=resolution, buckets="fixed", micro_batch=micro_batch)])
    cfg.data.num_workers = 0
    loader = build_loader(cfg, 0, rank=0, world_size=1)
    return [loader.next() for _ in range(count)]


def conditions(args, batch: dict) -> tuple[dict, dict]:
    B = batch["x0"].shape[0]
    if args.conditioning == "class":
        return {"y": batch["label"].clamp(0, args.num_classes - 1)}, {"y": torch.full((B,), args.num_classes)}
    g = torch.Generator().manual_seed(int(batch["sample_index"].sum()))
    ctx = torch.randn(B, args.text_len, args.text_dim, generator=g)  # stand-in for cached text embeddings
    return ({"context": ctx, "context_mask": torch.ones(B, args.text_len, dtype=torch.bool)},
            {"context": torch.zeros_like(ctx), "context_mask": torch.ones(B, args.text_len, dtype=torch.bool)})


def time_steps(step_fn, batches: list[dict], warmup: int) -> list[float]:
    times = []
    for i, b in enumerate(batches):
        t0 = time.perf_counter()
        step_fn(b, i)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="", help="dataset root (default: a synthetic one in a temp dir)")
    ap.add_argument("--size", default="debug")
    ap.add_argument("--resolution", type=int, default=64)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--zero", default="zero2", choices=("zero1", "zero2", "zero3"))
    a = ap.parse_args(argv)
    import os

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from pixeldit.diffusion.objective import ObjectiveConfig, compute_loss
    from pixeldit.models import build_model
    from pixeldit.train.config import RunConfig, StageConfig
    from pixeldit.train.engine import build_engine
    from pixeldit.train.step import step_generator
    from pixeldit.train.startup import init_distributed
    from tools.bench_loader import make_dataset

    with tempfile.TemporaryDirectory(prefix="bench_overhead_") as tmp:
        data = a.data or make_dataset(Path(tmp), 200, a.resolution)
        batches = batches_from_loader(data, a.resolution, a.micro_batch, a.steps + a.warmup)
    init_distributed()
    stage = StageConfig(data_path=data, resolution=a.resolution, micro_batch=a.micro_batch, lr=1e-4)
    cfg = RunConfig(stages=[stage])
    cfg.model.size = a.size
    cfg.deepspeed.zero, cfg.deepspeed.precision = a.zero, "fp32"
    args = cfg.model.args()
    objective = ObjectiveConfig()

    bundle = build_engine(cfg, 0, world_size=1, teacher_dim=None)
    engine = bundle.engine

    def trainer_step(b: dict, i: int) -> None:
        cond, null = conditions(args, b)
        out = engine(b["x0"], cond, null, objective, None, step_generator(0, 0, i, 0, torch.device("cpu")))
        engine.backward(out["loss"])
        engine.step()

    torch.manual_seed(cfg.seed)
    model = build_model(args)
    opt = torch.optim.AdamW(model.parameters(), lr=stage.lr, betas=cfg.optim.betas, eps=cfg.optim.eps,
                            weight_decay=cfg.optim.weight_decay)

    def plain_step(b: dict, i: int) -> None:
        cond, null = conditions(args, b)
        out = compute_loss(model, b["x0"], cond, objective, null_cond=null,
                           generator=step_generator(0, 0, i, 0, torch.device("cpu")))
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        opt.step()

    plain = statistics.median(time_steps(plain_step, batches, a.warmup))
    ds = statistics.median(time_steps(trainer_step, batches, a.warmup))
    ips = a.micro_batch
    print(f"| path | median step (ms) | img/s |\n|---|---|---|\n"
          f"| plain PyTorch loop | {plain * 1e3:.1f} | {ips / plain:.1f} |\n"
          f"| trainer engine (DeepSpeed {a.zero}) | {ds * 1e3:.1f} | {ips / ds:.1f} |\n"
          f"\n{a.size} @ {a.resolution}px, micro-batch {a.micro_batch}, CPU, 1 process: trainer / plain step time = "
          f"{ds / plain:.2f}x")


if __name__ == "__main__":
    main()
