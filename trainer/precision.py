"""How a batch and the forward pass look under each precision, for training and evaluation alike."""

from __future__ import annotations

from contextlib import nullcontext

import torch


def autocast(device: torch.device, precision: str):
    """bf16 autocast around the forward pass; fp32 and fp16 (DeepSpeed casts the model) need none."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def model_input(x: torch.Tensor, device: torch.device, precision: str, time_first: bool) -> torch.Tensor:
    """Batch as the model takes it: time first for sequence data (the dataset's `time_first`: [N, T, C, H, W]
    -> [T, N, ...]), on the device, and in half precision for fp16 (DeepSpeed casts the model there, not its
    inputs)."""
    x = x.transpose(0, 1) if time_first else x
    return x.to(device, dtype=torch.half if precision == "fp16" else None, non_blocking=True)
