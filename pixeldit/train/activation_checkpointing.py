"""Activation (gradient) checkpointing applied to a PixelDiT from outside.

The model stays a plain nn.Module: each patch block and PiT block gets its ``forward`` wrapped in
``torch.utils.checkpoint.checkpoint`` (non-reentrant), so its activations are recomputed in backward
instead of stored. Parameter names and the state dict are unchanged. Apply it after ``apply_compile``
(``pixeldit.train.compile``: checkpointing then wraps the compiled forward) and before ``deepspeed.initialize``.
"""
from __future__ import annotations

import functools

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

_ORIGINAL = "_pixeldit_original_forward"


def _checkpointed(module: nn.Module):
    original = getattr(module, _ORIGINAL)

    @functools.wraps(original)
    def forward(*args, **kwargs):
        if not torch.is_grad_enabled():
            return original(*args, **kwargs)
        return checkpoint(original, *args, use_reentrant=False, **kwargs)

    return forward


def checkpointable_blocks(model: nn.Module) -> list[nn.Module]:
    """The blocks that are checkpointed: every patch-level block and every PiT block."""
    blocks: list[nn.Module] = []
    for name in ("patch_blocks", "pixel_blocks"):
        blocks.extend(getattr(model, name, []))
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no patch_blocks/pixel_blocks to checkpoint")
    return blocks


def apply_activation_checkpointing(model: nn.Module, enabled: bool = True) -> int:
    """Turn checkpointing of every block on or off (idempotent). Returns the number of blocks affected."""
    blocks = checkpointable_blocks(model)
    for block in blocks:
        is_on = hasattr(block, _ORIGINAL)
        if enabled and not is_on:
            setattr(block, _ORIGINAL, block.forward)
            block.forward = _checkpointed(block)
        elif not enabled and is_on:
            original = getattr(block, _ORIGINAL)
            delattr(block, _ORIGINAL)
            del block.forward  # back to the class's forward, or to the forward set before (a compiled one)
            if getattr(original, "__func__", None) is not type(block).forward:
                block.forward = original
    return len(blocks)


def is_checkpointed(model: nn.Module) -> bool:
    return all(hasattr(b, _ORIGINAL) for b in checkpointable_blocks(model))
