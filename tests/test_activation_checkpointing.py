"""Activation checkpointing: same loss and gradients, state dict unchanged, less stored activation."""
from __future__ import annotations

import torch

from pixeldit.models import build_model, get_model_args
from pixeldit.train.activation_checkpointing import apply_activation_checkpointing, is_checkpointed


def _loss_and_grads(model, x, t, y):
    model.zero_grad()
    loss = model(x, t, y=y).square().mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_checkpointing_gives_identical_loss_and_grads():
    torch.manual_seed(0)
    model = build_model(get_model_args("debug"))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    keys = list(model.state_dict())
    x, t, y = torch.randn(2, 3, 32, 48), torch.rand(2), torch.tensor([1, 2])
    loss0, g0 = _loss_and_grads(model, x, t, y)
    assert apply_activation_checkpointing(model, True) == 3
    assert is_checkpointed(model)
    assert list(model.state_dict()) == keys
    loss1, g1 = _loss_and_grads(model, x, t, y)
    assert torch.equal(loss0, loss1)
    assert g0.keys() == g1.keys() and all(torch.allclose(g0[k], g1[k], atol=1e-6) for k in g0)
    apply_activation_checkpointing(model, False)
    assert not is_checkpointed(model) and "forward" not in vars(model.patch_blocks[0])


def test_checkpointing_saves_activation_memory():
    """Fewer tensors are saved for backward with checkpointing on (counted with saved-tensor hooks)."""
    model = build_model(get_model_args("debug"))
    x, t, y = torch.randn(2, 3, 64, 64), torch.rand(2), torch.tensor([1, 2])

    def saved_bytes() -> int:
        total = 0

        def pack(tensor):
            nonlocal total
            total += tensor.numel() * tensor.element_size()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            model(x, t, y=y).sum()
        return total

    plain = saved_bytes()
    apply_activation_checkpointing(model, True)
    assert saved_bytes() < 0.5 * plain
