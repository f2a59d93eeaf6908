"""Activation checkpointing across timesteps: exact gradients, BN statistics updated once (one process)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from models import create_model
from trainer.wrap import apply_activation_checkpointing

WRAPPED = "_checkpoint_wrapped_module."


def _net(depth: int = 20) -> nn.Module:
    torch.manual_seed(0)
    model = create_model(f"ms_resnet{depth}", T=3, widths=(8, 16, 32), num_classes=10).train()
    # Random BN affine so every block (including the zero-initialised last BNs) passes gradient.
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data = torch.rand(m.weight.shape, generator=g) * 0.8 + 0.2
            m.bias.data = torch.randn(m.bias.shape, generator=g) * 0.1
    return model


def _step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    F.cross_entropy(model(x), y).backward()
    return {n.replace(WRAPPED, ""): p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("every", [1, 3])
def test_checkpointed_gradients_and_bn_statistics_are_exact(every):
    plain = _net(20)
    ckpt = copy.deepcopy(plain)
    wrapped = apply_activation_checkpointing(ckpt, every)
    assert wrapped == len(range(0, len(plain.blocks), every))
    x, y = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(2)), torch.arange(4)
    g_plain, g_ckpt = _step(plain, x, y), _step(ckpt, x, y)
    assert g_plain.keys() == g_ckpt.keys()
    nonzero = 0
    for name, g in g_plain.items():
        assert torch.equal(g, g_ckpt[name]), f"{name}: max |diff| {(g - g_ckpt[name]).abs().max()}"
        nonzero += bool(g.abs().sum() > 0)
    assert nonzero == len(g_plain)  # every parameter got a gradient, so the comparison covers them all
    # Running statistics and batch counters after one step equal those of the plain model.
    sd_plain, sd_ckpt = plain.state_dict(), ckpt.state_dict()
    assert sd_plain.keys() == sd_ckpt.keys()  # checkpoints stay interchangeable
    for key, value in sd_plain.items():
        assert torch.equal(value, sd_ckpt[key]), key
    assert int(sd_ckpt["blocks.0.bn1.num_batches_tracked"]) == 1


def test_plain_recomputation_would_update_bn_twice():
    """The trap the wrapper avoids: torch's checkpoint re-runs BN in training mode during backward."""
    model = _net(20)
    block = model.blocks[0]
    before = block.bn1.running_mean.clone()
    h = model.stem_forward(torch.randn(2, 3, 16, 16))
    checkpoint(block, h, use_reentrant=False).sum().backward()
    assert int(block.bn1.num_batches_tracked) == 2
    once = _net(20).blocks[0]
    once(h.detach())
    assert not torch.equal(block.bn1.running_mean, once.bn1.running_mean)
    assert not torch.equal(before, once.bn1.running_mean)


def test_checkpointing_cuts_saved_activations():
    """Between forward and backward only the block inputs stay alive under checkpointing."""
    def activation_bytes(model):
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        storages: dict[int, int] = {}

        def pack(t):
            s = t.untyped_storage()
            if s.data_ptr() not in params:
                storages[s.data_ptr()] = s.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = F.cross_entropy(model(torch.randn(4, 3, 16, 16)), torch.arange(4))
        loss.backward()
        return sum(storages.values())

    plain = _net(20)
    ckpt = copy.deepcopy(plain)
    apply_activation_checkpointing(ckpt, 1)
    # A block saves ~18 bytes per output element (two uint8 LIF codes, fp32 spikes and conv outputs);
    # its checkpointed form keeps only its fp32 input (4 bytes). The stem and head are not wrapped.
    ratio = activation_bytes(ckpt) / activation_bytes(plain)
    assert ratio < 0.35, ratio
