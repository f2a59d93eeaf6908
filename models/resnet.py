"""One spiking ResNet skeleton for all families: stem -> residual blocks -> head (docs/model.md §5).

`model(x)` takes a static batch [N, C, H, W] (direct coding: the image is presented at every one of
the T steps) or a sequence [T, N, C, H, W] and returns logits [N, classes].

Static input: the stem (conv(s) + tdBN, no neuron) sees the same image at every step, so it is
computed once on [N, C, H, W] and broadcast over T. The output and all gradients are the same as
computing it T times. One documented difference: BN's running variance uses the unbiased factor
n/(n-1) with n = N*H*W instead of T*N*H*W (relative difference below 1/(N*H*W)).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial, reduce

import torch
from torch import nn

from models.blocks import BLOCKS, folded, td_bn
from models.neuron import LIF


class _OverTime(torch.autograd.Function):
    """x [N, ...] broadcast over T steps, a view (nothing materialised), whose gradient, the sum over the steps,
    is laid out like the incoming one. Autograd's own sum of an expand comes out contiguous: in a channels_last
    network (models/layout.py) the stem's BN and conv would get an NCHW gradient and read it through copies."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, T: int) -> torch.Tensor:
        return x.unsqueeze(0).expand(T, *x.shape)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return reduce(torch.add, grad.unbind(0)), None


class SpikingResNet(nn.Module):
    """Args:
        family: 'ms' (membrane shortcut), 'spiking' (vanilla, LIF after the add) or 'sew' (ADD).
        layers: residual blocks per stage.  widths: channels per stage.  strides: stride of each stage.
        stem: '7x7' (ImageNet 18/34: 7x7 s2 conv), '3conv' (104: three biased 3x3 convs, the first s2),
            '3x3' (CIFAR: 3x3 s1 conv).  The stem conv(s) are followed by tdBN and no neuron.
        shortcut: 'conv' (strided 1x1) or 'pool' (AvgPool 2x2 + 1x1) for projection shortcuts.
        T: default number of time steps for static input.  decay, v_th, lens: LIF constants.
        dropout: before the classifier (0.2 in MS-ResNet-104).
        last_bn_gamma0: initial gamma of the last BN in each residual branch (0 for MS: identity at init).
    """

    def __init__(self, family: str, layers: Sequence[int], widths: Sequence[int], strides: Sequence[int],
                 stem: str, shortcut: str, num_classes: int = 1000, in_channels: int = 3, T: int = 6,
                 decay: float = 0.25, v_th: float = 0.5, lens: float = 0.5, dropout: float = 0.0,
                 last_bn_gamma0: float | None = None):
        super().__init__()
        if family not in BLOCKS:
            raise ValueError(f"unknown family {family!r}; expected one of {sorted(BLOCKS)}")
        if not (len(layers) == len(widths) == len(strides)):
            raise ValueError("layers, widths and strides must have one entry per stage")
        if T < 1:
            raise ValueError(f"T must be >= 1, got {T}")
        self.family, self.T, self.num_classes = family, T, num_classes
        neuron = partial(LIF, decay=decay, v_th=v_th, lens=lens)
        if last_bn_gamma0 is None:
            last_bn_gamma0 = 0.0 if family == "ms" else v_th

        c0 = widths[0]
        if stem == "7x7":
            convs = [nn.Conv2d(in_channels, c0, 7, stride=2, padding=3, bias=False)]
        elif stem == "3conv":
            convs = [nn.Conv2d(in_channels, c0, 3, stride=2, padding=1),
                     nn.Conv2d(c0, c0, 3, padding=1), nn.Conv2d(c0, c0, 3, padding=1)]
        elif stem == "3x3":
            convs = [nn.Conv2d(in_channels, c0, 3, padding=1, bias=False)]
        else:
            raise ValueError(f"unknown stem {stem!r}")
        self.stem_convs = nn.ModuleList(convs)
        self.stem_bn = td_bn(c0, v_th)
        # Baselines pass spikes between blocks, so their stem ends in a neuron (docs/model.md §5).
        self.stem_lif = neuron() if family != "ms" else nn.Identity()

        block_cls = BLOCKS[family]
        blocks, self.block_stage = [], []
        cin = c0
        for stage, (n, cout, stride) in enumerate(zip(layers, widths, strides)):
            for i in range(n):
                blocks.append(block_cls(cin, cout, stride if i == 0 else 1, neuron, shortcut, v_th,
                                        last_bn_gamma0))
                self.block_stage.append(stage)
                cin = cout
        self.blocks = nn.ModuleList(blocks)
        # MS blocks output membrane potentials: the head turns them into spikes before pooling.
        self.head_lif = neuron() if family == "ms" else nn.Identity()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fc = nn.Linear(cin, num_classes)

    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        for conv in self.stem_convs:
            x = conv(x)
        return self.stem_bn(x)

    def stem_forward(self, x: torch.Tensor) -> torch.Tensor:
        """[N, C, H, W] (static) or [T, N, C, H, W] -> stem output [T, N, C', H', W']."""
        if x.dim() == 4:
            out = _OverTime.apply(self._stem(x), self.T)
        elif x.dim() == 5:
            out = folded(self._stem, x)
        else:
            raise ValueError(f"expected input [N,C,H,W] or [T,N,C,H,W], got shape {tuple(x.shape)}")
        return self.stem_lif(out)

    def head_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Last block output [T, N, C, H, W] -> logits [N, classes]: LIF -> GAP -> mean over T -> FC."""
        rates = self.head_lif(x).mean(dim=(3, 4)).mean(dim=0)
        return self.fc(self.dropout(rates))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem_forward(x)
        for block in self.blocks:
            x = block(x)
        return self.head_forward(x)
