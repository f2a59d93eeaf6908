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
    return {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("every,segment,covered", [(1, 1, 9), (3, 1, 3), (1, 4, 9), (2, 2, 5)])
def test_checkpointed_gradients_and_bn_statistics_are_exact(every, segment, covered):
    plain = _net(20)  # 9 residual blocks
    ckpt = copy.deepcopy(plain)
    assert apply_activation_checkpointing(ckpt, every, segment) == covered
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


@pytest.mark.parametrize("every,segment,twice", [(1, 1, set(range(9))), (3, 1, {0, 3, 6}),
                                                 (2, 2, {0, 1, 4, 5, 8}), (0, 1, set())])
def test_exactly_the_chosen_blocks_are_recomputed(every, segment, twice):
    """A block that runs again in backward kept no activations from its forward (the memory saving);
    the others ran once. (Memory itself is measured by bench.memory.)"""
    model = _net(20)
    apply_activation_checkpointing(model, every, segment)
    calls = [0] * len(model.blocks)

    def counted(i, forward):
        def run(x):
            calls[i] += 1
            return forward(x)
        return run

    for i, block in enumerate(model.blocks):  # (module hooks are muted while checkpoint recomputes)
        block.forward = counted(i, block.forward)
    loss = F.cross_entropy(model(torch.randn(2, 3, 16, 16)), torch.arange(2))
    assert calls == [1] * 9
    loss.backward()
    assert calls == [2 if i in twice else 1 for i in range(9)]
    with torch.no_grad():  # evaluation never pays for recomputation
        model(torch.randn(2, 3, 16, 16))
    assert calls == [3 if i in twice else 2 for i in range(9)]
