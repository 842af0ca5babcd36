"""CAME (pixeldit.train.came) without DeepSpeed: the update against the paper's equations, the row/column pieces
of a matrix cut anywhere, and ranks that each hold arbitrary slices of a flat group (threads standing in for
processes, one shared sum standing in for the all-reduce) against the single-process step. The same optimizer
inside real ZeRO-1/2/3 engines: tests/test_came_zero.py."""
from __future__ import annotations

import threading

import pytest
import torch

from pixeldit.train.came import CAME, row_col_sums_, scale_by_outer_
from pixeldit.train.zero_partitions import FlatPartition, Segment

BETAS, EPS = (0.9, 0.999, 0.9999), (1e-30, 1e-16)


def paper_came(w: torch.Tensor, grads: list[torch.Tensor], lr: float, clip: float, wd: float) -> torch.Tensor:
    """CAME written from the paper's Algorithm 1 in float64, one tensor, whole-matrix operations."""
    (b1, b2, b3), (e1, e2) = BETAS, EPS
    w = w.double().clone()
    m = torch.zeros_like(w)
    matrix = w.dim() == 2
    r = c = big_r = big_c = v = None
    for g in grads:
        g = g.double()
        if matrix:
            r = (1 - b2) * (g**2 + e1).mean(1) + (b2 * r if r is not None else 0)
            c = (1 - b2) * (g**2 + e1).mean(0) + (b2 * c if c is not None else 0)
            second = torch.outer(r, c) / r.mean()
        else:
            v = (1 - b2) * (g**2 + e1) + (b2 * v if v is not None else 0)
            second = v
        u = g / second.sqrt()
        u = u / max(1.0, float(u.pow(2).mean().sqrt()) / clip)
        m = b1 * m + (1 - b1) * u
        if matrix:
            inst = (u - m) ** 2 + e2
            big_r = (1 - b3) * inst.mean(1) + (b3 * big_r if big_r is not None else 0)
            big_c = (1 - b3) * inst.mean(0) + (b3 * big_c if big_c is not None else 0)
            step = m / (torch.outer(big_r, big_c) / big_r.mean()).sqrt()
        else:
            step = m
        w = w - lr * wd * w - lr * step
    return w


@pytest.mark.parametrize("shape", [(6, 5), (1, 9), (9, 1), (7,)])
def test_step_follows_the_paper(shape):
    g = torch.Generator().manual_seed(len(shape) * 10 + shape[0])
    w0 = torch.randn(shape, generator=g)
    grads = [torch.randn(shape, generator=g) * s for s in (1.0, 0.1, 3.0)]
    p = torch.nn.Parameter(w0.clone())
    opt = CAME([p], lr=0.05, betas=BETAS, eps=EPS, clip_threshold=1.0, weight_decay=0.1)
    for grad in grads:
        p.grad = grad.clone()
        opt.step()
    ref = paper_came(w0, grads, lr=0.05, clip=1.0, wd=0.1)
    assert torch.allclose(p.detach().double(), ref, rtol=1e-5, atol=1e-6)
    keys = set(opt.state[p])
    if len(shape) == 2:
        assert opt.factored_names() == {"param0"} and opt.state[p]["exp_avg_sq"].numel() == 0
        assert opt.state[p]["exp_avg_sq_row"].shape == (shape[0],) and opt.state[p]["exp_avg_res_col"].shape == (shape[1],)
    else:
        assert opt.factored_names() == set() and opt.state[p]["exp_avg_sq"].shape == shape
    assert keys == {"step", "exp_avg", "exp_avg_sq", "exp_avg_sq_row", "exp_avg_sq_col", "exp_avg_res_row",
                    "exp_avg_res_col"}


@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e3])
def test_clipping_makes_the_first_step_of_a_vector_sign_descent(scale):
    """First step on a vector: U = g / sqrt((1 - b2) g^2) = sign(g) / sqrt(1 - b2) (RMS 31.6), clipped to RMS
    ``clip_threshold``, so W = -lr (1 - b1) clip sign(g) whatever the gradient's scale."""
    p = torch.nn.Parameter(torch.zeros(64))
    opt = CAME([p], lr=2.0, clip_threshold=0.5)
    p.grad = torch.randn(64, generator=torch.Generator().manual_seed(1)) * scale
    opt.step()
    assert torch.allclose(p.detach(), -2.0 * 0.1 * 0.5 * p.grad.sign(), rtol=1e-5)


@pytest.mark.parametrize("m, n, cuts", [(5, 7, [3, 10, 17, 30]), (4, 6, [6, 12]), (3, 9, [1, 2, 26]), (6, 1, [2, 5])])
def test_pieces_of_a_matrix_add_up(m, n, cuts):
    x = torch.randn(m * n, dtype=torch.float64)
    rows, cols = torch.zeros(m, dtype=x.dtype), torch.zeros(n, dtype=x.dtype)
    rf, cf = torch.rand(m, dtype=x.dtype) + 0.5, torch.rand(n, dtype=x.dtype) + 0.5
    scaled = x.clone()
    bounds = [0, *cuts, m * n]
    for a, b in zip(bounds[:-1], bounds[1:]):
        row_col_sums_(x[a:b], a, n, rows, cols)
        scale_by_outer_(scaled[a:b], a, rf, cf)
    dense = x.view(m, n)
    assert torch.allclose(rows, dense.sum(1)) and torch.allclose(cols, dense.sum(0))
    assert torch.allclose(scaled.view(m, n), dense * torch.outer(rf, cf))


class SharedSum:
    """All-reduce among threads: every rank contributes a buffer, every rank gets the sum (rank order)."""

    def __init__(self, world: int):
        self.barrier, self.bufs = threading.Barrier(world), [None] * world

    def for_rank(self, rank: int):
        def reduce(buf: torch.Tensor) -> None:
            self.bufs[rank] = buf.clone()
            self.barrier.wait()
            total = sum(self.bufs[1:], self.bufs[0].clone())
            self.barrier.wait()
            buf.copy_(total)
        return reduce


def partitions_of(shapes: dict[str, tuple[int, ...]], cuts: list[int]) -> list[tuple[int, int, list[Segment]]]:
    """ZeRO-1/2-style: the group's parameters end to end, cut at ``cuts``; per rank (start, end, segments)."""
    offsets, at = {}, 0
    for name, shape in shapes.items():
        offsets[name], at = at, at + int(torch.Size(shape).numel())
    bounds = [0, *cuts, at]
    out = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        segs = []
        for name, shape in shapes.items():
            lo, hi = offsets[name], offsets[name] + int(torch.Size(shape).numel())
            if max(a, lo) < min(b, hi):
                segs.append(Segment(name, shape, max(a, lo) - lo, max(a, lo) - a, min(b, hi) - max(a, lo)))
        out.append((a, b, segs))
    return out


@pytest.mark.parametrize("cuts", [[40], [13, 41, 60], [5, 6, 7, 88]])
def test_ranks_holding_slices_step_like_one_process(cuts):
    """Matrices cut mid-row across ranks, a rank holding one partial row, a rank with no piece of a matrix:
    after 3 steps the concatenated partitions equal the single-process CAME."""
    shapes = {"w1": (6, 7), "b1": (7,), "w2": (4, 9), "s": (1,), "w3": (9, 2)}
    gen = torch.Generator().manual_seed(sum(cuts))
    init = {k: torch.randn(s, generator=gen) for k, s in shapes.items()}
    grads = [{k: torch.randn(s, generator=gen) * (i + 1) for k, s in shapes.items()} for i in range(3)]
    kw = dict(lr=0.01, betas=BETAS, eps=EPS, clip_threshold=1.0, weight_decay=0.05)

    params = {k: torch.nn.Parameter(v.clone()) for k, v in init.items()}
    single = CAME(list(params.values()), names={id(p): k for k, p in params.items()}, **kw)
    for step in grads:
        for k, p in params.items():
            p.grad = step[k].clone()
        single.step()
    want = torch.cat([params[k].detach().reshape(-1) for k in shapes])

    flat_init = torch.cat([init[k].reshape(-1) for k in shapes])
    ranks = partitions_of(shapes, cuts)
    shared = SharedSum(len(ranks))
    results, errors = {}, []

    def run(rank: int) -> None:
        try:
            a, b, segs = ranks[rank]
            flat = torch.nn.Parameter(flat_init[a:b].clone())
            opt = CAME([flat], **kw)
            part = FlatPartition(flat, segs, list(shapes.items()), None)
            opt.bind_partitions([part], lambda _: shared.for_rank(rank))
            for step in grads:
                flat.grad = torch.cat([step[k].reshape(-1) for k in shapes])[a:b].clone()
                opt.step()
            results[rank] = flat.detach()
        except Exception as err:  # surfaced below with the rank
            errors.append((rank, err))
            shared.barrier.abort()

    threads = [threading.Thread(target=run, args=(r,)) for r in range(len(ranks))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    got = torch.cat([results[r] for r in range(len(ranks))])
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-7), (got - want).abs().max()


def test_an_unbound_flat_partition_is_refused():
    """What ZeRO does to a client optimizer: its parameter groups get flat 1-D tensors. Stepping one without a
    layout must fail instead of silently running the unfactored rule."""
    w = torch.nn.Parameter(torch.randn(4, 4))
    opt = CAME([w], lr=1e-3)
    flat = torch.nn.Parameter(w.detach().reshape(-1).clone())
    opt.param_groups[0]["params"] = [flat]
    flat.grad = torch.randn(16)
    with pytest.raises(RuntimeError, match="bind_zero"):
        opt.step()


def test_three_dimensional_parameters_are_refused():
    with pytest.raises(ValueError, match=r"shape \(2, 3, 4\) has 3 dimensions"):
        CAME([torch.nn.Parameter(torch.zeros(2, 3, 4))], lr=1e-3)
