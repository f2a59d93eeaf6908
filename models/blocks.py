"""Residual blocks of the three spiking ResNet families (docs/model.md §3).

Every block maps a sequence [T, N, C, H, W] to a sequence. Convolutions and tdBN run once on the
time-folded tensor [T*N, C, H, W]: a 2-D conv applied per step is the same map, and tdBN (one
BatchNorm over N, T, H, W per channel) is exactly a BatchNorm2d over the folded batch. BN layers are
plain nn.BatchNorm2d so that nn.SyncBatchNorm.convert_sync_batchnorm gives the authors' SyncBN.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from models.neuron import LIF
from models.spike_conv import SpikeConv2d


def td_bn(channels: int, gamma0: float) -> nn.BatchNorm2d:
    """tdBN with the authors' init (docs/model.md §4): gamma = alpha * V_th (alpha = 1), beta = 0; momentum
    0.1, eps 1e-5."""
    bn = nn.BatchNorm2d(channels)
    nn.init.constant_(bn.weight, gamma0)
    nn.init.zeros_(bn.bias)
    return bn


def conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


def spike_conv3x3(cin: int, cout: int, stride: int = 1) -> SpikeConv2d:
    return SpikeConv2d(cin, cout, 3, stride=stride, padding=1)


def folded(fn: Callable[..., torch.Tensor], x: torch.Tensor, *more: torch.Tensor) -> torch.Tensor:
    """Apply a per-image op to every time step of x [T, N, ...] (and of tensors of x's shape beside it) in one
    call."""
    y = fn(*(fold(t) for t in (x, *more)))
    return y.unflatten(0, x.shape[:2])


def fold(x: torch.Tensor) -> torch.Tensor:
    """x [T, N, ...] as [T*N, ...]: a view where x's strides allow one, else a copy in x's own layout (a stem
    output broadcast over T, stride 0). reshape would copy into the contiguous layout and turn a channels_last
    sequence (models/layout.py) into an NCHW batch."""
    if x.shape[0] > 1 and x.shape[1] > 1 and x.stride(0) != x.shape[1] * x.stride(1):
        x = x.clone(memory_format=torch.preserve_format)
    return x.flatten(0, 1)


class _Subsample(torch.autograd.Function):
    """x[..., ::s, ::s] as a copy in x's layout, whose gradient is laid out like x too.

    A copy, not a view: the conv after it saves its input, and a view would keep the whole block input alive.
    Autograd's own backward of the slice scatters into a contiguous zero tensor, which in a channels_last network
    (models/layout.py) would hand the residual path an NCHW gradient that every conv on it then reads through a
    copy. The backward is made of differentiable ops, so double backward (analysis.gradnorm) goes through it."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, s: int) -> torch.Tensor:
        # x's dims from the outermost in memory; a broadcast dim (stride 0) counts as the outermost.
        ctx.s, ctx.shape = s, x.shape
        ctx.order = sorted(range(x.dim()), key=lambda d: -x.stride(d) if x.stride(d) else -float("inf"))
        return x[..., ::s, ::s].clone(memory_format=torch.preserve_format)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad_x = torch.empty_permuted(ctx.shape, ctx.order, dtype=grad.dtype, device=grad.device).zero_()
        grad_x[..., :: ctx.s, :: ctx.s] = grad
        return grad_x, None


class Shortcut(nn.Module):
    """Projection shortcut used when the shape changes.

    kind='conv': strided 1x1 conv -> tdBN (MS-ResNet-18/34, baselines). A strided 1x1 conv reads only
    every s-th pixel, so it is computed as a subsample followed by a 1x1 conv (same numbers, less work). The
    subsample is taken on the [T, N, ...] input before folding: a static image's stem output arrives broadcast
    over T (stride 0, nothing materialised), and only the subsampled 1/s^2 of it is then materialised
    (`_Subsample`).
    kind='pool': AvgPool 2x2 -> 1x1 conv -> tdBN (MS-ResNet-104 and the CIFAR family; always 2x2, as in
    the authors' code, even when only the channel count changes).
    """

    def __init__(self, cin: int, cout: int, stride: int, kind: str, gamma0: float):
        super().__init__()
        if kind not in ("conv", "pool"):
            raise ValueError(f"shortcut kind must be 'conv' or 'pool', got {kind!r}")
        self.kind, self.stride = kind, stride
        self.conv = nn.Conv2d(cin, cout, 1, bias=False)
        self.bn = td_bn(cout, gamma0)

    def _project(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "pool":
            x = F.avg_pool2d(x, 2, 2)
        return self.bn(self.conv(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "conv" and self.stride > 1:
            x = _Subsample.apply(x, self.stride)
        return folded(self._project, x)


def make_shortcut(cin: int, cout: int, stride: int, kind: str, gamma0: float) -> nn.Module:
    if stride == 1 and cin == cout:
        return nn.Identity()
    return Shortcut(cin, cout, stride, kind, gamma0)


class MSBlock(nn.Module):
    """Membrane shortcut: LIF -> conv3x3(s) -> tdBN(V_th) -> LIF -> conv3x3 -> tdBN(0), plus the shortcut.

    The sum is not passed through a neuron: what flows between blocks is the real-valued membrane
    potential, so the block can start as an exact identity (last BN zero-initialised).
    """

    def __init__(self, cin: int, cout: int, stride: int, neuron: Callable[[], LIF], shortcut: str,
                 v_th: float, last_bn_gamma0: float = 0.0):
        super().__init__()
        self.lif1, self.conv1, self.bn1 = neuron(), spike_conv3x3(cin, cout, stride), td_bn(cout, v_th)
        self.lif2, self.conv2, self.bn2 = neuron(), spike_conv3x3(cout, cout), td_bn(cout, last_bn_gamma0)
        self.shortcut = make_shortcut(cin, cout, stride, shortcut, v_th)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = folded(lambda s, c: self.bn1(self.conv1(s, c)), *self.lif1(x, with_code=True))
        out = folded(lambda s, c: self.bn2(self.conv2(s, c)), *self.lif2(out, with_code=True))
        return out + self.shortcut(x)


class SpikingBlock(nn.Module):
    """Vanilla spiking ResNet block: conv -> BN -> LIF -> conv -> BN, add the shortcut, LIF after the add.

    Input and output are spikes. The LIF after the addition is what breaks identity mapping.
    """

    def __init__(self, cin: int, cout: int, stride: int, neuron: Callable[[], LIF], shortcut: str,
                 v_th: float, last_bn_gamma0: float = 0.0):
        super().__init__()
        self.conv1, self.bn1, self.lif1 = conv3x3(cin, cout, stride), td_bn(cout, v_th), neuron()
        self.conv2, self.bn2 = spike_conv3x3(cout, cout), td_bn(cout, last_bn_gamma0)
        self.shortcut = make_shortcut(cin, cout, stride, shortcut, v_th)
        self.lif_out = neuron()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.lif1(folded(lambda s: self.bn1(self.conv1(s)), x), with_code=True)
        out = folded(lambda s, c: self.bn2(self.conv2(s, c)), *out)
        return self.lif_out(out + self.shortcut(x))


class SEWBlock(nn.Module):
    """Spike-element-wise block with ADD: conv -> BN -> LIF -> conv -> BN -> LIF, plus the shortcut.

    The downsampling shortcut ends in a LIF too, so both operands of ADD are spikes and the output is
    an integer spike count (0, 1 or 2 per element).
    """

    def __init__(self, cin: int, cout: int, stride: int, neuron: Callable[[], LIF], shortcut: str,
                 v_th: float, last_bn_gamma0: float = 0.0):
        super().__init__()
        self.conv1, self.bn1, self.lif1 = conv3x3(cin, cout, stride), td_bn(cout, v_th), neuron()
        self.conv2, self.bn2, self.lif2 = spike_conv3x3(cout, cout), td_bn(cout, last_bn_gamma0), neuron()
        self.shortcut = make_shortcut(cin, cout, stride, shortcut, v_th)
        self.lif_shortcut = neuron() if isinstance(self.shortcut, Shortcut) else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.lif1(folded(lambda s: self.bn1(self.conv1(s)), x), with_code=True)
        out = self.lif2(folded(lambda s, c: self.bn2(self.conv2(s, c)), *out))
        return out + self.lif_shortcut(self.shortcut(x))


BLOCKS = {"ms": MSBlock, "spiking": SpikingBlock, "sew": SEWBlock}
