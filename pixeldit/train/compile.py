"""torch.compile of the PixelDiT blocks, applied from outside (the model stays plain PyTorch).

``build_engine`` applies, in this order: ``apply_compile`` (each compiled unit's forward becomes its class's
compiled forward) -> ``apply_activation_checkpointing`` (wraps that compiled forward) -> ``deepspeed.initialize``.

What is compiled (``compile_units``): every patch block (DiT or MM-DiT), every PiT block, the pixel embedding
(not under ZeRO-3: ``NOT_UNDER_ZERO3``) and the pixel head: the pixel pathway's many memory-bound element-wise
kernels on (B*L, p*p, D_pix) tensors (per-pixel AdaLN, RMSNorm, the pixel MLP) are what compilation fuses. The rest (timestep / label / text
embeddings, RoPE tables, the loss with its generator draws) stays eager: it is a few small kernels per step.

Why per block, before DeepSpeed wraps the model, and not DeepSpeed's ``engine.compile()`` (measured: ``python -m
tools.bench_compile --backend aot_eager --strategy {blocks,deepspeed} --zero {zero2,zero3} --case debug@32:bs=2
debug@32:bs=2:ckpt``, table in tools/BENCHMARKS.md; CPU, so without inductor's code generation):
 - under ZeRO-3, ``engine.compile()`` (``module.compile()`` of the whole ``TrainModule``) breaks the graph at every
   sub-module's parameter-gathering hook (a ``torch.compiler.disable`` call): 46 graphs for the 2-block debug
   model (more with depth), 3.4x the eager step's wall time (2.0x its CPU time) and a 389 s first step. Per
   block, one graph per unit class serves all its instances (dynamo inlines ``nn.Module``s: the 26 XL/16 blocks
   share one graph, compile time is that of one block per class), ``fullgraph`` (no break), and the compiled
   units are DeepSpeed "leaf modules" (``mark_zero3_leaves``): one hook gathers a unit's parameters at its
   entry, outside the graph (3 graphs: the pixel embedding stays eager under ZeRO-3; 0 recompiles, a 70 s
   first step, 0.97x the eager step's CPU time);
 - under ZeRO-2 both work (``engine.compile()``: 2 graphs, i.e. one graph break, its cause not traced;
   per block: 4), with and without activation checkpointing, and their CPU step times are within the
   machine's noise (aot_eager fuses nothing; the GPU/inductor comparison is not measured): one strategy for
   every ZeRO stage is the simpler contract;
 - activation checkpointing wraps the compiled forward (the recomputation runs the compiled kernels too).
Each class's ``forward`` is compiled, not the instance's (checkpointed) wrapper: dynamo keeps compiled code per
Python code object with at most ``recompile_limit`` (8) variants, and one wrapper code object shared by every
block class would exhaust that and silently fall back to eager (seen with 7 blocks of 2 classes).

Shapes: aspect-bucket stages give dozens of (H, W); ``dynamic`` makes H/W (the patch count L) symbolic so one
graph per class serves every bucket (``CompilePlan.dynamic``: by default in aspect stages; fixed stages compile
static shapes). ``CompileMonitor`` counts graph compilations; compilations after the first step of a stage are
recompiles, logged with every step and warned about past ``compile.recompile_budget``.
"""
from __future__ import annotations

import types
from dataclasses import dataclass

import torch
from torch import nn

from .config import RunConfig, StageConfig

_EAGER = "_pixeldit_eager_forward"
UNIT_CONTAINERS = ("patch_blocks", "pixel_blocks")  # ModuleLists of blocks
UNIT_MODULES = ("pixel_embed", "head")  # single modules on per-pixel tensors
# stays eager under ZeRO-3: as a ZeRO-3 leaf module (what a compiled unit must be there) the pixel embedding,
# whose input (the noisy image) needs no gradient, fails the first backward: its weight's (D_pix, 3) gradient meets
# the released (size 0) partition (measured on CPU with the eager and aot_eager backends, tools/BENCHMARKS.md)
NOT_UNDER_ZERO3 = ("pixel_embed",)


@dataclass(frozen=True)
class CompilePlan:
    enabled: bool
    dynamic: bool  # symbolic shapes (H, W, hence L) from the first compilation on


def resolve_compile(cfg: RunConfig, stage: StageConfig, device_type: str) -> CompilePlan:
    """The run config's ``compile`` section for one stage on this device type (defaults: see config.py)."""
    c = cfg.compile
    enabled = (device_type == "cuda") if c.enabled is None else c.enabled
    dynamic = (stage.buckets == "aspect") if c.dynamic is None else c.dynamic
    return CompilePlan(enabled, dynamic)


def compile_units(model: nn.Module, zero3: bool = False) -> list[nn.Module]:
    """The modules compiled one by one: every block, the pixel embedding (not under ZeRO-3: ``NOT_UNDER_ZERO3``)
    and the pixel head."""
    units: list[nn.Module] = []
    for name in UNIT_CONTAINERS:
        units.extend(getattr(model, name, []))
    names = [n for n in UNIT_MODULES if not (zero3 and n in NOT_UNDER_ZERO3)]
    units.extend(getattr(model, name) for name in names if hasattr(model, name))
    if not units:
        raise ValueError(f"{type(model).__name__} has none of {UNIT_CONTAINERS + UNIT_MODULES} to compile")
    return units


class CompileMonitor:
    """Counts dynamo graph compilations (its ``backend`` wraps ``compiler``, the run config's
    ``compile.backend``) and tells recompiles apart.

    ``stage_started`` at each engine build; ``first_step_done`` after a stage's first step (what compiled up to
    then is the stage's warm-up); ``recompiles`` = compilations since. ``over_budget`` returns a warning once
    when the recompiles of the stage pass ``budget``.
    """

    def __init__(self, budget: int, compiler: str = "inductor"):
        self.budget = budget
        self.compiler = compiler  # the dynamo backend that compiles each graph (config.CompileBackend)
        self.total = 0  # graphs compiled by this process
        self._stage_start = self._warm = 0
        self._warned = False
        self._compile_graph = None  # looked up at the first compilation (importing inductor takes seconds)

    def backend(self, gm: torch.fx.GraphModule, example_inputs):
        self.total += 1
        if self._compile_graph is None:
            from torch._dynamo import lookup_backend

            self._compile_graph = lookup_backend(self.compiler)
        return self._compile_graph(gm, example_inputs)

    def stage_started(self) -> None:
        self._stage_start = self._warm = self.total
        self._warned = False

    def first_step_done(self) -> None:
        self._warm = self.total

    @property
    def stage_graphs(self) -> int:
        return self.total - self._stage_start

    @property
    def recompiles(self) -> int:
        return self.total - self._warm

    def over_budget(self, stage_name: str) -> str | None:
        if self._warned or self.recompiles <= self.budget:
            return None
        self._warned = True
        return (f"WARNING: stage {stage_name}: {self.recompiles} graph recompilations after the first step "
                f"(compile.recompile_budget={self.budget}); input shapes keep changing (a new bucket each "
                f"time?): set compile.dynamic=true for this stage, or compile.enabled=false")


def apply_compile(model: nn.Module, plan: CompilePlan, monitor: CompileMonitor, zero3: bool = False) -> int:
    """Replace the forward of every compiled unit by its class's compiled forward; returns how many units.

    One ``torch.compile`` per unit class, shared by its instances. Clears dynamo's caches first, so a stage
    compiles afresh (inductor's on-disk cache makes an identical graph cheap). Apply before activation
    checkpointing and before ``deepspeed.initialize``.
    """
    if not plan.enabled:
        return 0
    torch._dynamo.reset()
    if plan.dynamic:  # a square bucket would otherwise tie H and W (H == W guard): a recompile per non-square one
        import torch.fx.experimental._config as fx_config

        fx_config.use_duck_shape = False
    compiled: dict[type, object] = {}
    units = compile_units(model, zero3)
    for unit in units:
        cls = type(unit)
        if cls not in compiled:
            compiled[cls] = torch.compile(cls.forward, backend=monitor.backend, dynamic=plan.dynamic,
                                          fullgraph=True)
        setattr(unit, _EAGER, unit.forward)
        unit.forward = types.MethodType(compiled[cls], unit)
    return len(units)


def compiled_units(model: nn.Module) -> list[nn.Module]:
    """The units ``apply_compile`` compiled (their eager forward kept as ``_pixeldit_eager_forward``)."""
    return [u for u in compile_units(model) if hasattr(u, _EAGER)]


def mark_zero3_leaves(model: nn.Module) -> None:
    """Make every compiled unit a ZeRO-3 leaf module: DeepSpeed then gathers a unit's parameters with one hook
    at the unit's entry, outside the compiled graph, instead of a hook per sub-module inside it. Call before
    ``deepspeed.initialize``."""
    from deepspeed.utils import set_z3_leaf_modules

    set_z3_leaf_modules(model, sorted({type(u) for u in compile_units(model, zero3=True)}, key=lambda c: c.__name__))
