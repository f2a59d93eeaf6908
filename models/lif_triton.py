"""Triton kernels of torch.ops.deepspike.lif on CUDA (models/lif_op.py registers them).

One program per block of neurons loops over T with the membrane in registers, the same arithmetic as the
CPU kernel and the PyTorch reference, so the three agree bit for bit. Two details keep it exact:
fp_fusion is off (a fused multiply-add in u * decay + x would round once where the reference rounds
twice), and the constants are loaded from a tensor in the accumulation dtype (a Python float argument
would be an fp32 scalar, wrong for float64 inputs).

Arguments are checked by the op's C++ check (torch.ops.deepspike.lif_check), and tensors of any dense layout are
read in place, as on the CPU (models/lif_op.py). The code is written and read packed, 2 bits per neuron, as the CPU
kernel does.

Tested on the CPU under the Triton interpreter (TRITON_INTERPRET=1 set before triton is imported).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from models.code_layout import packed_code_shape, time_layout

_TL_DTYPE = {torch.float32: tl.float32, torch.float64: tl.float64}


@triton.jit
def _cast(v, ty: tl.constexpr):
    if ty == tl.bfloat16:
        # Rounded to nearest even by hand, as c10::BFloat16 does (NaN stays NaN): the same on the GPU, where
        # the cast would round alike, and under the interpreter, whose fp32 -> bf16 cast truncates.
        bits = v.to(tl.float32).to(tl.uint32, bitcast=True)
        rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).to(tl.uint16)
        return tl.where(v == v, rounded, 0x7FC0).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return v.to(ty)


# Neurons of a program as [_BLOCK // 4, 4]: row q of the block is one byte of the packed code, column k the neuron in
# bits 2k, 2k + 1 (the layout described at TimeLayout in models/csrc/lif_cpu.cpp). Packing and unpacking live in
# _pack and _unpack.
_BLOCK = 1024


@triton.jit
def _pack(code):
    """[Q, 4] 2-bit codes -> [Q] bytes (disjoint bits: the sum is their or)."""
    shifts = 2 * tl.arange(0, 4)[None, :]
    return tl.sum(code.to(tl.int32) << shifts, axis=1).to(tl.uint8)


@triton.jit
def _unpack(packed):
    """[Q] bytes -> [Q, 4] 2-bit codes."""
    shifts = 2 * tl.arange(0, 4)[None, :]
    return (packed.to(tl.int32)[:, None] >> shifts) & 3


@triton.jit
def _emit(spikes_ptrs, code_ptrs, mask, byte_mask, u, v_th, lens):
    s = u > v_th
    fired = s.to(tl.uint8)  # (the interpreter cannot cast int1 to a float type directly)
    spike = tl.where(u != u, float("nan"), fired.to(tl.float32))  # a NaN membrane emits NaN, not silence
    tl.store(spikes_ptrs, _cast(spike, spikes_ptrs.dtype.element_ty), mask=mask)
    code = tl.where(mask, fired | ((tl.abs(u - v_th) < lens).to(tl.uint8) << 1), 0)  # padding slots stay 0
    tl.store(code_ptrs, _pack(code), mask=byte_mask)
    return s


@triton.jit
def _first_step_offsets(Q, inner, row_bytes, T, BLOCK: tl.constexpr, OUTER: tl.constexpr):
    """Where this program's neurons sit at t = 0, as [BLOCK // 4, 4], and their bytes in the packed code, as
    [BLOCK // 4]; consecutive steps are `inner` elements and `row_bytes` bytes apart (the layout of
    models/csrc/lif_cpu.cpp's TimeLayout: dims inside the time dim give `inner` consecutive elements, dims outside it
    repeat [T, inner] blocks). Q = outer * row_bytes bytes per step."""
    q = tl.program_id(0).to(tl.int64) * (BLOCK // 4) + tl.arange(0, BLOCK // 4)  # (int64 throughout: q is)
    i = 4 * (q % row_bytes)[:, None] + tl.arange(0, 4)[None, :]  # the neuron in its row
    if OUTER:
        o = q // row_bytes
        offs, code_offs = (o * T * inner)[:, None] + i, o * T * row_bytes + q % row_bytes
    else:
        offs, code_offs = i, q
    byte_mask = q < Q
    return offs, code_offs, byte_mask[:, None] & (i < inner), byte_mask


@triton.jit
def _lif_forward_kernel(x_ptr, spikes_ptr, code_ptr, consts_ptr, T, Q, inner, row_bytes, BLOCK: tl.constexpr,
                        ACC: tl.constexpr, OUTER: tl.constexpr):
    # Pointers advance by `inner` per step, so offsets never need t * inner (which overflows int32 on big tensors).
    offs, code_offs, mask, byte_mask = _first_step_offsets(Q, inner, row_bytes, T, BLOCK, OUTER)
    x_ptrs, spikes_ptrs, code_ptrs = x_ptr + offs, spikes_ptr + offs, code_ptr + code_offs
    decay, v_th, lens = tl.load(consts_ptr), tl.load(consts_ptr + 1), tl.load(consts_ptr + 2)
    u = tl.load(x_ptrs, mask=mask, other=0).to(ACC)
    s = _emit(spikes_ptrs, code_ptrs, mask, byte_mask, u, v_th, lens)
    for _ in range(1, T):
        x_ptrs, spikes_ptrs, code_ptrs = x_ptrs + inner, spikes_ptrs + inner, code_ptrs + row_bytes
        u = tl.where(s, 0.0, u * decay) + tl.load(x_ptrs, mask=mask, other=0).to(ACC)
        s = _emit(spikes_ptrs, code_ptrs, mask, byte_mask, u, v_th, lens)


@triton.jit
def _lif_backward_kernel(grad_ptr, code_ptr, grad_x_ptr, consts_ptr, T, Q, inner, row_bytes, last_step_offset,
                         last_step_code_offset, BLOCK: tl.constexpr, ACC: tl.constexpr, OUTER: tl.constexpr):
    offs, code_offs, mask, byte_mask = _first_step_offsets(Q, inner, row_bytes, T, BLOCK, OUTER)
    # (T - 1) * inner and (T - 1) * row_bytes, from the host: T and inner may arrive as compile-time constants
    offs += last_step_offset
    grad_ptrs, code_ptrs, grad_x_ptrs = grad_ptr + offs, code_ptr + code_offs + last_step_code_offset, grad_x_ptr + offs
    decay, height = tl.load(consts_ptr), tl.load(consts_ptr + 1)
    # -0 is the additive identity of every float (+0 is not): the last step adds nothing, as in the reference.
    carry = tl.full([BLOCK // 4, 4], -0.0, ACC)
    code = _unpack(tl.load(code_ptrs, mask=byte_mask, other=0))
    for i in range(T):  # t = T - 1 - i (a positive loop step: compiled loops count up)
        g = tl.where((code & 2) != 0, tl.load(grad_ptrs, mask=mask, other=0).to(ACC) * height, 0.0) + carry
        tl.store(grad_x_ptrs, _cast(g, grad_x_ptrs.dtype.element_ty), mask=mask)
        grad_ptrs, code_ptrs, grad_x_ptrs = grad_ptrs - inner, code_ptrs - row_bytes, grad_x_ptrs - inner
        code = _unpack(tl.load(code_ptrs, mask=byte_mask & (i < T - 1), other=0))  # step t - 1's
        carry = tl.where((code & 1) != 0, 0.0, g * decay)


@triton.jit
def _code_spikes_kernel(code_ptr, out_ptr, Q, inner, row_bytes, BLOCK: tl.constexpr):
    """out's memory, `inner` elements per row of the code: the spike bit as 0/1."""
    q = tl.program_id(0).to(tl.int64) * (BLOCK // 4) + tl.arange(0, BLOCK // 4)
    i = 4 * (q % row_bytes)[:, None] + tl.arange(0, 4)[None, :]
    byte_mask = q < Q
    spikes = (_unpack(tl.load(code_ptr + q, mask=byte_mask, other=0)) & 1).to(tl.uint8)
    tl.store(out_ptr + (q // row_bytes * inner)[:, None] + i, _cast(spikes.to(tl.float32), out_ptr.dtype.element_ty),
             mask=byte_mask[:, None] & (i < inner))


def _launch(kernel, tensors, consts, like: torch.Tensor, *extra) -> None:
    acc = torch.promote_types(like.dtype, torch.float32)
    T, inner, outer = time_layout(like)
    row_bytes = (inner + 3) // 4
    Q = outer * row_bytes
    if Q == 0:
        return
    kernel[(triton.cdiv(Q, _BLOCK // 4),)](*tensors, _constants(tuple(consts), acc, like.device), T, Q, inner,
                                           row_bytes, *extra, BLOCK=_BLOCK, ACC=_TL_DTYPE[acc], OUTER=outer > 1,
                                           enable_fp_fusion=False)


@functools.lru_cache(maxsize=64)
def _constants(values: tuple[float, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The kernel's constants in the accumulation dtype on the device, made once per set of values: a host to
    device copy in every call would synchronise the stream."""
    return torch.tensor(values, dtype=torch.float64).to(device=device, dtype=dtype)


def lif_forward(x: torch.Tensor, decay: float, v_th: float, lens: float) -> tuple[torch.Tensor, torch.Tensor]:
    torch.ops.deepspike.lif_check(x, decay, v_th, lens)  # the op's one check (models/csrc/lif_cpu.cpp)
    # empty_like keeps the strides of a dense x (any layout: read in place) and picks a dense layout for any other
    # x, which is then copied into it; the CPU kernel does the same.
    spikes = torch.empty_like(x)
    if x.stride() != spikes.stride():
        x = torch.empty_like(spikes).copy_(x)
    code = x.new_empty(packed_code_shape(spikes), dtype=torch.uint8)
    _launch(_lif_forward_kernel, (x, spikes, code), [decay, v_th, lens], x)
    return spikes, code


def lif_backward(grad_spikes: torch.Tensor, code: torch.Tensor, stride, decay: float, lens: float) -> torch.Tensor:
    torch.ops.deepspike.lif_backward_check(grad_spikes, code, stride, decay, lens)
    grad_x = grad_spikes.new_empty_strided(grad_spikes.shape, stride)  # x's layout, as lif_forward's spikes
    if grad_spikes.stride() != grad_x.stride():  # a copy only where autograd delivers another layout
        grad_spikes = torch.empty_like(grad_x).copy_(grad_spikes)
    T, inner, _ = time_layout(grad_x)
    _launch(_lif_backward_kernel, (grad_spikes, code.contiguous(), grad_x), [decay, 1.0 / (2.0 * lens)],
            grad_spikes, (T - 1) * inner, (T - 1) * ((inner + 3) // 4))
    return grad_x


def lif_code_spikes(code: torch.Tensor, size, stride, dtype: torch.dtype) -> torch.Tensor:
    torch.ops.deepspike.lif_code_spikes_check(code, size, stride, dtype)
    out = code.new_empty_strided(size, stride, dtype=dtype)
    row_bytes = code.shape[-1]
    if out.numel() == 0:
        return out
    Q = code.numel()
    _code_spikes_kernel[(triton.cdiv(Q, _BLOCK // 4),)](code, out, Q, out.numel() // (Q // row_bytes), row_bytes,
                                                        BLOCK=_BLOCK)
    return out
