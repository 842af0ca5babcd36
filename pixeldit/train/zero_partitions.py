"""Where each parameter's elements sit in the flat fp32 tensors a DeepSpeed ZeRO optimizer steps on.

ZeRO does not hand the client optimizer the model's parameters but flat 1-D fp32 tensors:

- ZeRO-1/2 (``DeepSpeedZeroOptimizer``): one flat tensor per parameter group,
  ``single_partition_of_fp32_groups[i]``, this rank's contiguous 1/world slice of the group's parameters laid
  end to end (a parameter may straddle two ranks, and a rank may hold the tail of one matrix and the head of the
  next). DeepSpeed records each parameter's piece in ``param._hp_mapping``: its first element in the parameter
  (``lp_fragment_address``) and in the flat partition (``hp_fragment_address``).
- ZeRO-3 (``DeepSpeedZeroOptimizer_Stage3``): one flat tensor per sub-group,
  ``fp32_partitioned_groups_flat[j]``: every parameter of the sub-group contributes its own partition (rank r
  holds elements [r * n, r * n + valid) of the flattened parameter, n = ceil(numel / world)), one after another
  in the order of ``fp16_groups[j]``.

``zero_partitions`` turns either into ``FlatPartition``s: the flat tensor, the pieces (``Segment``) this rank
holds, every parameter of the group (identical on all ranks, so collectives over per-parameter statistics line
up) and the process group. An optimizer that needs a parameter's shape (CAME's factored second moments) reads
it from here; ``write_full_values`` copies full fp32 tensors into the partitions (the warm start's exact fp32
master weights). Offsets are checked against the addresses of DeepSpeed's own buffers, so a change of layout in
a future DeepSpeed fails loudly instead of silently mixing up parameters.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Segment:
    """A contiguous run of one parameter's row-major elements inside a flat tensor."""

    name: str
    shape: tuple[int, ...]
    param_start: int  # first element of the parameter (row-major index) held here
    flat_start: int  # its position in the flat tensor
    numel: int


@dataclass
class FlatPartition:
    """One flat tensor the optimizer steps on, and what it holds."""

    tensor: torch.Tensor  # this rank's flat fp32 partition (the optimizer's "parameter")
    segments: list[Segment]  # this rank's pieces, in flat order
    params: list[tuple[str, tuple[int, ...]]]  # every parameter of the group, same order on every rank
    process_group: Any  # the ranks sharing the group (torch.distributed group; None: the default group)


def zero_partitions(zero_optimizer: Any, names: dict[int, str]) -> list[FlatPartition]:
    """The ``FlatPartition``s of a DeepSpeed ZeRO optimizer (``engine.optimizer``); ``names`` maps ``id(param)``
    to the parameter's name. Raises TypeError for any other wrapper (e.g. ZeRO-1 through ``BF16_Optimizer``)."""
    kind = type(zero_optimizer).__name__
    if kind == "DeepSpeedZeroOptimizer":
        return _stage_1_and_2(zero_optimizer, names)
    if kind == "DeepSpeedZeroOptimizer_Stage3":
        return _stage_3(zero_optimizer, names)
    raise TypeError(f"engine.optimizer is a {kind}; its flat partitions are known for DeepSpeedZeroOptimizer "
                    f"(ZeRO-1/2) and DeepSpeedZeroOptimizer_Stage3 (ZeRO-3) only (ZeRO-1 with "
                    f"data_types.grad_accum_dtype=fp32 uses BF16_Optimizer: remove that key from the ZeRO JSON)")


def _name(names: dict[int, str], p: torch.Tensor) -> str:
    if id(p) not in names:
        raise KeyError(f"a parameter of shape {tuple(p.shape)} in the ZeRO optimizer is not a module parameter")
    return names[id(p)]


def _stage_1_and_2(opt: Any, names: dict[int, str]) -> list[FlatPartition]:
    out = []
    for i, params in enumerate(opt.bit16_groups):
        flat = opt.single_partition_of_fp32_groups[i]
        lp_flat = opt.bit16_groups_flat[i]
        rank = dist.get_rank(group=opt.real_dp_process_group[i])
        part_start = rank * int(opt.partition_size[i])
        segments = []
        for p in params:
            mapping = getattr(p, "_hp_mapping", None)
            if mapping is None:  # no element of p on this rank
                continue
            lp, hp = mapping.lp_fragment_address, mapping.hp_fragment_address
            offset_in_group = (p.data_ptr() - lp_flat.data_ptr()) // p.element_size()
            if offset_in_group + lp.start != part_start + hp.start or hp.start + hp.numel > flat.numel():
                raise RuntimeError(f"ZeRO-{2 if opt.partition_gradients else 1} layout of {_name(names, p)} does not "
                                   f"match DeepSpeed's buffers (group {i}, rank {rank}); this DeepSpeed version "
                                   f"lays out partitions differently")
            segments.append(Segment(_name(names, p), tuple(p.shape), lp.start, hp.start, hp.numel))
        segments.sort(key=lambda s: s.flat_start)
        out.append(FlatPartition(flat, segments, [(_name(names, p), tuple(p.shape)) for p in params],
                                 opt.real_dp_process_group[i]))
    return out


def _stage_3(opt: Any, names: dict[int, str]) -> list[FlatPartition]:
    out = []
    for j, params in enumerate(opt.fp16_groups):
        flat = opt.fp32_partitioned_groups_flat[j]
        lp_flat = opt.fp16_partitioned_groups_flat[j]
        group = opt.sub_group_process_groups[j]
        rank, world = dist.get_rank(group=group), dist.get_world_size(group=group)
        segments, offset = [], 0
        for p in params:
            n = int(p.partition_numel())
            if n * world < p.ds_numel:
                raise RuntimeError(f"ZeRO-3 partition of {_name(names, p)}: {world} x {n} elements cannot hold "
                                   f"{p.ds_numel}")
            if lp_flat is not None and (p.ds_tensor.data_ptr() - lp_flat.data_ptr()) // p.ds_tensor.element_size() != offset:
                raise RuntimeError(f"ZeRO-3 layout of {_name(names, p)} does not match DeepSpeed's buffers "
                                   f"(sub-group {j}, rank {rank}); this DeepSpeed version lays out partitions "
                                   f"differently")
            valid = max(0, min(n, p.ds_numel - rank * n))
            if valid:
                segments.append(Segment(_name(names, p), tuple(p.ds_shape), rank * n, offset, valid))
            offset += n
        if offset != flat.numel():
            raise RuntimeError(f"ZeRO-3 sub-group {j}: partitions add up to {offset} elements, the fp32 flat tensor "
                               f"has {flat.numel()}")
        out.append(FlatPartition(flat, segments, [(_name(names, p), tuple(p.ds_shape)) for p in params], group))
    return out


@torch.no_grad()
def write_full_values(partitions: list[FlatPartition], values: dict[str, torch.Tensor]) -> int:
    """Copy each parameter's full value (``values[name]``, any dtype) into this rank's pieces of it; parameters
    absent from ``values`` keep theirs. Returns the number of elements written."""
    written = 0
    for part in partitions:
        for s in part.segments:
            if s.name not in values:
                continue
            if values[s.name].numel() != torch.Size(s.shape).numel():
                raise ValueError(f"{s.name}: a value of {values[s.name].numel()} elements for a parameter of shape "
                                 f"{s.shape}")
            src = values[s.name].reshape(-1)[s.param_start: s.param_start + s.numel]
            part.tensor.narrow(0, s.flat_start, s.numel).copy_(src)
            written += s.numel
    return written
