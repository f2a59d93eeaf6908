"""The packed code's layout in PyTorch terms, for the op's registration (models/lif_op.py), its Triton kernels
(models/lif_triton.py), analysis and tests: where a dense tensor's neurons sit over time, the packed code's shape,
and unpacking it in PyTorch ops. The bit layout itself is described once, at TimeLayout in
models/csrc/lif_cpu.cpp."""

from __future__ import annotations

import math

import torch


def time_layout(t: torch.Tensor) -> tuple[int, int, int]:
    """T, inner, outer of a dense tensor (models/csrc/lif_cpu.cpp's TimeLayout): the dims laid out inside the time
    dim form `inner` consecutive elements, those outside it repeat the [T, inner] block `outer` times."""
    T = t.shape[0]
    inner = t.stride(0) if T > 1 else t.numel()
    return T, inner, t.numel() // (T * inner) if T * inner else 0


def packed_code_shape(t: torch.Tensor) -> tuple[int, int, int]:
    """The shape of the packed code of the dense tensor t: [outer, T, ceil(inner / 4)]."""
    T, inner, outer = time_layout(t)
    return outer, T, (inner + 3) // 4


_SHIFTS = (0, 2, 4, 6)  # neuron k of a byte sits in bits 2k, 2k + 1


def unpack_code(code: torch.Tensor, size, stride) -> torch.Tensor:
    """The uint8 code per neuron (bit 0 spiked, bit 1 inside the window) of the packed `code`, as a tensor of this
    size and stride (the spikes'), in PyTorch ops."""
    numel = math.prod(size)
    row_bytes = code.shape[-1]
    rows = code.numel() // row_bytes if row_bytes else 0
    shifts = torch.tensor(_SHIFTS, dtype=torch.uint8, device=code.device)
    per_neuron = (code.reshape(rows, row_bytes, 1) >> shifts) & 3  # [rows, row_bytes, 4], in memory order
    memory = per_neuron.reshape(rows, 4 * row_bytes)[:, : numel // rows if rows else 0].contiguous()
    return memory.as_strided(size, stride)  # (as_strided indexes the storage: memory must own it densely)
