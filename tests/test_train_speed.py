"""Issue 13, cheap and in process: the compile switch's defaults, the recompile warning, one graph per block
class across the aspect buckets (dynamo capture with its "eager" backend: inductor's code generation costs
minutes of CPU for the debug model, see tools/BENCHMARKS.md), the device prefetcher's data-stream contract, the
step-time breakdown, the fused-optimizer switch, and activation checkpointing over a replaced (compiled) forward.
"""
from __future__ import annotations

import copy
import types

import pytest
import torch

from pixeldit.errors import ConfigError
from pixeldit.models import build_model, get_model_args
from pixeldit.train.activation_checkpointing import apply_activation_checkpointing
from pixeldit.train.compile import CompileMonitor, CompilePlan, apply_compile, resolve_compile
from pixeldit.train.config import RunConfig, StageConfig, validate
from pixeldit.train.metrics import StepPhases, breakdown_ms
from pixeldit.train.optim import build_optimizer
from pixeldit.train.prefetch import DevicePrefetcher


def test_compile_defaults_per_device_and_bucket_mode():
    cfg = RunConfig(stages=[StageConfig(name="f", data_path="d", buckets="fixed"),
                                 StageConfig(name="a", data_path="d", buckets="aspect")])
    fixed, aspect = cfg.stages
    assert resolve_compile(cfg, fixed, "cpu").enabled is False  # compiling costs minutes on a CPU
    assert resolve_compile(cfg, fixed, "cuda").enabled is True
    assert resolve_compile(cfg, fixed, "cuda").dynamic is False
    assert resolve_compile(cfg, aspect, "cuda").dynamic is True  # one graph for every bucket
    cfg.compile.enabled, cfg.compile.dynamic = True, False
    assert resolve_compile(cfg, aspect, "cpu") == resolve_compile(cfg, fixed, "cpu")
    cfg.compile.recompile_budget = -1
    with pytest.raises(ConfigError, match=r"^compile.recompile_budget=-1 must be >= 0"):
        validate(cfg)


def test_recompiles_count_after_the_first_step_and_warn_once_past_the_budget():
    monitor = CompileMonitor(budget=2)
    monitor.total = 4  # what dynamo handed the backend while building the stage's graphs
    monitor.stage_started()
    monitor.total += 3  # the first step's compilations: warm-up, not recompiles
    monitor.first_step_done()
    assert (monitor.stage_graphs, monitor.recompiles) == (3, 0)
    monitor.total += 2
    assert monitor.recompiles == 2 and monitor.over_budget("b") is None  # at the budget: fine
    monitor.total += 1
    warning = monitor.over_budget("b")
    assert warning.startswith("WARNING: stage b: 3 graph recompilations") and "compile.dynamic=true" in warning
    monitor.total += 5
    assert monitor.over_budget("b") is None  # once per stage
    monitor.stage_started()  # the next stage counts afresh
    assert monitor.stage_graphs == monitor.recompiles == 0


def test_one_graph_per_block_class_serves_every_aspect_bucket():
    """Dynamic H/W: the graphs captured at the first bucket serve the others (no recompile), with activation
    checkpointing around the compiled forwards as build_engine applies them; same loss and gradients as eager."""
    torch.manual_seed(0)
    model = build_model(get_model_args("debug"))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)  # out of the zero init, so every gradient is non-trivial
    eager = copy.deepcopy(model)
    monitor = CompileMonitor(budget=0, compiler="eager")
    assert apply_compile(model, CompilePlan(enabled=True, dynamic=True), monitor) == 5  # 2 + 1 blocks, embed, head
    apply_activation_checkpointing(model, True)
    for i, (h, w) in enumerate([(32, 32), (32, 64), (64, 32), (48, 32)]):  # buckets of >= 2 patches a side
        x, t, y = torch.randn(2, 3, h, w), torch.rand(2), torch.tensor([1, 7])
        losses = []
        for m in (model, eager):
            m.zero_grad()
            loss = m(x, t, y=y).square().mean()
            loss.backward()
            losses.append(loss.detach())
        assert torch.allclose(losses[0], losses[1], rtol=1e-6, atol=0), (h, w)
        for (name, a), b in zip(model.named_parameters(), eager.parameters()):
            assert torch.allclose(a.grad, b.grad, rtol=1e-5, atol=1e-8), (h, w, name)
        if i == 0:
            monitor.first_step_done()  # a bucket stage's graphs: one per unit class (+1 PatchBlock re-capture)
            assert monitor.total <= 5
    assert monitor.recompiles == 0 and monitor.over_budget("aspect") is None


class CountingLoader:
    """A loader stand-in whose state is the number of batches drawn."""

    def __init__(self):
        self.drawn = 0

    def next(self) -> dict:
        self.drawn += 1
        return {"x0": torch.full((1, 3, 2, 2), float(self.drawn)), "bucket": "2x2"}

    def state_dict(self) -> dict:
        return {"drawn": self.drawn}

    def load_state_dict(self, state: dict) -> None:
        self.drawn = state["drawn"]

    def close(self) -> None:
        pass


def test_prefetcher_checkpoints_the_stream_after_the_batch_handed_out_and_never_overdraws():
    loader = CountingLoader()
    batches = DevicePrefetcher(loader, torch.device("cpu"), lambda b: ({"y": b["x0"][:, 0, 0, 0]}, {}), remaining=3)
    first = batches.next()
    assert first.x0[0, 0, 0, 0] == 1 and first.cond["y"].tolist() == [1.0] and first.size == (2, 2)
    batches.preload()  # the next micro-batch is prepared while this one computes...
    assert loader.drawn == 2
    assert batches.state_dict() == {"drawn": 1}  # ...but a checkpoint now resumes right after the one handed out
    batches.preload()  # one ready: nothing more is drawn
    assert loader.drawn == 2 and batches.next().x0[0, 0, 0, 0] == 2
    assert batches.next().x0[0, 0, 0, 0] == 3 and batches.state_dict() == {"drawn": 3}
    batches.preload()  # the stage's micro-batches are all drawn: no batch is drawn that is not trained
    assert loader.drawn == 3
    with pytest.raises(RuntimeError, match="remaining=0"):
        batches.next()


def test_step_phases_and_progress_bar_breakdown():
    phases = StepPhases(torch.device("cpu"))
    with phases.phase("forward"):
        sum(range(10000))
    phases.add("data", 0.25)
    phases.add("checkpoint", 1.5)
    seconds = phases.seconds()
    assert sorted(seconds) == sorted(f"time_{p}_s" for p in StepPhases.PHASES)
    assert seconds["time_forward_s"] > 0 and seconds["time_backward_s"] == 0
    assert breakdown_ms({**seconds, "time_forward_s": 0.012}) == "250/12/0/0/1500"


def test_fused_adamw_where_the_device_has_one():
    model = torch.nn.Linear(4, 4)
    cfg = RunConfig().optim
    assert not build_optimizer(model, cfg, 1e-3, "cpu").defaults["fused"]  # foreach kernels on the CPU
    assert build_optimizer(model, cfg, 1e-3, "cuda").defaults["fused"]
    cfg.fused = True
    assert build_optimizer(model, cfg, 1e-3, "cpu").defaults["fused"]  # torch has a CPU kernel too


def test_checkpointing_off_restores_a_replaced_forward():
    """apply_compile replaces block forwards before checkpointing wraps them; turning checkpointing off (a stage
    without it) must give the replaced (compiled) forward back, not the class's eager one."""
    model = build_model(get_model_args("debug"))
    block = model.patch_blocks[0]
    calls = []

    def replaced(self, *args, **kwargs):
        calls.append(1)
        return type(self).forward(self, *args, **kwargs)

    block.forward = types.MethodType(replaced, block)
    apply_activation_checkpointing(model, True)
    x, t, y = torch.randn(1, 3, 32, 32), torch.rand(1), torch.tensor([1])
    model(x, t, y=y).square().mean().backward()
    assert calls  # the checkpoint wrapper runs the replaced forward
    apply_activation_checkpointing(model, False)
    assert block.forward.__func__ is replaced
    assert "forward" not in vars(model.patch_blocks[1])  # never replaced: back to the class's forward
