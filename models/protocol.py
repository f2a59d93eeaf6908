"""The interface every network in `models` offers and the code around it relies on.

The trainer's activation checkpointing replaces `forward` by stem -> blocks (some recomputed) -> head,
the gradient-norm monitor hooks every block input, the spike monitor groups firing rates by stage, and
the authors' checkpoint mapping walks the blocks stage by stage: all through these members only.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import nn


@runtime_checkable
class SpikingNetwork(Protocol):
    T: int
    """Time steps a static [N, C, H, W] input is presented for."""
    blocks: nn.ModuleList
    """The residual blocks in order; each maps [T, N, C, H, W] to [T, N, C', H', W']."""
    block_stage: list[int]
    """The stage (from 0) of each block."""

    def stem_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Model input ([N, C, H, W] or [T, N, C, H, W]) -> the first block's input [T, N, C, H, W]."""

    def head_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The last block's output -> logits [N, classes]."""
