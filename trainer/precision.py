"""How a batch and the forward pass look under each precision, for training and evaluation alike."""

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


def model_input(x: torch.Tensor, device: torch.device, dtype: torch.dtype, time_first: bool, normalize=None,
                labels: torch.Tensor | None = None) -> torch.Tensor:
    """Batch as the model takes it: time first for sequence data (the dataset's `time_first`: [N, T, C, H, W]
    -> [T, N, ...]), on the device, in `dtype` (`weights_dtype(model)`). `normalize`: the loader's (a Loader
    hands over uint8 batches), run on the device after the copy (asynchronous on a GPU from the DataLoader's
    pinned memory); `labels` (ideally on the device already) lets it zero the padding rows."""
    if normalize is not None:
        x = normalize(x.to(device, non_blocking=True), labels)
    x = x.transpose(0, 1) if time_first else x
    return x.to(device, dtype=dtype, non_blocking=True)
