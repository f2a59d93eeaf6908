"""channels_last for the network's tensors, sequences [T, N, C, H, W] included (docs/model.md §12).

torch names channels_last for 4-D tensors only (NHWC; its 5-D channels_last_3d is NDHWC, a volume). The network
folds a sequence [T, N, C, H, W] into [T*N, C, H, W] for every conv and tdBN (models.blocks.folded), so a
sequence is channels_last when it is a [T*N, H, W, C] buffer seen as [T, N, C, H, W]: dims in memory order
T, N, H, W, C. Folding such a sequence is a view that is channels_last in torch's sense, and unfolding a
channels_last [T*N, C, H, W] gives the sequence back, so neither direction copies. The LIF op reads any dense
layout in place and emits its outputs in its input's (models/lif_op.py), so the layout holds through the blocks.
"""

from __future__ import annotations

import torch
from torch import nn

SEQUENCE_ORDER = (0, 1, 3, 4, 2)
"""The dims of a channels_last [T, N, C, H, W] sequence from the outermost in memory to the innermost."""


def to_channels_last(x: torch.Tensor) -> torch.Tensor:
    """x [N, C, H, W] or [T, N, C, H, W] laid out channels_last: x itself where it is already, else a copy."""
    if x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    if x.dim() == 5:
        inverse = sorted(range(5), key=SEQUENCE_ORDER.__getitem__)
        return x if is_channels_last(x) else x.permute(SEQUENCE_ORDER).contiguous().permute(inverse)
    raise ValueError(f"channels_last takes [N, C, H, W] or [T, N, C, H, W], got shape {tuple(x.shape)}")


def is_channels_last(x: torch.Tensor) -> bool:
    """Whether x [N, C, H, W] or [T, N, C, H, W] is dense in the channels_last layout."""
    if x.dim() == 4:
        return x.is_contiguous(memory_format=torch.channels_last)
    return x.dim() == 5 and x.permute(SEQUENCE_ORDER).is_contiguous()


def _input_channels_last(_module: nn.Module, args: tuple) -> tuple:
    return (to_channels_last(args[0]), *args[1:])


def use_channels_last(model: nn.Module, weights: bool = True) -> nn.Module:
    """Run `model` channels_last, in place: a forward pre-hook lays out each input it is called with (on the
    model's device, where the batch already is), so every caller, training step or evaluation, feeds the convs
    NHWC; with `weights`, the conv weights are laid out channels_last too (else each conv reorders its weight,
    a weight-sized copy). Values are unchanged; only the convolution kernels that the backend picks differ."""
    if weights:
        model.to(memory_format=torch.channels_last)
    model.register_forward_pre_hook(_input_channels_last)
    return model
