"""Peer builds of our MS-ResNets, for side-by-side benchmarks.

`build_spikingjelly_model(name, num_classes, T, ...)`: the same architecture from SpikingJelly 2.0
multi-step layers (`layer.Conv2d/BatchNorm2d/AvgPool2d(step_mode='m')`, `neuron.LIFNode(step_mode='m')`
with a rectangular surrogate). Static input follows SpikingJelly's SEW/Spiking-ResNet idiom: the stem
(conv + BN, no neuron) runs once on the image and its output is repeated over T. That is the faster
of SpikingJelly's two idioms (its own `ms_resnet` repeats the image and runs the stem T times) and
gives the same numbers. Call `functional.reset_net(model)` before every forward (LIFNode is stateful).
On CPU SpikingJelly has one LIF backend, its Torch reference (`functional.neuron_implementation('lif',
cpu)` reports 'torch-reference' for eager and compile); surrogate.Rect is not among the surrogates its
registered LIF op accepts, so LIFNode runs the per-step reference loop with Rect's autograd function.

`build_spikingjelly_memopt_model(name, num_classes, T, size, ...)`: that build under SpikingJelly's memory
optimiser, `memopt.optimize_memory(model, SJMSBlock, probe, level=1)` with its defaults (budget "memory":
every residual block wrapped by `memopt.checkpoint_module`; `compress=True`: a block whose input the probe
finds strictly 0/1 keeps it as 1 bit per spike through `BitSpikeCompressor`). Level 1 is the highest level
that runs without CUDA (levels 2-4 search splits by measuring CUDA peaks). An MS block's input is the
real-valued membrane shortcut, so the probe finds no binary block input and every block is checkpointed
uncompressed: the block then holds only its input for backward, less than any finer split could (a unit
whose input is a spike still needs the LIF before it, which takes the real membrane). See
`spikingjelly_memopt_plan` for what the optimiser chose.

`build_per_timestep_model(name, num_classes, T, ...)`: the authors' formulation (Ariande1/MS-ResNet):
the image is copied T times and every conv, pooling and LIF loops over t in Python; the LIF is made of
elementary autograd ops; tdBN is one BatchNorm over the stacked (T*N) batch.

Both mirror `models.create_model(name, ...)` layer for layer and start from its initialisation. The
SpikingJelly build uses our parameter names (`peer.load_state_dict(ours.state_dict())` copies weights);
the per-timestep build runs an instance of our model (`.net`) with its own loops. MS family only.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from spikingjelly.activation_based import functional, layer, memopt, neuron, surrogate
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

from models import LIF, create_model
from models.blocks import MSBlock, Shortcut
from models.resnet import SpikingResNet


def spikingjelly_lif(lif: LIF) -> neuron.LIFNode:
    """Our LIF as a LIFNode: u = decay*u*(1 - s) + x is SpikingJelly's h = v - v/tau + x
    (decay_input=False) with 1 - 1/tau = decay, hard reset to 0 with the reset spike detached.
    surrogate.Rect(alpha) has slope alpha on |u - v_th| < 0.5/alpha, i.e. ours with alpha = 1/(2*lens).
    SpikingJelly fires on u >= v_th where we fire on u > v_th (differs only on a measure-zero set)."""
    return neuron.LIFNode(tau=1.0 / (1.0 - lif.decay), decay_input=False, v_threshold=lif.v_th, v_reset=0.0,
                          detach_reset=True, step_mode="m",
                          surrogate_function=surrogate.Rect(alpha=1.0 / (2.0 * lif.lens)))


def _conv(c: nn.Conv2d, step_mode: str = "m") -> layer.Conv2d:
    return layer.Conv2d(c.in_channels, c.out_channels, c.kernel_size, c.stride, c.padding,
                        bias=c.bias is not None, step_mode=step_mode)


def _bn(b: nn.BatchNorm2d, step_mode: str = "m") -> layer.BatchNorm2d:
    return layer.BatchNorm2d(b.num_features, b.eps, b.momentum, step_mode=step_mode)


def _shortcut(sc: nn.Module) -> nn.Module:
    if not isinstance(sc, Shortcut):
        return nn.Identity()
    # The authors' layers as written: a strided 1x1 conv (18/34), or AvgPool 2x2 then a 1x1 conv.
    parts: list[tuple[str, nn.Module]] = []
    stride = sc.stride
    if sc.kind == "pool":
        parts.append(("pool", layer.AvgPool2d(2, 2, step_mode="m")))
        stride = 1
    parts.append(("conv", layer.Conv2d(sc.conv.in_channels, sc.conv.out_channels, 1, stride, bias=False,
                                       step_mode="m")))
    parts.append(("bn", _bn(sc.bn)))
    return nn.Sequential(OrderedDict(parts))


class SJMSBlock(nn.Module):
    def __init__(self, ours: MSBlock):
        super().__init__()
        self.lif1, self.conv1, self.bn1 = spikingjelly_lif(ours.lif1), _conv(ours.conv1), _bn(ours.bn1)
        self.lif2, self.conv2, self.bn2 = spikingjelly_lif(ours.lif2), _conv(ours.conv2), _bn(ours.bn2)
        self.shortcut = _shortcut(ours.shortcut)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn1(self.conv1(self.lif1(x)))
        out = self.bn2(self.conv2(self.lif2(out)))
        return out + self.shortcut(x)


class SJMSResNet(nn.Module):
    def __init__(self, ours: SpikingResNet):
        super().__init__()
        self.T = ours.T
        self.stem_convs = nn.ModuleList(_conv(c, "s") for c in ours.stem_convs)
        self.stem_bn = _bn(ours.stem_bn, "s")
        self.blocks = nn.ModuleList(SJMSBlock(b) for b in ours.blocks)
        self.head_lif = spikingjelly_lif(ours.head_lif)
        self.dropout = nn.Dropout(ours.dropout.p) if isinstance(ours.dropout, nn.Dropout) else nn.Identity()
        self.fc = nn.Linear(ours.fc.in_features, ours.fc.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[N, C, H, W] -> logits [N, classes]."""
        for conv in self.stem_convs:
            x = conv(x)
        x = self.stem_bn(x).unsqueeze(0).repeat(self.T, 1, 1, 1, 1)
        for block in self.blocks:
            x = block(x)
        return self.fc(self.dropout(self.head_lif(x).mean(dim=(3, 4)).mean(dim=0)))


def _ours(name: str, **kwargs) -> SpikingResNet:
    model = create_model(name, **kwargs)
    if model.family != "ms":
        raise ValueError(f"peers mirror the MS family only, got {name!r}")
    return model


def build_spikingjelly_model(name: str, num_classes: int | None = None, T: int = 4, **kwargs) -> SJMSResNet:
    """SpikingJelly build of `create_model(name, num_classes=..., T=..., **kwargs)`, same initial weights."""
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    ours = _ours(name, T=T, **kwargs)
    peer = SJMSResNet(ours)
    peer.load_state_dict(ours.state_dict())
    return peer


def build_spikingjelly_memopt_model(name: str, num_classes: int | None = None, T: int = 4, size: int = 32,
                                    **kwargs) -> SJMSResNet:
    """`build_spikingjelly_model` under `memopt.optimize_memory` at level 1 (see the module docstring); the
    probe forward runs on a batch of two random `size` x `size` images."""
    peer = build_spikingjelly_model(name, num_classes, T, **kwargs)
    probe = torch.randn(2, peer.stem_convs[0].in_channels, size, size)

    def example_forward(model: nn.Module) -> torch.Tensor:
        functional.reset_net(model)
        return model(probe)

    return memopt.optimize_memory(peer, SJMSBlock, example_forward, level=1)


def spikingjelly_memopt_plan(model: nn.Module) -> str:
    """What memopt wrapped: checkpointed modules, and how many of them compress their input."""
    wrapped = [m for m in model.modules() if isinstance(m, CheckpointWrapper)]
    compressed = sum(1 for m in wrapped if m.checkpoint_fn.keywords["compressor"] is not None)
    return f"{len(wrapped)} modules checkpointed, {compressed} with a compressed input"


class _RectSpike(torch.autograd.Function):
    # The authors' ActFun: Heaviside forward, boxcar of height 1/(2*lens) backward; saves the membrane.
    @staticmethod
    def forward(ctx, u, v_th, lens):
        ctx.save_for_backward(u)
        ctx.v_th, ctx.lens = v_th, lens
        return (u > v_th).to(u.dtype)

    @staticmethod
    def backward(ctx, g):
        (u,) = ctx.saved_tensors
        return g * ((u - ctx.v_th).abs() < ctx.lens).to(g.dtype) / (2 * ctx.lens), None, None


def _lif(x: torch.Tensor, lif: LIF) -> torch.Tensor:
    # The authors' mem_update: spikes written into a preallocated [T, ...] tensor step by step.
    out = torch.zeros_like(x)
    u = spike = None
    for t in range(x.shape[0]):
        u = x[t] if t == 0 else u * lif.decay * (1 - spike.detach()) + x[t]
        spike = _RectSpike.apply(u, lif.v_th, lif.lens)
        out[t] = spike
    return out


def _per_step(fn, x: torch.Tensor) -> torch.Tensor:
    return torch.stack([fn(x[t]) for t in range(x.shape[0])])


def _bn_td(x: torch.Tensor, bn: nn.BatchNorm2d) -> torch.Tensor:
    return bn(x.flatten(0, 1)).unflatten(0, x.shape[:2])


def _conv_td(x: torch.Tensor, conv: nn.Conv2d, stride=None) -> torch.Tensor:
    stride = conv.stride if stride is None else stride
    return _per_step(lambda s: F.conv2d(s, conv.weight, conv.bias, stride, conv.padding), x)


class PerTimestepMSResNet(nn.Module):
    """Runs the wrapped model's parameters the authors' way (see the module docstring)."""

    def __init__(self, ours: SpikingResNet):
        super().__init__()
        self.net = ours

    def _shortcut(self, x: torch.Tensor, sc: nn.Module) -> torch.Tensor:
        if not isinstance(sc, Shortcut):
            return x
        if sc.kind == "pool":
            return _bn_td(_conv_td(_per_step(lambda s: F.avg_pool2d(s, 2, 2), x), sc.conv), sc.bn)
        return _bn_td(_conv_td(x, sc.conv, sc.stride), sc.bn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        net = self.net
        x = x.unsqueeze(0).repeat(net.T, 1, 1, 1, 1)
        for conv in net.stem_convs:
            x = _conv_td(x, conv)
        x = _bn_td(x, net.stem_bn)
        for blk in net.blocks:
            out = _bn_td(_conv_td(_lif(x, blk.lif1), blk.conv1), blk.bn1)
            out = _bn_td(_conv_td(_lif(out, blk.lif2), blk.conv2), blk.bn2)
            x = out + self._shortcut(x, blk.shortcut)
        rates = _lif(x, net.head_lif).mean(dim=(3, 4)).mean(dim=0)
        return net.fc(net.dropout(rates))


def build_per_timestep_model(name: str, num_classes: int | None = None, T: int = 4,
                             **kwargs) -> PerTimestepMSResNet:
    """The authors' per-timestep formulation of `create_model(name, ...)`; weights live in `.net`."""
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    return PerTimestepMSResNet(_ours(name, T=T, **kwargs))
