"""Worker of tests/test_came_zero.py, run under torchrun on CPU ranks (gloo): CAME inside the trainer's own
``build_engine`` under ZeRO-1, ZeRO-2 and ZeRO-3, two optimizer steps on identical batches on every rank (so the
averaged gradient equals the single-process one), fp32 throughout. The model starts from random weights through
the warm-start path (``init_state``), so that every matrix gets a gradient at once (a fresh PixelDiT zero-
initialises its gates and head, which keeps most gradients at zero for the first steps).

Writes ``{out}/{zero}_rank{r}.pt``: this rank's factored parameter names, its pieces ({name: [param_start,
numel, factored]}), the element-wise second-moment length, and (rank 0) the full fp32 master weights gathered
after the steps plus those of two single-process references: CAME stepped with the gradients the engine
computed (gathered before each step: the optimizer alone), and a plain module trained on the same batches and
noise (autograd included; ZeRO-3's own linear backward rounds its gradients differently).
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch


def batches(seed: int, step: int, args) -> tuple[torch.Tensor, dict, dict]:
    g = torch.Generator().manual_seed(seed * 100 + step)
    x0 = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1  # (2, 3, 32, 32)
    y = torch.randint(0, args.num_classes, (2,), generator=g)
    return x0, {"y": y}, {"y": torch.full((2,), args.num_classes)}


def args_of(cfg):
    return cfg.model.args()


def run(zero: str, out: Path) -> None:
    import torch.distributed as dist
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_grad

    from pixeldit.diffusion.objective import ObjectiveConfig, compute_loss
    from pixeldit.train.came import CAME
    from pixeldit.train.config import RunConfig, StageConfig
    from pixeldit.train.engine import TrainModule, build_engine
    from pixeldit.train.optim import build_optimizer

    cfg = RunConfig(stages=[StageConfig(name="s", data_path="/unused", resolution=32, bucket_align=16, micro_batch=2,
                                        lr=3e-3)])
    cfg.optim.name, cfg.optim.grad_clip, cfg.optim.weight_decay = "came", 0.0, 0.01
    cfg.deepspeed.zero, cfg.deepspeed.precision = zero, "fp32"
    objective = ObjectiveConfig(shift=1.0, repa_weight=0.0, cond_drop_prob=0.25)
    rank = dist.get_rank()
    from pixeldit.models import build_model

    g = torch.Generator().manual_seed(5)
    init = {k: torch.randn(v.shape, generator=g) * 0.05 for k, v in build_model(args_of(cfg), device="meta").state_dict().items()}
    bundle = build_engine(cfg, 0, dist.get_world_size(), None, init_state=init)
    engine, module, args = bundle.engine, bundle.module, cfg.model.args()
    came = engine.optimizer.optimizer
    assert isinstance(came, CAME), type(came)
    grads = []
    for step in range(2):
        x0, cond, null = batches(1, step, args)
        out_ = engine(x0, cond, null, objective, None, torch.Generator().manual_seed(7 + step))
        engine.backward(out_["loss"])
        grads.append({n: safe_get_full_grad(p).detach().clone() for n, p in module.named_parameters()})
        engine.step()
    full = {n: safe_get_full_fp32_param(p).detach().clone() for n, p in module.named_parameters()}
    pieces = {}
    vec = 0
    for part in came.partitions():
        for s in part.segments:
            pieces.setdefault(s.name, []).append([s.param_start, s.numel, len(s.shape) == 2])
        vec += came.state[part.tensor]["exp_avg_sq"].numel()
    result = {"factored": sorted(came.factored_names()), "pieces": pieces, "exp_avg_sq": vec,
              "shapes": {n: tuple(p.ds_shape if hasattr(p, "ds_shape") else p.shape)
                         for n, p in module.named_parameters()}}
    if rank == 0:
        ref = TrainModule(build_model(args))
        ref.model.load_state_dict(init)
        result["initial_weights"] = {n: p.detach().clone() for n, p in ref.named_parameters()}
        opt = build_optimizer(ref, cfg.optim, cfg.stages[0].lr)
        for step in range(2):
            x0, cond, null = batches(1, step, args)
            loss = compute_loss(ref.model, x0, cond, objective, null_cond=null,
                                generator=torch.Generator().manual_seed(7 + step))["loss"]
            opt.zero_grad()
            loss.backward()
            opt.step()
        result["zero_weights"] = full
        result["autograd_reference_weights"] = {n: p.detach().clone() for n, p in ref.named_parameters()}
        same = TrainModule(build_model(args))
        same.model.load_state_dict(init)
        opt = build_optimizer(same, cfg.optim, cfg.stages[0].lr)
        for step_grads in grads:
            for n, p in same.named_parameters():
                p.grad = step_grads[n].clone()
            opt.step()
        result["reference_weights"] = {n: p.detach().clone() for n, p in same.named_parameters()}
    torch.save(result, out / f"{zero}_rank{rank}.pt")
    engine.destroy()


def main() -> None:
    from pixeldit.train.startup import init_distributed

    out = Path(sys.argv[1])
    info = init_distributed()
    for zero in sys.argv[2:]:
        run(zero, out)
    if info.owns_group:
        import deepspeed.comm

        deepspeed.comm.destroy_process_group()


if __name__ == "__main__":
    main()
