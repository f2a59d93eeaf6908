"""The MS-ResNet LIF neuron (docs/model.md §2): one fused op over the whole sequence, torch.ops.deepspike.lif.

u_t = decay * u_{t-1} * (1 - s_{t-1}) + x_t,  s_t = [u_t > v_th],  u_0 = 0.

The reset spike is detached (no gradient through the reset path); the rectangular surrogate is
ds/du = 1 / (2 * lens) on |u - v_th| < lens. Backward therefore needs, per element and step, only two
bits: whether the neuron spiked and whether u was inside the surrogate window. The op packs them 4 neurons to
a byte (models/lif_op.py), so the neuron saves a quarter of a byte per element for backward (fp32 autograd
through elementary ops saves ~5 tensors of 4 bytes). The membrane is accumulated in fp32 (or the input's dtype
if wider), so bf16 autocast only changes the precision of the convolutions around it.

Non-finite values: a NaN membrane (a NaN input current, or one earlier in the sequence) emits NaN spikes from that
step to the end of the sequence, where the comparison u > v_th alone would emit silence: a NaN anywhere in the
network reaches the loss, and the trainer's non-finite guard (engine.nonfinite) sees it. Its code byte is 0 (no
spike, outside the window), so backward passes no surrogate gradient at those steps. An infinite membrane is left
to the comparison (+inf spikes and resets, -inf stays silent). docs/model.md states the same for users.

The state is a local variable of each call: nothing is carried between forwards, which is what makes
the neuron exact under activation checkpointing (recomputation starts from the same zero state).

The op (models/lif_op.py: compiled C++ on CPU, Triton on CUDA) loops over T inside one kernel.
`lif_sequence_reference` is the same neuron in PyTorch ops; the kernels match it bit for bit, and the
tests hold them to it.
"""

from __future__ import annotations

import torch
from torch import nn

from models import lif_op  # (importing it registers torch.ops.deepspike.lif)

_SPIKE = 1
_WINDOW = 2


class _LIFSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, decay: float, v_th: float, lens: float) -> torch.Tensor:
        T = x.shape[0]
        spikes = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        code = torch.empty(x.shape, dtype=torch.uint8, device=x.device)
        acc = torch.promote_types(x.dtype, torch.float32)
        u = x[0].to(acc)
        s = u > v_th
        for t in range(T):
            if t > 0:
                u = torch.where(s, 0.0, u * decay) + x[t].to(acc)
                s = u > v_th
            spikes[t] = torch.where(u.isnan(), torch.nan, s.to(x.dtype))
            code[t] = s.to(torch.uint8) | (((u - v_th).abs() < lens).to(torch.uint8) << 1)
        ctx.save_for_backward(code)
        ctx.decay, ctx.height, ctx.in_dtype, ctx.acc = decay, 1.0 / (2.0 * lens), x.dtype, acc
        return spikes

    @staticmethod
    def backward(ctx, grad_spikes: torch.Tensor):
        (code,) = ctx.saved_tensors
        T = code.shape[0]
        grad_x = torch.empty(code.shape, dtype=ctx.in_dtype, device=code.device)
        carry = None  # dL/du_{t+1} * du_{t+1}/du_t, flowing back through the leak
        for t in range(T - 1, -1, -1):
            window = (code[t] & _WINDOW).bool()
            g = torch.where(window, grad_spikes[t].to(ctx.acc) * ctx.height, 0.0)
            if carry is not None:
                g = g + carry
            grad_x[t] = g
            if t > 0:
                carry = torch.where((code[t - 1] & _SPIKE).bool(), 0.0, g * ctx.decay)
        return grad_x, None, None, None


def lif_sequence(x: torch.Tensor, decay: float = 0.25, v_th: float = 0.5, lens: float = 0.5) -> torch.Tensor:
    """Spikes [T, ...] (in x's dtype) for input currents x [T, ...]."""
    return torch.ops.deepspike.lif(x, decay, v_th, lens)[0]


def lif_sequence_reference(x: torch.Tensor, decay: float = 0.25, v_th: float = 0.5,
                           lens: float = 0.5) -> torch.Tensor:
    """lif_sequence in PyTorch ops, one step at a time: the definition the fused kernels are tested against."""
    return _LIFSequence.apply(x, decay, v_th, lens)


class LIF(nn.Module):
    """Multi-step LIF over the leading time dimension of a [T, N, ...] tensor; parameter-free."""

    def __init__(self, decay: float = 0.25, v_th: float = 0.5, lens: float = 0.5):
        super().__init__()
        lif_op.check_constants(decay, v_th, lens)  # at construction, not at the first forward
        self.decay, self.v_th, self.lens = float(decay), float(v_th), float(lens)

    def forward(self, x: torch.Tensor, with_code: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Spikes, or with_code=True (spikes, code): the op's packed code, which holds the spikes, for a
        models.spike_conv.SpikeConv2d to save instead of a copy of them (models.code_layout.unpack_code reads it)."""
        spikes, code = torch.ops.deepspike.lif(x, self.decay, self.v_th, self.lens)
        return (spikes, code) if with_code else spikes

    def extra_repr(self) -> str:
        return f"decay={self.decay}, v_th={self.v_th}, lens={self.lens}"


def spikes_of(out: torch.Tensor | tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """The spikes in what a LIF returned, as a forward hook sees it: LIF(x) or LIF(x, with_code=True)."""
    return out[0] if isinstance(out, tuple) else out
