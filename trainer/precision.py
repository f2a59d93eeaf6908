"""How a batch and the forward pass look under each precision, for training and evaluation alike."""

from __future__ import annotations

from contextlib import nullcontext

import torch


def autocast(device: torch.device, precision: str):
    """bf16 autocast around the forward pass; fp32 and fp16 (DeepSpeed casts the model) need none."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def model_input(x: torch.Tensor, device: torch.device, precision: str, time_first: bool, normalize=None,
                labels: torch.Tensor | None = None) -> torch.Tensor:
    """Batch as the model takes it: time first for sequence data (the dataset's `time_first`: [N, T, C, H, W]
    -> [T, N, ...]), on the device, and in half precision for fp16 (DeepSpeed casts the model there, not its
    inputs). `normalize`: the loader's (a Loader hands over uint8 batches), run on the device after the copy;
    `labels` (ideally on the device already) lets it zero the padding rows."""
    if normalize is not None:
        x = normalize(x.to(device, non_blocking=True), labels)
    x = x.transpose(0, 1) if time_first else x
    return x.to(device, dtype=torch.half if precision == "fp16" else None, non_blocking=True)
