"""Build the DeepSpeed engine of one curriculum stage.

``build_engine`` does, in this order:
 1. build the PixelDiT from the size table (seeded, identical on all ranks) and, when any stage uses REPA,
    the REPA projector; wrap both in one ``TrainModule`` so DeepSpeed partitions and optimises both
    (the DINOv2 teacher and the text encoder are frozen and stay outside the engine);
 2. ``apply_compile`` (``pixeldit.train.compile``: ``compile.enabled``, on by default with CUDA): every block,
    the pixel embedding (not under ZeRO-3) and the pixel head get their class's compiled forward; under ZeRO-3
    they become DeepSpeed leaf modules (parameters gathered once at their entry, outside the graphs);
 3. ``apply_activation_checkpointing`` on the patch and PiT blocks if the stage asks for it (it wraps the
    compiled forward; the model stays a plain nn.Module: only ``forward`` attributes are replaced, state-dict
    keys are unchanged);
 4. AdamW (fused on CUDA) or CAME over the TrainModule (``pixeldit.train.optim``);
 5. ``deepspeed.initialize`` with the ZeRO JSON of ``ds_configs/`` completed from the run config
    (``build_ds_config``: micro batch, accumulation, precision, clipping are defined once, in the run config);
    CAME is then given the layout of the flat partitions ZeRO hands it (``came.bind_zero``).
A warm start (``init_state``: release weights, ``pixeldit.train.warm_start``) loads them into the model between
1 and 2 and writes their exact fp32 values into the ZeRO master partitions after 5.
A stage boundary rebuilds the engine (new micro batch / checkpointing) and loads the boundary checkpoint,
exactly like a resume, so an uninterrupted run and a resumed one follow the same code path.
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pixeldit.diffusion import REPAProjector
from pixeldit.diffusion.objective import ObjectiveConfig, compute_loss
from pixeldit.models import PixelDiT, build_model

from . import warm_start
from .activation_checkpointing import apply_activation_checkpointing
from .came import bind_zero
from .compile import CompileMonitor, CompilePlan, apply_compile, mark_zero3_leaves, resolve_compile
from .config import RunConfig
from .ds_config import build_ds_config, zero_stage
from .optim import LRSchedule, build_optimizer


class TrainModule(nn.Module):
    """PixelDiT + (optional) REPA projector; ``forward`` returns the training losses.

    forward(x0 (B, 3, H, W) in [-1, 1], cond, null_cond, objective, teacher, generator) ->
    {"loss", "flow", "repa"} scalars from ``pixeldit.diffusion.objective.compute_loss``.
    Under bf16 the model runs in torch.autocast (bf16 weights, fp32 inputs and loss).
    """

    def __init__(self, model: PixelDiT, projector: nn.Module | None = None):
        super().__init__()
        self.model = model
        self.projector = projector
        self.autocast_dtype: torch.dtype | None = None

    def forward(self, x0: torch.Tensor, cond: dict, null_cond: dict, objective: ObjectiveConfig,
                teacher: nn.Module | None = None, generator: torch.Generator | None = None) -> dict:
        use_repa = objective.repa_weight > 0 and self.projector is not None and teacher is not None
        ctx = (torch.autocast(x0.device.type, dtype=self.autocast_dtype) if self.autocast_dtype is not None
               else contextlib.nullcontext())
        with ctx:
            return compute_loss(self.model, x0, cond, objective, projector=self.projector if use_repa else None,
                                teacher=teacher if use_repa else None, null_cond=null_cond, generator=generator)


@dataclass
class EngineBundle:
    engine: Any  # deepspeed.DeepSpeedEngine
    module: TrainModule
    model: PixelDiT  # the plain model inside the engine (EMA keys, FLOPs)
    schedule: LRSchedule
    ds_config: dict[str, Any]
    zero3: bool
    device: torch.device
    compile: CompilePlan
    monitor: CompileMonitor | None  # counts graph compilations (None when not compiled)


def build_engine(cfg: RunConfig, stage_index: int, world_size: int, teacher_dim: int | None,
                 load_universal: bool = False, init_state: dict[str, torch.Tensor] | None = None,
                 monitor: CompileMonitor | None = None) -> EngineBundle:
    """Steps 1-5 of the module docstring for ``cfg.stages[stage_index]``; ``load_universal`` makes the
    engine load a DeepSpeed universal checkpoint (written for any world size) next; ``init_state`` (model
    weights in fp32) starts the model from a release; ``monitor``: the run's compile monitor (a new one if
    None)."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    stage = cfg.stages[stage_index]
    device_type = get_accelerator().device_name()  # "cuda" or "cpu"
    plan = resolve_compile(cfg, stage, device_type)
    args = cfg.model.args()
    ds_config = build_ds_config(cfg, stage, world_size)
    if load_universal:
        ds_config["checkpoint"] = {**ds_config.get("checkpoint", {}), "load_universal": True}
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank (overwritten when resuming)
    model = build_model(args)
    if init_state is not None:
        warm_start.load_into_model(model, init_state)
    projector = None
    if cfg.uses_repa:
        if teacher_dim is None:
            raise ValueError("a stage uses REPA but no teacher feature width was given")
        projector = REPAProjector(args.hidden_size, teacher_dim)
    module = TrainModule(model, projector)
    if cfg.deepspeed.precision == "bf16":
        module.autocast_dtype = torch.bfloat16
    zero3 = zero_stage(ds_config) == 3
    if plan.enabled:
        monitor = monitor or CompileMonitor(cfg.compile.recompile_budget, cfg.compile.backend)
        monitor.stage_started()
        apply_compile(model, plan, monitor, zero3)
        if zero3:
            mark_zero3_leaves(model)
    apply_activation_checkpointing(model, stage.grad_checkpointing)
    optimizer = build_optimizer(module, cfg.optim, stage.lr, device_type)
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, config=copy.deepcopy(ds_config),
                                           dist_init_required=False)
    bind_zero(optimizer, engine, module)
    if init_state is not None:
        warm_start.write_fp32_masters(engine, module, init_state)
    device = torch.device(get_accelerator().current_device_name())
    return EngineBundle(engine=engine, module=module, model=model, schedule=LRSchedule.for_stage(stage),
                        ds_config=ds_config, zero3=zero3, device=device, compile=plan,
                        monitor=monitor if plan.enabled else None)
