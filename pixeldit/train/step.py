"""One optimizer step (``train_step``) with no host synchronisation of its own.

The skip contract: a non-finite loss, flow or REPA term in any micro-batch on any rank skips the whole step on
every rank: no update, counted, the same data stream (every micro-batch is still drawn). A step counts as
applied only if DeepSpeed applied the update (``engine.was_step_applied()``): a non-finite gradient norm that
DeepSpeed's check catches is a skipped step too, and the EMA is only updated after an applied step.

How, with DeepSpeed's one synchronisation per step and none of ours:
 1. every micro-batch: forward; its (loss, flow, repa) and a non-finite flag are added to a small device tensor;
    backward. Every rank runs every backward, also after a non-finite loss: ZeRO reduces gradients inside
    backward (collectives), so no rank may leave one out; the rest of a skipped step is wasted compute, which is
    rare, instead of a host round trip per micro-batch, which is every step;
 2. between the last forward and its backward: ONE all-reduce of [non-finite count, loss, flow, repa, stop] on
    the device (NCCL orders it on the stream; the host does not wait), copied at once to pinned host memory
    behind an event; the last loss is multiplied by ``gate`` = 1 if the count is 0 else NaN, computed on the
    device. A skipped step back-propagates NaN, so every rank holds non-finite gradients (NaN * 0 is NaN);
    an applied step back-propagates loss * 1.0, bit-identical to the loss;
 3. ``engine.step()``: DeepSpeed's ZeRO-1/2 and ZeRO-3 optimizers and its bf16 optimizer all check the gradients
    before updating (an all-reduce of an overflow flag or of the gradient norm, then ``.item()`` / ``bool``: the
    host synchronisation of the step, DeepSpeed's own) and skip the update and clear the accumulated gradients
    when they are not finite;
 4. after ``engine.step()`` the stats copy of step 2 (enqueued before the last backward) is complete: reading it
    does not wait. The gradient norm (a device tensor) is copied behind an event too and read when the step's
    record is written, one step later (``StepOutcome.grad_norm``).
If the stats say non-finite but DeepSpeed applied the step, its check is switched off in the ZeRO JSON:
``StepError`` names the key.
The step it replaces synchronised once per micro-batch (the finiteness all-reduce and ``.item()``) plus three
times per step (the stop flag, the gradient norm, the host loss reduction), read from its code; the count on a
GPU is ``python -m tools.bench_train --count-syncs`` (in ``tools.bench_gpu``; not measured yet, no device).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from .metrics import StepPhases
from .prefetch import DevicePrefetcher

# why a step was skipped (losses.jsonl "skip_reason"); see skip_reason
SKIP_NONFINITE_LOSS = "nonfinite_loss"  # a micro-batch loss was NaN/inf on some rank: no update
SKIP_NONFINITE_GRAD = "nonfinite_grad"  # the global gradient norm was NaN/inf: DeepSpeed skipped the update
SKIP_NOT_APPLIED = "not_applied"  # DeepSpeed reported the update as not applied (its overflow check)


class NonFiniteLossError(RuntimeError):
    """Too many skipped steps (non-finite loss or gradient) in a row; the run stops and keeps its last good
    checkpoint."""


def skip_reason(loss_finite: bool, applied: bool, grad_norm: float | None) -> str | None:
    """Why a step counts as skipped, or None when the optimizer applied it (the skip contract).

    ``loss_finite``: every micro-batch loss of the step was finite on every rank (else there was no optimizer
    step, or one that dropped the gradients); ``applied``: ``engine.was_step_applied()`` after ``engine.step()``;
    ``grad_norm``: ``engine.get_global_grad_norm()`` (None when DeepSpeed does not compute it).
    A skipped step leaves the weights and the EMA unchanged and joins the non-finite streak. An update that
    WAS applied with a non-finite gradient norm would have written NaN/inf into the weights: that is a
    configuration error (DeepSpeed's overflow check is off), raised as RuntimeError.
    """
    if not loss_finite:
        return SKIP_NONFINITE_LOSS
    norm_finite = grad_norm is None or math.isfinite(grad_norm)
    if applied and not norm_finite:
        raise RuntimeError(f"DeepSpeed applied an update with gradient norm {grad_norm}: the weights are no longer "
                           f"finite; remove 'check_grad_overflow: false' from the ZeRO JSON")
    if not norm_finite:
        return SKIP_NONFINITE_GRAD
    return None if applied else SKIP_NOT_APPLIED


# the slots of the per-step stats vector (one all-reduce)
NONFINITE, LOSS, FLOW, REPA, STOP = range(5)


class StepError(RuntimeError):
    """DeepSpeed applied an update the step had to skip."""


def step_generator(seed: int, rank: int, step: int, micro: int, device: torch.device) -> torch.Generator:
    """The noise/timestep generator of one micro-batch: depends on (seed, rank, step, micro) only."""
    value = int(np.random.SeedSequence([seed, rank, step, micro]).generate_state(1, dtype=np.uint64)[0])
    return torch.Generator(device=device).manual_seed(value & ((1 << 63) - 1))


class _HostCopy:
    """A device tensor copied to pinned host memory without waiting; ``value()`` waits for that copy only."""

    def __init__(self, tensor: torch.Tensor):
        if tensor.device.type == "cuda":
            self.host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            self.host.copy_(tensor, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.host, self.event = tensor.detach().clone(), None

    def value(self) -> torch.Tensor:
        if self.event is not None:
            self.event.synchronize()
        return self.host


@dataclass
class StepOutcome:
    applied: bool  # DeepSpeed applied the update
    nonfinite: bool  # a loss term of some micro-batch on some rank was not finite
    stop: bool  # some rank asked to stop: the run stops after this step
    loss: float  # rank- and micro-batch-averaged; NaN when some loss term was non-finite
    flow: float
    repa: float
    sizes: list[tuple[int, int]]  # (H, W) of each micro-batch
    buckets: list[str]
    phases: StepPhases
    skipped_grad_norm: float | None = None  # the gradient norm of an update DeepSpeed did not apply (read at once)
    _grad_norm: Any = field(default=None, repr=False)  # an applied step's norm: _HostCopy, float or None

    def grad_norm(self) -> float | None:
        """The gradient norm DeepSpeed computed (None when skipped); waits for its copy, so read it late."""
        if not self.applied or self._grad_norm is None:
            return None
        if isinstance(self._grad_norm, _HostCopy):
            return float(self._grad_norm.value())
        return float(self._grad_norm)


def train_step(engine, batches: DevicePrefetcher, objective, teacher, *, device: torch.device, seed: int, rank: int,
               step: int, stop: bool, phases: StepPhases) -> StepOutcome:
    """One optimizer step over ``engine.gradient_accumulation_steps()`` micro-batches (module docstring);
    ``stop``: this rank asks to stop after the step (agreed through the step's all-reduce)."""
    accum = engine.gradient_accumulation_steps()
    local = torch.zeros(5, dtype=torch.float64, device=device)
    sizes, buckets = [], []
    host_stats = None
    for micro in range(accum):
        item = batches.next()
        sizes.append(item.size)
        buckets.append(item.bucket)
        last = micro == accum - 1
        engine.set_gradient_accumulation_boundary(last)
        with phases.phase("forward"):
            out = engine(item.x0, item.cond, item.null_cond, objective, teacher,
                         step_generator(seed, rank, step, micro, device))
            terms = torch.stack([out["loss"].detach(), out["flow"], out["repa"]]).double()
            local[NONFINITE] += (~torch.isfinite(terms)).any()
            local[LOSS:STOP] += terms
            loss = out["loss"]
            if last:
                if stop:
                    local[STOP] = 1.0
                phases.mark_sync()  # this rank's own part of the step ends here (pixeldit.train.stragglers)
                if dist.is_initialized():
                    dist.all_reduce(local)
                host_stats = _HostCopy(local)
                gate = torch.where(local[NONFINITE] > 0, float("nan"), 1.0).to(loss.dtype)
                loss = loss * gate
        with phases.phase("backward"):
            engine.backward(loss)
        del out, loss
        if not last:
            batches.preload()
    with phases.phase("optimizer"):
        engine.step()
    applied = bool(engine.was_step_applied())
    stats = host_stats.value()  # complete: enqueued before the last backward, which DeepSpeed waited for
    nonfinite, stop_agreed = bool(stats[NONFINITE] > 0), bool(stats[STOP] > 0)
    if nonfinite and applied:
        raise StepError(f"step {step}: a loss was non-finite but DeepSpeed applied the optimizer step (its "
                        f"gradient check is off); remove 'check_grad_overflow: false' from the bf16 section and "
                        f"'compute_grad_norm: false' from zero_optimization in the ZeRO JSON")
    if not stop_agreed:
        batches.preload()  # the next step's first micro-batch, while the optimizer kernels run
    count = (dist.get_world_size() if dist.is_initialized() else 1) * accum
    loss, flow, repa = (float("nan") if nonfinite else float(stats[i]) / count for i in (LOSS, FLOW, REPA))
    norm = engine.get_global_grad_norm()
    if not applied:  # rare: reading the norm now (a host synchronisation) tells a non-finite gradient apart
        skipped_norm = None if norm is None else float(norm)
        return StepOutcome(applied, nonfinite, stop_agreed, loss, flow, repa, sizes, buckets, phases, skipped_norm)
    if isinstance(norm, torch.Tensor):
        norm = _HostCopy(norm.detach().reshape(()))
    return StepOutcome(applied, nonfinite, stop_agreed, loss, flow, repa, sizes, buckets, phases, None, norm)


def agree(flag: bool, device: torch.device) -> bool:
    """True on every rank if any rank's flag is true (a host synchronisation: for outside the steps)."""
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)
