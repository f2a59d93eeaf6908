"""A Conv2d for spike (or spike-count) inputs that saves its input as uint8 for backward.

A plain conv keeps its fp32/bf16 input alive until backward, although that input is binary. Saving
it as uint8 (exact for 0/1 spikes and SEW's small counts) cuts that tensor to 1/4 (fp32) or 1/2 (bf16)
of its size; backward casts it back and calls the same convolution_backward kernel autograd would.
Where the input comes straight from a LIF, the conv is handed the LIF's packed code (2 bits per neuron, bit 0 =
spiked), which the LIF keeps for its own backward anyway: the conv saves that same tensor, so it costs neither a
cast nor a byte, and backward unpacks the spikes from it (torch.ops.deepspike.lif_code_spikes) straight into the
conv dtype and x's layout. x must then be the LIF's spikes or a dense view of them with the same memory order
(models.blocks.folded's time-folded view). Autocast is honoured explicitly (the conv runs in the autocast dtype;
weight grads return in fp32).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class _SpikeConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, stride, padding, code):
        dev = x.device.type
        dt = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
        with torch.autocast(dev, enabled=False):
            out = F.conv2d(x.to(dt), weight.to(dt), None, stride, padding)
        if code is not None:  # (a bad pairing fails here, not in backward)
            torch.ops.deepspike.lif_code_spikes_check(code, x.shape, x.stride(), dt)
        ctx.save_for_backward(x.to(torch.uint8) if code is None else code, weight)
        ctx.conf = (stride, padding, dt, x.dtype, None if code is None else (x.shape, x.stride()))
        return out

    @staticmethod
    def backward(ctx, grad_out):
        saved, weight = ctx.saved_tensors
        stride, padding, dt, in_dtype, code_layout = ctx.conf
        if code_layout is None:
            x = saved.to(dt)
        else:
            x = torch.ops.deepspike.lif_code_spikes(saved, *code_layout, dt)
        gi, gw, _ = torch.ops.aten.convolution_backward(
            grad_out.to(dt), x, weight.to(dt), None, stride, padding, (1, 1), False, (0, 0), 1,
            (ctx.needs_input_grad[0], ctx.needs_input_grad[1], False))
        return (gi.to(in_dtype) if gi is not None else None,
                gw.to(weight.dtype) if gw is not None else None, None, None, None)


class SpikeConv2d(nn.Conv2d):
    """Bias-free, dilation-1, ungrouped conv whose input must be non-negative integers below 256."""

    def __init__(self, cin: int, cout: int, kernel_size: int, stride: int = 1, padding: int = 0):
        super().__init__(cin, cout, kernel_size, stride=stride, padding=padding, bias=False)

    def forward(self, x: torch.Tensor, code: torch.Tensor | None = None) -> torch.Tensor:
        """`code`: the packed code of the LIF that emitted x (models.neuron.LIF(x, with_code=True)), saved for
        backward in place of a uint8 copy of x; x is the LIF's spikes or a dense view of them in the same memory
        order (models.lif_op)."""
        if not torch.is_grad_enabled():
            return super().forward(x)
        return _SpikeConv.apply(x, self.weight, self.stride, self.padding, code)
