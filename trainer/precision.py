"""The forward pass under each precision, for training and evaluation alike."""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import nn


def autocast(device: torch.device, precision: str):
    """bf16 autocast around the forward pass; fp32 and fp16 (DeepSpeed casts the model) need none."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def weights_dtype(model: nn.Module) -> torch.dtype:
    """The dtype the model's inputs must have: its floating-point weights' (half inside a DeepSpeed fp16
    engine, fp32 in bf16/fp32 engines and in every export, whatever the run's precision)."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)

