"""Triton kernels of torch.ops.deepspike.lif on CUDA (models/lif_op.py registers them).

One program per block of neurons loops over T with the membrane in registers, the same arithmetic as the
CPU kernel and the PyTorch reference, so the three agree bit for bit. Two details keep it exact:
fp_fusion is off (a fused multiply-add in u * decay + x would round once where the reference rounds
twice), and the constants are loaded from a tensor in the accumulation dtype (a Python float argument
would be an fp32 scalar, wrong for float64 inputs).

Arguments are checked by the op's C++ check (torch.ops.deepspike.lif_check), and tensors of any dense layout are
read in place, as on the CPU (models/lif_op.py).

Tested on the CPU under the Triton interpreter (TRITON_INTERPRET=1 set before triton is imported).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

_BLOCK = 1024
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


@triton.jit
def _emit(spikes_ptrs, code_ptrs, mask, u, v_th, lens):
    s = u > v_th
    fired = s.to(tl.uint8)  # (the interpreter cannot cast int1 to a float type directly)
    spike = tl.where(u != u, float("nan"), fired.to(tl.float32))  # a NaN membrane emits NaN, not silence
    tl.store(spikes_ptrs, _cast(spike, spikes_ptrs.dtype.element_ty), mask=mask)
    tl.store(code_ptrs, fired | ((tl.abs(u - v_th) < lens).to(tl.uint8) << 1), mask=mask)
    return s


@triton.jit
def _first_step_offsets(M, inner, T, BLOCK: tl.constexpr, OUTER: tl.constexpr):
    """Where each neuron of this program's block sits at t = 0; consecutive steps are `inner` elements apart
    (the layout of models/csrc/lif_cpu.cpp's TimeLayout: dims inside the time dim give `inner` consecutive
    elements, dims outside it repeat [T, inner] blocks)."""
    m = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    offs = (m // inner) * T * inner + m % inner if OUTER else m  # (int64 throughout: m is)
    return offs, m < M


@triton.jit
def _lif_forward_kernel(x_ptr, spikes_ptr, code_ptr, consts_ptr, T, M, inner, BLOCK: tl.constexpr,
                        ACC: tl.constexpr, OUTER: tl.constexpr):
    # Pointers advance by `inner` per step, so offsets never need t * inner (which overflows int32 on big tensors).
    offs, mask = _first_step_offsets(M, inner, T, BLOCK, OUTER)
    x_ptrs, spikes_ptrs, code_ptrs = x_ptr + offs, spikes_ptr + offs, code_ptr + offs
    decay, v_th, lens = tl.load(consts_ptr), tl.load(consts_ptr + 1), tl.load(consts_ptr + 2)
    u = tl.load(x_ptrs, mask=mask, other=0).to(ACC)
    s = _emit(spikes_ptrs, code_ptrs, mask, u, v_th, lens)
    for _ in range(1, T):
        x_ptrs, spikes_ptrs, code_ptrs = x_ptrs + inner, spikes_ptrs + inner, code_ptrs + inner
        u = tl.where(s, 0.0, u * decay) + tl.load(x_ptrs, mask=mask, other=0).to(ACC)
        s = _emit(spikes_ptrs, code_ptrs, mask, u, v_th, lens)


@triton.jit
def _lif_backward_kernel(grad_ptr, code_ptr, grad_x_ptr, consts_ptr, T, M, inner, last_step_offset,
                         BLOCK: tl.constexpr, ACC: tl.constexpr, OUTER: tl.constexpr):
    offs, mask = _first_step_offsets(M, inner, T, BLOCK, OUTER)
    offs += last_step_offset  # (T - 1) * inner, from the host: T and inner may arrive as compile-time constants
    grad_ptrs, code_ptrs, grad_x_ptrs = grad_ptr + offs, code_ptr + offs, grad_x_ptr + offs
    decay, height = tl.load(consts_ptr), tl.load(consts_ptr + 1)
    # -0 is the additive identity of every float (+0 is not): the last step adds nothing, as in the reference.
    carry = tl.full([BLOCK], -0.0, ACC)
    for i in range(T):  # t = T - 1 - i (a positive loop step: compiled loops count up)
        code = tl.load(code_ptrs, mask=mask, other=0)
        g = tl.where((code & 2) != 0, tl.load(grad_ptrs, mask=mask, other=0).to(ACC) * height, 0.0) + carry
        tl.store(grad_x_ptrs, _cast(g, grad_x_ptrs.dtype.element_ty), mask=mask)
        grad_ptrs, code_ptrs, grad_x_ptrs = grad_ptrs - inner, code_ptrs - inner, grad_x_ptrs - inner
        spiked_before = tl.load(code_ptrs, mask=mask & (i < T - 1), other=0) & 1
        carry = tl.where(spiked_before != 0, 0.0, g * decay)


def _time_layout(t: torch.Tensor) -> tuple[int, int, int]:
    """T, inner, outer of a dense tensor (models/csrc/lif_cpu.cpp's TimeLayout)."""
    T = t.shape[0]
    inner = t.stride(0) if T > 1 else t.numel()
    return T, inner, t.numel() // (T * inner) if T * inner else 0


def _launch(kernel, tensors, consts, like: torch.Tensor, *extra) -> None:
    acc = torch.promote_types(like.dtype, torch.float32)
    T, inner, outer = _time_layout(like)
    M = inner * outer
    if M == 0:
        return
    kernel[(triton.cdiv(M, _BLOCK),)](*tensors, _constants(tuple(consts), acc, like.device), T, M, inner, *extra,
                                      BLOCK=_BLOCK, ACC=_TL_DTYPE[acc], OUTER=outer > 1, enable_fp_fusion=False)


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
    code = torch.empty_like(spikes, dtype=torch.uint8)
    _launch(_lif_forward_kernel, (x, spikes, code), [decay, v_th, lens], x)
    return spikes, code


def lif_backward(grad_spikes: torch.Tensor, code: torch.Tensor, decay: float, lens: float) -> torch.Tensor:
    torch.ops.deepspike.lif_backward_check(grad_spikes, code, decay, lens)
    grad_x = torch.empty_like(code, dtype=grad_spikes.dtype)  # code's layout (x's), as lif_forward's
    if code.stride() != grad_x.stride():
        code = torch.empty_like(grad_x, dtype=torch.uint8).copy_(code)
    if grad_spikes.stride() != grad_x.stride():  # a copy only where autograd delivers another layout
        grad_spikes = torch.empty_like(grad_x).copy_(grad_spikes)
    T, inner, _ = _time_layout(grad_x)
    _launch(_lif_backward_kernel, (grad_spikes, code, grad_x), [decay, 1.0 / (2.0 * lens)], grad_spikes,
            (T - 1) * inner)
    return grad_x
