"""CAME (Luo et al., ACL 2023, arXiv 2307.02047) that keeps its factored second moments under every ZeRO stage.

One step on a weight matrix G (m, n) of gradients, t = step (no bias correction), all in fp32:

    r = b2 r + (1 - b2) mean_j(G^2 + eps1)        c = b2 c + (1 - b2) mean_i(G^2 + eps1)        (row, column)
    U = G / sqrt(V),  V_ij = r_i c_j / mean(r)                      (factored second moment: m + n numbers)
    U = U / max(1, RMS(U) / clip_threshold)                          (update clipping, over the whole matrix)
    M = b1 M + (1 - b1) U                                            (first moment: m x n numbers)
    R = b3 R + (1 - b3) mean_j((U - M)^2 + eps2)    C likewise        (instability of the update, factored)
    W = W - lr (wd W + M / sqrt(S)),  S_ij = R_i C_j / mean(R)        (confidence-guided step)

A vector (bias, norm scale) keeps an element-wise v = b2 v + (1 - b2)(g^2 + eps1), U = g / sqrt(v), the same
clipping and M, and steps by M (no instability term). A matrix therefore costs m n + 2 (m + n) numbers of state
against AdamW's 2 m n. Parameters of 3 or more dimensions are refused (the model has none; reshape them).

Under ZeRO the optimizer does not see matrices but flat fp32 partitions in which a matrix may be cut anywhere
(``pixeldit.train.zero_partitions``); a Sana-style CAME that looks at ``p.dim()`` then silently runs the
unfactored rule on everything. Here every flat tensor the optimizer steps on has a layout (which rows and
columns of which matrix it holds). Each rank sums its pieces' contributions into per-row and per-column
partial sums, one all-reduce over the data-parallel group completes them (three small all-reduces per step:
the G^2 statistics, the per-parameter sums of U^2 for the clipping RMS, the (U - M)^2 statistics; m + n or 1
numbers per parameter, never the gradients), and every rank keeps the full r, c, R, C of each matrix it holds a
piece of. So a step under ZeRO-1/2/3 equals the single-process step up to float summation order. A flat
tensor without a layout is refused (``bind_zero`` after ``deepspeed.initialize``), never treated as a vector.

    opt = CAME(model.parameters(), lr=1e-4)                      # plain PyTorch: each parameter is its own layout
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds)
    bind_zero(opt, engine, model)                                # ZeRO: flat partitions -> matrices
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
import torch.distributed as dist
from torch import nn

from .zero_partitions import FlatPartition, Segment, zero_partitions

DEFAULT_BETAS = (0.9, 0.999, 0.9999)
DEFAULT_EPS = (1e-30, 1e-16)


def is_factored(shape: tuple[int, ...]) -> bool:
    """Whether CAME keeps row/column statistics for a parameter of this shape (2-D: yes, 0/1-D: no)."""
    if len(shape) > 2:
        raise ValueError(f"CAME factors 2-D weights; a parameter of shape {shape} has {len(shape)} dimensions "
                         f"(reshape it into a matrix, e.g. a conv kernel into (out, in * kh * kw))")
    return len(shape) == 2


def row_col_sums_(x: torch.Tensor, start: int, n: int, rows: torch.Tensor, cols: torch.Tensor) -> None:
    """Add the row and column sums of a run ``x`` (L,) of a row-major (m, n) matrix starting at element
    ``start`` into ``rows`` (m,) and ``cols`` (n,): a partial first row, whole rows, a partial last row."""
    length, pos = x.numel(), 0
    r, c = divmod(start, n)
    if c:
        k = min(n - c, length)
        rows[r] += x[:k].sum()
        cols[c:c + k] += x[:k]
        pos, r = k, r + 1
    full = (length - pos) // n
    if full:
        block = x[pos:pos + full * n].view(full, n)  # (full, n)
        rows[r:r + full] += block.sum(dim=1)
        cols += block.sum(dim=0)
        pos, r = pos + full * n, r + full
    if pos < length:
        rows[r] += x[pos:].sum()
        cols[:length - pos] += x[pos:]


def scale_by_outer_(x: torch.Tensor, start: int, rf: torch.Tensor, cf: torch.Tensor) -> None:
    """``x[e] *= rf[i] * cf[j]`` in place for the run ``x`` (L,) of a row-major (len(rf), len(cf)) matrix that
    starts at element ``start`` (e -> (i, j))."""
    n, length, pos = cf.numel(), x.numel(), 0
    r, c = divmod(start, n)
    if c:
        k = min(n - c, length)
        x[:k].mul_(rf[r] * cf[c:c + k])
        pos, r = k, r + 1
    full = (length - pos) // n
    if full:
        x[pos:pos + full * n].view(full, n).mul_(torch.outer(rf[r:r + full], cf))  # (full, n)
        pos, r = pos + full * n, r + full
    if pos < length:
        x[pos:].mul_(rf[r] * cf[:length - pos])


@dataclass
class _Layout:
    """A ``FlatPartition`` with the offsets of its statistics, fixed for the life of the optimizer."""

    part: FlatPartition
    comm: Callable[[torch.Tensor], None] | None  # in-place sum over the ranks sharing the partition; None: alone
    stats_at: dict[str, int] = field(default_factory=dict)  # factored param -> offset of [rows | cols] in a buffer
    stats_size: int = 0
    rms_at: dict[str, int] = field(default_factory=dict)  # param -> slot in the clipping buffer
    state_at: dict[str, Any] = field(default_factory=dict)  # local piece -> offset in exp_avg_sq, or (row, col)
    sizes: dict[str, int] = field(default_factory=dict)  # state vector lengths: vec, row, col
    _numels: torch.Tensor | None = None

    def __post_init__(self) -> None:
        for k, (name, shape) in enumerate(self.part.params):
            self.rms_at[name] = k
            if is_factored(shape):
                self.stats_at[name] = self.stats_size
                self.stats_size += shape[0] + shape[1]
        vec = row = col = 0
        for s in self.part.segments:
            if is_factored(s.shape):
                self.state_at[s.name] = (row, col)
                row, col = row + s.shape[0], col + s.shape[1]
            else:
                self.state_at[s.name] = vec
                vec += s.numel
        self.sizes = {"vec": vec, "row": row, "col": col}

    def numels(self, device: torch.device) -> torch.Tensor:
        """Element counts of ``part.params`` (fp32, on ``device``)."""
        if self._numels is None or self._numels.device != device:
            self._numels = torch.tensor([float(math.prod(shape)) for _, shape in self.part.params], device=device)
        return self._numels

    def reduce(self, buf: torch.Tensor) -> None:
        """Sum ``buf`` over the ranks of the group (in place); nothing to do in a single process."""
        if self.comm is not None and buf.numel():
            self.comm(buf)


def all_reduce_on(group: Any, device: torch.device) -> Callable[[torch.Tensor], None]:
    """In-place sum over ``group``, run on ``device`` (e.g. CPU-offloaded optimizer states with an NCCL group)."""

    def reduce(buf: torch.Tensor) -> None:
        if buf.device == device:
            dist.all_reduce(buf, group=group)
        else:
            tmp = buf.to(device)
            dist.all_reduce(tmp, group=group)
            buf.copy_(tmp)

    return reduce


class CAME(torch.optim.Optimizer):
    """CAME over plain parameters, or over ZeRO flat partitions once ``bind_zero`` has given their layout.

    betas = (b1, b2, b3): first moment, squared gradient, instability; eps = (eps1, eps2): added to the squared
    gradient and to the instability. ``names`` ({id(param): name}) only labels errors and ``factored_names``.
    State per stepped tensor: ``exp_avg`` (its shape), ``exp_avg_sq`` (the vectors' elements),
    ``exp_avg_sq_row`` / ``exp_avg_sq_col`` / ``exp_avg_res_row`` / ``exp_avg_res_col`` (the rows and columns of
    the matrices it holds, concatenated), ``step``.
    """

    def __init__(self, params: Iterable[Any], lr: float, betas: tuple[float, float, float] = DEFAULT_BETAS,
                 eps: tuple[float, float] = DEFAULT_EPS, clip_threshold: float = 1.0, weight_decay: float = 0.0,
                 names: dict[int, str] | None = None):
        if lr <= 0 or len(betas) != 3 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"CAME needs lr > 0 and three betas in [0, 1), got lr={lr}, betas={betas}")
        if len(eps) != 2 or not all(e > 0 for e in eps) or clip_threshold <= 0 or weight_decay < 0:
            raise ValueError(f"CAME needs two eps > 0, clip_threshold > 0 and weight_decay >= 0, got eps={eps}, "
                             f"clip_threshold={clip_threshold}, weight_decay={weight_decay}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=tuple(eps), clip_threshold=clip_threshold,
                                      weight_decay=weight_decay))
        self._layouts: dict[int, _Layout] = {}
        names = names or {}
        for group in self.param_groups:
            for p in group["params"]:
                name = names.get(id(p), f"param{len(self._layouts)}")
                shape = tuple(p.shape)
                is_factored(shape)  # refuse >2-D parameters up front
                seg = Segment(name, shape, 0, 0, p.numel())
                self._layouts[id(p)] = _Layout(FlatPartition(p, [seg], [(name, shape)], None), comm=None)

    def bind_partitions(self, partitions: list[FlatPartition],
                        comm: Callable[[FlatPartition], Callable[[torch.Tensor], None]]) -> None:
        """Step on these ZeRO flat partitions from now on; ``comm(partition)`` is the in-place sum over the ranks
        that share it (``bind_zero``: an all-reduce over its process group)."""
        self._layouts = {id(part.tensor): _Layout(part, comm=comm(part)) for part in partitions}

    def partitions(self) -> list[FlatPartition]:
        """What each stepped tensor holds: a parameter of its own, or (after ``bind_partitions``) ZeRO pieces."""
        return [lay.part for lay in self._layouts.values()]

    def factored_names(self) -> set[str]:
        """Names of the parameters (or pieces of them) this rank steps with factored statistics."""
        return {s.name for lay in self._layouts.values() for s in lay.part.segments if is_factored(s.shape)}

    def layout(self, tensor: torch.Tensor) -> FlatPartition:
        lay = self._layouts.get(id(tensor))
        if lay is None or lay.part.tensor is not tensor:
            raise RuntimeError(
                f"CAME was asked to step a tensor of shape {tuple(tensor.shape)} that is neither one of its "
                f"parameters nor a bound ZeRO partition; under DeepSpeed ZeRO call "
                f"pixeldit.train.came.bind_zero(optimizer, engine, module) after deepspeed.initialize (a flat "
                f"partition stepped as a vector would silently lose the factored second moments)")
        return lay.part

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self.layout(p)
                    self._step_tensor(p, group, self._layouts[id(p)])
        return loss

    def _init_state(self, p: torch.Tensor, lay: _Layout) -> dict:
        state = self.state[p]
        if not state:
            f32 = dict(dtype=torch.float32, device=p.device)
            state["step"] = 0
            state["exp_avg"] = torch.zeros(p.shape, **f32)
            state["exp_avg_sq"] = torch.zeros(lay.sizes["vec"], **f32)
            for key, size in (("exp_avg_sq_row", "row"), ("exp_avg_sq_col", "col"), ("exp_avg_res_row", "row"),
                              ("exp_avg_res_col", "col")):
                state[key] = torch.zeros(lay.sizes[size], **f32)
        return state

    def _factored_stats(self, lay: _Layout, values: torch.Tensor, eps: float) -> dict[str, tuple]:
        """Row and column means of ``values`` (flat, squared quantities) + eps for every matrix this rank holds a
        piece of, summed over the ranks: {name: (row means (m,), column means (n,))}."""
        buf = values.new_zeros(lay.stats_size)
        segs = [s for s in lay.part.segments if is_factored(s.shape)]
        for s in segs:
            (m, n), at = s.shape, lay.stats_at[s.name]
            row_col_sums_(values[s.flat_start:s.flat_start + s.numel], s.param_start, n, buf[at:at + m],
                          buf[at + m:at + m + n])
        lay.reduce(buf)
        out = {}
        for s in segs:
            (m, n), at = s.shape, lay.stats_at[s.name]
            out[s.name] = (buf[at:at + m].div_(n).add_(eps), buf[at + m:at + m + n].div_(m).add_(eps))
        return out

    def _step_tensor(self, p: torch.Tensor, group: dict, lay: _Layout) -> None:
        if not p.is_contiguous():
            raise RuntimeError(f"CAME steps flat views; parameter of shape {tuple(p.shape)} is not contiguous")
        b1, b2, b3 = group["betas"]
        eps1, eps2 = group["eps"]
        lr, wd = group["lr"], group["weight_decay"]
        state = self._init_state(p, lay)
        state["step"] += 1
        grad = p.grad.reshape(-1).float()  # (P,)
        exp_avg = state["exp_avg"].view(-1)  # (P,)
        segs = lay.part.segments

        # 1. second moments -> U = G / sqrt(V)
        update = grad.square()  # (P,) G^2, then U in place
        stats = self._factored_stats(lay, update, eps1)
        for s in segs:
            u = update[s.flat_start:s.flat_start + s.numel]
            g = grad[s.flat_start:s.flat_start + s.numel]
            if s.name in stats:
                (ri, ci), (mean_r, mean_c) = lay.state_at[s.name], stats[s.name]
                row = state["exp_avg_sq_row"][ri:ri + s.shape[0]].lerp_(mean_r, 1.0 - b2)
                col = state["exp_avg_sq_col"][ci:ci + s.shape[1]].lerp_(mean_c, 1.0 - b2)
                u.copy_(g)
                scale_by_outer_(u, s.param_start, (row / row.mean()).rsqrt_(), col.rsqrt())
            else:
                at = lay.state_at[s.name]
                v = state["exp_avg_sq"][at:at + s.numel]
                v.lerp_(u.add_(eps1), 1.0 - b2)
                torch.mul(g, v.rsqrt(), out=u)

        # 2. update clipping: RMS over each whole parameter (summed over the ranks)
        sums = update.new_zeros(len(lay.part.params))
        for s in segs:
            sums[lay.rms_at[s.name]] += update[s.flat_start:s.flat_start + s.numel].square().sum()
        lay.reduce(sums)
        divisor = (sums / lay.numels(sums.device)).sqrt_().div_(group["clip_threshold"]).clamp_(min=1.0)
        for s in segs:
            update[s.flat_start:s.flat_start + s.numel].div_(divisor[lay.rms_at[s.name]])

        # 3. first moment, instability -> confidence-guided step
        exp_avg.lerp_(update, 1.0 - b1)
        instability = update.sub_(exp_avg).square_()  # (P,) (U - M)^2, reusing the buffer
        stats = self._factored_stats(lay, instability, eps2)
        step_dir = instability.copy_(exp_avg)  # (P,) M, scaled below for the matrices
        for s in segs:
            if s.name in stats:
                (ri, ci), (mean_r, mean_c) = lay.state_at[s.name], stats[s.name]
                row = state["exp_avg_res_row"][ri:ri + s.shape[0]].lerp_(mean_r, 1.0 - b3)
                col = state["exp_avg_res_col"][ci:ci + s.shape[1]].lerp_(mean_c, 1.0 - b3)
                scale_by_outer_(step_dir[s.flat_start:s.flat_start + s.numel], s.param_start,
                                (row / row.mean()).rsqrt_(), col.rsqrt())
        flat = p.view(-1)
        if wd:
            flat.mul_(1.0 - lr * wd)
        flat.add_(step_dir.to(flat.dtype), alpha=-lr)


def bind_zero(optimizer: torch.optim.Optimizer, engine: Any, module: nn.Module) -> list[FlatPartition]:
    """Give a CAME inside a DeepSpeed ZeRO engine the layout of the flat partitions it steps on (a no-op for
    any other optimizer); returns the partitions."""
    if not isinstance(optimizer, CAME):
        return []
    from deepspeed.accelerator import get_accelerator

    names = {id(p): n for n, p in module.named_parameters()}
    parts = zero_partitions(engine.optimizer, names)
    for part in parts:
        for s in part.segments:
            is_factored(s.shape)
    device = torch.device(get_accelerator().current_device_name())
    optimizer.bind_partitions(parts, lambda part: all_reduce_on(part.process_group, device))
    return parts
