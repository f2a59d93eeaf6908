"""Training-time gradient-norm logging: the hooked norms equal a plain retain_grad reference, also
through the trainer's activation checkpointing and a DDP/DeepSpeed-style wrapper."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from analysis.loading import real_batches
from models import create_model
from models.grad_norms import BlockGradNorms

pytestmark = pytest.mark.usefixtures("one_thread")


def _model():
    torch.manual_seed(0)
    return create_model("ms_resnet20", T=2, widths=(8, 16, 32), last_bn_gamma0=0.3).train()


def _reference_norms(model, x, y):
    """||dL/dx_b|| by running the blocks by hand and keeping the grad of every block input."""
    h, inputs = model.stem_forward(x), []
    for block in model.blocks:
        h.retain_grad()
        inputs.append(h)
        h = block(h)
    F.cross_entropy(model.head_forward(h), y).backward()
    return [float(t.grad.norm()) for t in inputs]


class _Wrapper(nn.Module):  # how DDP and DeepSpeed engines hold the model
    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, x):
        return self.module(x)


@pytest.mark.parametrize("checkpointing", [0, 2])
def test_hooked_norms_equal_reference(checkpointing):
    from trainer.wrap import apply_activation_checkpointing

    x, y = real_batches("digits", 8, 8, 1)[0]
    expected = _reference_norms(_model(), x, y)
    model = _model()
    assert apply_activation_checkpointing(model, checkpointing) == (5 if checkpointing else 0)
    grad_norms = BlockGradNorms(_Wrapper(model))
    with grad_norms:
        F.cross_entropy(model(x), y).backward()
    assert grad_norms.block_norms() == pytest.approx(expected, rel=1e-5)

    m = grad_norms.metrics(loss_scale=2.0)
    assert [m[f"grad/norm_block_{b}"] for b in range(9)] == pytest.approx([e / 2 for e in expected], rel=1e-5)
    assert m["grad/norm_stage_2"] == pytest.approx(sum(expected[3:6]) / 6, rel=1e-5)
    assert m["grad/norm_first_over_last"] == pytest.approx(expected[0] / expected[-1], rel=1e-5)
    assert len(m) == 9 + 3 + 1


def test_accumulated_backwards_are_averaged_and_nothing_is_recorded_outside():
    (x1, y1), (x2, y2) = real_batches("digits", 8, 8, 2)
    model = _model()
    expected = [(a + b) / 2 for a, b in zip(_reference_norms(model, x1, y1), _reference_norms(model, x2, y2))]
    grad_norms = BlockGradNorms(model)
    with grad_norms:
        for x, y in ((x1, y1), (x2, y2)):
            F.cross_entropy(model(x), y).backward()
    F.cross_entropy(model(x1), y1).backward()  # outside the context: must not count
    assert grad_norms.block_norms() == pytest.approx(expected, rel=1e-5)


def test_errors():
    model = _model()
    x, y = real_batches("digits", 8, 4, 1)[0]
    grad_norms = BlockGradNorms(model)
    with grad_norms, torch.no_grad():
        model(x)
    with pytest.raises(RuntimeError, match="no gradient reached"):
        grad_norms.metrics()
    with grad_norms:
        F.cross_entropy(model(x), y).backward()
    with pytest.raises(ValueError, match="loss_scale"):
        grad_norms.metrics(loss_scale=0)
    with pytest.raises(TypeError, match="is no SpikingNetwork"):
        BlockGradNorms(_Wrapper(nn.Linear(2, 2)))
