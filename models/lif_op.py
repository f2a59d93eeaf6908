"""torch.ops.deepspike.lif(x, decay, v_th, lens) -> (spikes, code), its backward op and lif_code_spikes.

The schemas and the CPU kernels are compiled C++ (models/csrc/lif_cpu.cpp, built into the extension module
`deepspike_ops` in site-packages by `python models/csrc/build.py`); this module loads them and registers what
torch needs around them: fake kernels (so torch.compile traces through the op without a graph break),
autograd, and the CUDA kernels, which are Triton (models/lif_triton.py, imported on the first CUDA call so
CPU-only processes never import triton).

code is what backward needs, 2 bits per neuron and step (bit 0 = the neuron spiked, bit 1 = u was inside the
surrogate window), packed 4 neurons to a byte: a contiguous uint8 tensor [outer, T, ceil(inner / 4)] in the time
layout of x (`models.code_layout`; the bit layout is described once, at TimeLayout in models/csrc/lif_cpu.cpp). The
kernels write it packed and unpack it where they read it:
  lif_backward(grad_spikes, code, stride, decay, lens)  the input gradient, in the layout `stride` (x's);
  lif_code_spikes(code, size, stride, dtype)            the spikes as a 0/1 tensor of dtype of that size and stride
                                                        (models/spike_conv.py's weight gradient); the code's rows
                                                        are laid over that tensor's memory, so it may be a dense
                                                        view of the spikes with other dims (time folded into N);
  models.code_layout.unpack_code(code, size, stride)    the uint8 code per neuron, in PyTorch ops (analysis, tests).

Arguments are checked once, in C++ (torch.ops.deepspike.lif_check / lif_backward_check / lif_code_spikes_check), by
every kernel, so a bad call raises the same error on every device and under tracing: decay in [0, 1], v_th finite,
lens finite and > 0 (ValueError); x float64, float32, bfloat16 or float16 (TypeError); x at least 1-d, [T, ...]
(ValueError); a code whose shape is not the packed code of the tensor described (ValueError).

Layout: a dense x (contiguous, channels_last or any other permutation of its dims) is read in place, and spikes,
code and the input gradient come out in its layout (torch.empty_like's); any other x is copied first.
lif_backward takes that layout as `stride` (the spikes' strides), since the packed code does not carry it.
"""

from __future__ import annotations

import importlib.util

import torch

from models.code_layout import packed_code_shape, unpack_code

try:
    import deepspike_ops  # noqa: F401  (importing it registers the ops)
except ImportError as e:
    built = importlib.util.find_spec("deepspike_ops") is not None
    raise ImportError(
        f"deepspike's compiled LIF op (module deepspike_ops) {f'does not load ({e})' if built else 'is not built'}. "
        "Build it from the checkout root with `python models/csrc/build.py` (the venv's python; `make test` and "
        "`make demo` build it too).") from e


def check_constants(decay: float, v_th: float, lens: float) -> None:
    """The op's check of its constants, for callers that hold them before any tensor (models.neuron.LIF)."""
    torch.ops.deepspike.lif_check(torch.empty(1, device="meta"), decay, v_th, lens)


@torch.library.register_fake("deepspike::lif")
def _lif_fake(x, decay, v_th, lens):
    torch.ops.deepspike.lif_check(x, decay, v_th, lens)
    spikes = torch.empty_like(x)
    return spikes, x.new_empty(packed_code_shape(spikes), dtype=torch.uint8)


@torch.library.register_fake("deepspike::lif_backward")
def _lif_backward_fake(grad_spikes, code, stride, decay, lens):
    torch.ops.deepspike.lif_backward_check(grad_spikes, code, stride, decay, lens)
    return grad_spikes.new_empty_strided(grad_spikes.shape, stride)


@torch.library.register_fake("deepspike::lif_code_spikes")
def _lif_code_spikes_fake(code, size, stride, dtype):
    torch.ops.deepspike.lif_code_spikes_check(code, size, stride, dtype)
    return code.new_empty_strided(size, stride, dtype=dtype)


def _setup_context(ctx, inputs, output):
    _, decay, _, lens = inputs
    ctx.save_for_backward(output[1])
    ctx.stride, ctx.decay, ctx.lens = output[0].stride(), decay, lens
    # code has no gradient; without this autograd would zero-fill a tensor of its size for every backward.
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_spikes, _grad_code):
    if grad_spikes is None:
        return None, None, None, None
    (code,) = ctx.saved_tensors
    return torch.ops.deepspike.lif_backward(grad_spikes, code, ctx.stride, ctx.decay, ctx.lens), None, None, None


torch.library.register_autograd("deepspike::lif", _backward, setup_context=_setup_context)


def _backward_setup_context(ctx, inputs, output):
    _, code, stride, decay, lens = inputs
    ctx.save_for_backward(code)
    ctx.stride, ctx.decay, ctx.height = stride, decay, 1.0 / (2.0 * lens)


def _backward_backward(ctx, grad_grad_x):
    """Double backward (e.g. analysis.gradnorm's J J^T v). lif_backward is linear in grad_spikes,
    grad_x = B(code) grad_spikes; this applies B^T, the same recurrence run forward in time:
    z_t = r_t + (s_{t-1} ? 0 : decay * z_{t-1}), out_t = window_t ? height * z_t : 0. It is written in PyTorch
    ops (rare, not a training path), so it is differentiable in turn."""
    (packed,) = ctx.saved_tensors
    code = unpack_code(packed, grad_grad_x.shape, ctx.stride)
    acc = torch.promote_types(grad_grad_x.dtype, torch.float32)
    out = torch.empty_like(grad_grad_x, memory_format=torch.contiguous_format)
    z = None
    for t in range(code.shape[0]):
        r = grad_grad_x[t].to(acc)
        z = r if z is None else r + torch.where((code[t - 1] & 1).bool(), 0.0, z * ctx.decay)
        out[t] = torch.where((code[t] & 2).bool(), z * ctx.height, 0.0)
    return out, None, None, None, None


torch.library.register_autograd("deepspike::lif_backward", _backward_backward, setup_context=_backward_setup_context)


@torch.library.register_kernel("deepspike::lif", "cuda")
def _lif_cuda(x, decay, v_th, lens):
    from models import lif_triton
    return lif_triton.lif_forward(x, decay, v_th, lens)


@torch.library.register_kernel("deepspike::lif_backward", "cuda")
def _lif_backward_cuda(grad_spikes, code, stride, decay, lens):
    from models import lif_triton
    return lif_triton.lif_backward(grad_spikes, code, stride, decay, lens)


@torch.library.register_kernel("deepspike::lif_code_spikes", "cuda")
def _lif_code_spikes_cuda(code, size, stride, dtype):
    from models import lif_triton
    return lif_triton.lif_code_spikes(code, size, stride, dtype)
