"""torch.ops.deepspike.lif against the PyTorch reference (models.neuron.lif_sequence_reference), bit for bit.

The C++ CPU kernel runs in-process; the Triton (CUDA) kernel runs on CPU tensors under the Triton interpreter,
in a subprocess because TRITON_INTERPRET must be set before triton is imported, and, where there is a GPU
(bench/gpu_check.sh), compiled on CUDA tensors in the tests taking `device`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from models import create_model, lif_sequence
from models.code_layout import packed_code_shape, unpack_code
from models.neuron import lif_sequence_reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The subprocesses import this checkout's models, and deepspike_ops from wherever this process finds it (a private
# build on PYTHONPATH included).
SUBPROCESS_PATH = os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(1, 7), (2, 3, 5), (6, 2, 3, 5, 7), (6, 1031)]  # T = 1, 2, 6; odd sizes; a partial kernel block
# The authors' constants (docs/model.md §2), and ones no binary float represents exactly.
CONSTANTS = [(0.25, 0.5, 0.5), (0.3, 0.45, 0.35)]


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits, so that -0 and +0 (or two NaNs) count as different."""
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def _inputs(shape, dtype, seed=0, contiguous=True, device="cpu"):
    g = torch.Generator().manual_seed(seed)  # drawn on the CPU: the same numbers on every device
    wide = (*shape[:-1], 2 * shape[-1])  # non-contiguous: every other element of a wider tensor
    x = (torch.randn(wide, dtype=torch.float64, generator=g) * 0.6 + 0.3).to(device, dtype)
    grad = torch.randn(wide, dtype=torch.float64, generator=g).to(device, dtype)
    return (x[..., ::2], grad[..., ::2]) if not contiguous else (x[..., ::2].contiguous(), grad[..., ::2].contiguous())


def _code(x, constants) -> torch.Tensor:
    """The op's packed code for x, unpacked to one uint8 per neuron in x's shape."""
    spikes, code = torch.ops.deepspike.lif(x, *constants)
    return unpack_code(code, spikes.shape, spikes.stride())


def _ref_code(x, constants) -> torch.Tensor:
    """The uint8 code the PyTorch reference saves for backward."""
    return lif_sequence_reference(x.detach().clone().requires_grad_(True), *constants).grad_fn.saved_tensors[0]


def _run(fn, x, grad, constants):
    x = x.detach().clone().requires_grad_(True)
    spikes = fn(x, *constants)
    spikes.backward(grad)
    return spikes.detach(), x.grad


@pytest.mark.parametrize("contiguous", [True, False])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_op_equals_reference_bit_for_bit(dtype, shape, contiguous, device, one_thread):
    """Spikes, code and input gradients; low-precision inputs against the reference on the same input."""
    x, grad = _inputs(shape, dtype, contiguous=contiguous, device=device)
    assert x.is_contiguous() == contiguous
    for constants in CONSTANTS:
        spikes, gx = _run(lif_sequence, x, grad, constants)
        ref_spikes, ref_gx = _run(lif_sequence_reference, x, grad, constants)
        assert spikes.dtype == gx.dtype == dtype
        assert torch.equal(_bits(spikes), _bits(ref_spikes))
        assert torch.equal(_bits(gx), _bits(ref_gx)), f"max |diff| {(gx - ref_gx).abs().max()}"
        ref_code = _ref_code(x, constants)
        assert torch.equal(_code(x, constants), ref_code)
    if shape[0] > 1:  # the comparison covers spikes, silence, the window and the reset
        assert 0.1 < float(spikes.double().mean()) < 0.9
        assert (ref_code == 3).any() and (ref_code == 2).any() and (ref_code == 0).any()


def test_gradient_of_a_silent_last_step_keeps_the_sign_of_zero(device, one_thread):
    """The last step adds no carry: a -0 gradient stays -0, as in the reference (an added +0 would flip it)."""
    x = torch.tensor([[0.7], [0.6]], device=device)  # u = 0.7, 0.6: both inside the window
    grad = torch.tensor([[1.0], [-0.0]], device=device)
    gx = _run(lif_sequence, x, grad, CONSTANTS[0])[1]
    assert torch.equal(_bits(gx), _bits(_run(lif_sequence_reference, x, grad, CONSTANTS[0])[1]))
    assert str(gx[1, 0].item()) == "-0.0"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(dtype, device, one_thread):
    """Schema, fake (meta) kernels, autograd registration and dispatch, as torch.library checks them."""
    for x, grad in [_inputs((3, 2, 5), dtype, device=device), next(_layouts(dtype, device))[1]]:
        torch.library.opcheck(torch.ops.deepspike.lif.default, (x.requires_grad_(True), 0.25, 0.5, 0.5))
        spikes, code = torch.ops.deepspike.lif(x, 0.25, 0.5, 0.5)
        torch.library.opcheck(torch.ops.deepspike.lif_backward.default, (grad, code, spikes.stride(), 0.25, 0.5))
        folded = spikes.flatten(0, 1)
        torch.library.opcheck(torch.ops.deepspike.lif_code_spikes.default,
                              (code, folded.shape, folded.stride(), dtype))


def test_fake_kernel_shapes_under_meta():
    x = torch.empty(4, 2, 3, device="meta", dtype=torch.bfloat16)
    spikes, code = torch.ops.deepspike.lif(x, 0.25, 0.5, 0.5)
    assert (spikes.shape, spikes.dtype, code.shape, code.dtype) == ((4, 2, 3), torch.bfloat16, (1, 4, 2), torch.uint8)
    innermost = torch.empty(2, 3, 4, device="meta").permute(2, 0, 1)  # time innermost: 6 rows of 1 neuron
    spikes, code = torch.ops.deepspike.lif(innermost, 0.25, 0.5, 0.5)
    assert (spikes.stride(), code.shape) == ((1, 12, 4), (6, 4, 1))
    gx = torch.ops.deepspike.lif_backward(spikes.contiguous().bfloat16(), code, (1, 12, 4), 0.25, 0.5)
    assert (gx.shape, gx.stride(), gx.dtype) == ((4, 2, 3), (1, 12, 4), torch.bfloat16)
    s = torch.ops.deepspike.lif_code_spikes(code, (8, 3), (3, 1), torch.float32)
    assert (s.shape, s.stride(), s.dtype) == ((8, 3), (3, 1), torch.float32)


@pytest.mark.parametrize("shape, layout", [((6, 1031), "contiguous"), ((1, 7), "contiguous"), ((3, 2, 5), "contiguous"),
                                           ((4, 2, 3, 5, 6), "channels_last"), ((4, 2, 3, 5), "time inside"),
                                           ((4, 3, 5), "time innermost")])
def test_code_is_packed_two_bits_per_neuron_with_zero_padding(shape, layout, one_thread):
    """[outer, T, ceil(inner / 4)] bytes: a quarter of a byte per neuron, plus at most 3 padding slots per row,
    which hold zeros (the bytes are a function of x alone)."""
    x = _inputs(shape, torch.float32)[0]
    if layout == "channels_last":
        x = x.flatten(0, 1).contiguous(memory_format=torch.channels_last).unflatten(0, shape[:2])
    elif layout == "time inside":
        x = x.transpose(0, 1).contiguous().transpose(0, 1)
    elif layout == "time innermost":
        x = x.permute(1, 2, 0).contiguous().permute(2, 0, 1)
    spikes, code = torch.ops.deepspike.lif(x, *CONSTANTS[1])
    T, inner, outer = shape[0], (x.stride(0) if shape[0] > 1 else x.numel()), 1
    if layout == "time inside":
        inner, outer = shape[2] * shape[3], shape[1]
    elif layout == "time innermost":
        inner, outer = 1, shape[1] * shape[2]
    assert code.dtype == torch.uint8 and code.is_contiguous()
    assert code.shape == packed_code_shape(spikes) == (outer, T, -(-inner // 4))
    assert x.numel() / 4 <= code.numel() <= x.numel() / 4 + 3 * outer * T
    assert code.untyped_storage().nbytes() == code.numel()
    if inner % 4:
        pad_bits = 2 * (4 - inner % 4)
        assert not (code[..., -1] >> (8 - pad_bits)).any()
    assert torch.equal(_code(x, CONSTANTS[1]), _ref_code(x, CONSTANTS[1]))


def test_whole_ms_resnet_traces_through_the_op_without_graph_breaks(one_thread):
    """fullgraph=True under aot_eager: the op (forward and backward) is traced into one graph through its fake
    kernels and autograd registration; the graph runs the same kernels, so output and gradients are equal."""
    torch.manual_seed(0)
    model = create_model("ms_resnet20", T=3, widths=(4, 8, 8)).train()
    for m in model.modules():  # non-zero last BNs, so every LIF sees input and passes gradient
        if isinstance(m, torch.nn.BatchNorm2d):
            torch.nn.init.uniform_(m.weight, 0.3, 0.8)
    x = torch.randn(2, 3, 8, 8)
    results = []
    for fn in (model, torch.compile(model, fullgraph=True, backend="aot_eager")):
        model.zero_grad(set_to_none=True)
        out = fn(x)
        out.square().sum().backward()
        results.append((out.detach(), [p.grad.clone() for p in model.parameters()]))
    (out_e, grads_e), (out_c, grads_c) = results
    assert torch.equal(out_e, out_c)
    assert all(torch.equal(a, b) for a, b in zip(grads_e, grads_c))
    assert all(g.abs().sum() > 0 for g in grads_e)


TRITON_CHECK = textwrap.dedent("""
    import torch
    from models import lif_triton
    from models.code_layout import unpack_code
    from models.neuron import lif_sequence_reference
    from tests.test_lif_op import (CONSTANTS, DTYPES, SHAPES, _bits, _inputs, _layouts, _nan_inputs, _nan_semantics,
                                   _ref_code, _run)

    def bitwise(a, b):
        return torch.equal(_bits(a), _bits(b))

    def unpacked(spikes, code):
        return unpack_code(code, spikes.shape, spikes.stride())

    def spikes_of_code(spikes, code):  # as models/spike_conv.py reads them: time folded into the batch, where a view
        folded = spikes.flatten(0, 1) if spikes.dim() > 1 else spikes
        folded = folded if folded.data_ptr() == spikes.data_ptr() else spikes
        return lif_triton.lif_code_spikes(code, folded.shape, folded.stride(), spikes.dtype).view(spikes.shape)

    for dtype in DTYPES:
        for shape in SHAPES + [(3, 1100), (2, 4, 1030)]:  # two kernel blocks; rows of 1030 neurons across blocks
            x, grad = _inputs(shape, dtype, contiguous=False)
            for constants in CONSTANTS:
                ref_spikes, ref_gx = _run(lif_sequence_reference, x, grad, constants)
                spikes, code = lif_triton.lif_forward(x, *constants)
                gx = lif_triton.lif_backward(grad, code, spikes.stride(), constants[0], constants[2])
                assert bitwise(spikes, ref_spikes), (dtype, shape, constants, "spikes")
                assert torch.equal(code, torch.ops.deepspike.lif(x, *constants)[1]), (dtype, shape, "packed bytes")
                assert torch.equal(unpacked(spikes, code), _ref_code(x, constants)), (dtype, shape, constants, "code")
                assert bitwise(gx, ref_gx), (dtype, shape, constants, "grad", (gx - ref_gx).abs().max())
                assert bitwise(spikes_of_code(spikes, code), spikes), (dtype, shape, constants, "code spikes")
        x, grad = _nan_inputs(dtype)
        for constants in CONSTANTS:
            ref_spikes, ref_gx = _run(lif_sequence_reference, x, grad, constants)
            spikes, code = lif_triton.lif_forward(x, *constants)
            gx = lif_triton.lif_backward(grad, code, spikes.stride(), constants[0], constants[2])
            _nan_semantics(spikes)
            assert torch.equal(spikes.nan_to_num(2.0), ref_spikes.nan_to_num(2.0)), (dtype, constants, "nan")
            assert torch.equal(unpacked(spikes, code), _ref_code(x, constants)), (dtype, constants, "nan code")
            assert bitwise(gx, ref_gx), (dtype, constants, "nan grad")
        for name, (x, grad) in _layouts(dtype):
            spikes, code = lif_triton.lif_forward(x, *CONSTANTS[1])
            ref_spikes, ref_code = lif_triton.lif_forward(x.contiguous(), *CONSTANTS[1])
            assert spikes.stride() == x.stride(), (dtype, name)
            assert torch.equal(code, torch.ops.deepspike.lif(x, *CONSTANTS[1])[1]), (dtype, name, "packed bytes")
            assert bitwise(spikes, ref_spikes), (dtype, name)
            assert torch.equal(unpacked(spikes, code), unpacked(ref_spikes, ref_code)), (dtype, name)
            assert bitwise(spikes_of_code(spikes, code), spikes), (dtype, name, "code spikes")
            for g in (grad, grad.contiguous()):
                gx = lif_triton.lif_backward(g, code, spikes.stride(), CONSTANTS[1][0], CONSTANTS[1][2])
                ref_gx = lif_triton.lif_backward(grad.contiguous(), ref_code, ref_spikes.stride(), CONSTANTS[1][0],
                                                 CONSTANTS[1][2])
                assert gx.stride() == x.stride() and bitwise(gx, ref_gx), (dtype, name, "grad")
    print("triton ok")
""")


def test_triton_kernel_equals_reference_under_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=SUBPROCESS_PATH)
    proc = subprocess.run([sys.executable, "-c", TRITON_CHECK], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600, check=False)
    assert proc.returncode == 0 and "triton ok" in proc.stdout, proc.stderr[-3000:]


def test_missing_compiled_op_says_how_to_build_it():
    code = "import sys; sys.modules['deepspike_ops'] = None; import models"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT),
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode != 0
    assert "ImportError" in proc.stderr and "python models/csrc/build.py" in proc.stderr


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_double_backward_equals_reference(dtype, device, one_thread):
    """J J^T v through a double backward, as analysis.gradnorm computes it."""
    x, v = _inputs((6, 3, 41), dtype, device=device)
    u = _inputs((6, 3, 41), dtype, seed=1, device=device)[1]
    results = []
    for fn in (lif_sequence, lif_sequence_reference):
        xr = x.clone().requires_grad_(True)
        y = fn(xr, *CONSTANTS[1])
        w = torch.zeros_like(y, requires_grad=True)
        (jt_w,) = torch.autograd.grad(y, xr, w, create_graph=True)
        (jt_v,) = torch.autograd.grad(y, xr, v, retain_graph=True)
        (j_jt_v,) = torch.autograd.grad(jt_w, w, jt_v, retain_graph=True)
        (j_u,) = torch.autograd.grad(jt_w, w, u)
        results.append((j_jt_v, j_u))
    for ours, ref in zip(*results):
        torch.testing.assert_close(ours, ref, rtol=1e-12 if dtype == torch.float64 else 1e-6, atol=0)
        assert ours.abs().sum() > 0


# (x, decay, v_th, lens) the op refuses, and the exception and message fragment both device paths raise.
BAD_CALLS = {
    "lens 0": ((3, 4), torch.float32, (0.25, 0.5, 0.0), ValueError, "lens"),
    "lens < 0": ((3, 4), torch.float32, (0.25, 0.5, -0.5), ValueError, "lens"),
    "lens nan": ((3, 4), torch.float32, (0.25, 0.5, float("nan")), ValueError, "lens"),
    "lens inf": ((3, 4), torch.float32, (0.25, 0.5, float("inf")), ValueError, "lens"),
    "decay < 0": ((3, 4), torch.float32, (-0.1, 0.5, 0.5), ValueError, "decay"),
    "decay > 1": ((3, 4), torch.float32, (1.5, 0.5, 0.5), ValueError, "decay"),
    "decay nan": ((3, 4), torch.float32, (float("nan"), 0.5, 0.5), ValueError, "decay"),
    "v_th nan": ((3, 4), torch.float32, (0.25, float("nan"), 0.5), ValueError, "v_th"),
    "v_th inf": ((3, 4), torch.float32, (0.25, float("inf"), 0.5), ValueError, "v_th"),
    "int64": ((3, 4), torch.int64, (0.25, 0.5, 0.5), TypeError, "floating"),
    "uint8": ((3, 4), torch.uint8, (0.25, 0.5, 0.5), TypeError, "floating"),
    "bool": ((3, 4), torch.bool, (0.25, 0.5, 0.5), TypeError, "floating"),
    "0-d": ((), torch.float32, (0.25, 0.5, 0.5), ValueError, "0-d"),
}


def _bad_call_errors(lif, lif_backward) -> dict[str, tuple[str, str, str, str]]:
    """What each BAD_CALLS entry raises through `lif` and `lif_backward`: (type, message) of each."""
    seen = {}
    for name, (shape, dtype, (decay, v_th, lens), _, _) in BAD_CALLS.items():
        x = torch.zeros(shape, dtype=dtype)
        row = []
        code = torch.zeros(packed_code_shape(x) if x.dim() else (1,), dtype=torch.uint8)
        for op, args in ((lif, (x, decay, v_th, lens)), (lif_backward, (x, code, x.stride(), decay, lens))):
            try:
                op(*args)
                row += ["no error", ""]
            except Exception as e:  # noqa: BLE001  (the test records whatever escapes)
                row += [type(e).__name__, str(e).splitlines()[0]]
        seen[name] = tuple(row)
    return seen


def test_op_validates_its_arguments_on_every_path():
    """The op's own checks (not only LIF.__init__'s): lif_sequence, the registered op, its backward op and
    the fake kernel all refuse bad constants, non-float dtypes and 0-d input with the same error."""
    seen = _bad_call_errors(torch.ops.deepspike.lif, torch.ops.deepspike.lif_backward)
    for name, (shape, dtype, constants, exc, fragment) in BAD_CALLS.items():
        fwd_type, fwd_msg, bwd_type, bwd_msg = seen[name]
        assert fwd_type == exc.__name__ and fragment in fwd_msg, (name, seen[name])
        if name != "v_th nan" and name != "v_th inf":  # lif_backward takes no v_th
            assert bwd_type == exc.__name__ and fragment in bwd_msg, (name, seen[name])
        with pytest.raises(exc, match=fragment):
            lif_sequence(torch.zeros(shape, dtype=dtype), *constants)
        with pytest.raises(exc, match=fragment):  # traced code (torch.compile) meets the same check
            torch.ops.deepspike.lif(torch.zeros(shape, dtype=dtype, device="meta"), *constants)


BAD_CALLS_TRITON = textwrap.dedent("""
    import json
    from models import lif_triton
    from tests.test_lif_op import _bad_call_errors
    print(json.dumps(_bad_call_errors(lif_triton.lif_forward, lif_triton.lif_backward)))
""")


def test_triton_path_raises_the_same_errors_as_the_cpu_kernel():
    """The CUDA kernels (Triton, run here by the interpreter) refuse exactly what the CPU kernel refuses."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=SUBPROCESS_PATH)
    proc = subprocess.run([sys.executable, "-c", BAD_CALLS_TRITON], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    triton_seen = {k: tuple(v) for k, v in json.loads(proc.stdout.splitlines()[-1]).items()}
    assert triton_seen == _bad_call_errors(torch.ops.deepspike.lif, torch.ops.deepspike.lif_backward)


def _nan_inputs(dtype, device="cpu"):
    """Currents that fire, with NaN at step 1 of neuron 3 and at step 0 of neuron 5."""
    x, grad = _inputs((5, 2, 9), dtype, seed=3, device=device)
    x[1, 0, 3] = x[0, 1, 5] = float("nan")
    return x, grad


def _nan_semantics(spikes: torch.Tensor) -> None:
    nan = spikes.isnan()
    expected = torch.zeros_like(nan)
    expected[1:, 0, 3] = expected[:, 1, 5] = True  # from the NaN's step to the end of the sequence
    assert torch.equal(nan, expected)
    assert ((spikes[~nan] == 0) | (spikes[~nan] == 1)).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_input_gives_nan_spikes_for_the_rest_of_the_sequence(dtype, device, one_thread):
    """A NaN current makes that neuron's membrane NaN, and its spikes NaN from then on (not silence), so the
    NaN reaches the loss; the kernel agrees with the reference on spikes, code and gradients."""
    x, grad = _nan_inputs(dtype, device)
    for constants in CONSTANTS:
        spikes, gx = _run(lif_sequence, x, grad, constants)
        ref_spikes, ref_gx = _run(lif_sequence_reference, x, grad, constants)
        _nan_semantics(spikes)
        _nan_semantics(ref_spikes)
        assert torch.equal(spikes.nan_to_num(2.0), ref_spikes.nan_to_num(2.0))
        assert torch.equal(_bits(gx), _bits(ref_gx))
        assert torch.equal(_code(x, constants), _ref_code(x, constants))
    assert 0.05 < float(spikes.nan_to_num(0.0).double().mean()) < 0.95


def _layouts(dtype, device="cpu"):
    """Dense, non-contiguous [T, ...] tensors: a channels_last conv output unfolded to [T, N, C, H, W], time
    inside the batch dim (outer > 1) and time as the innermost dim (inner = 1); input and gradient alike."""
    g = torch.Generator().manual_seed(5)

    def draw(shape, scale, shift):
        return (torch.randn(shape, dtype=torch.float64, generator=g) * scale + shift).to(device, dtype)

    T, N, C, H, W = 4, 2, 3, 5, 6
    cl = torch.channels_last
    yield "channels_last", [draw((T * N, C, H, W), s, b).contiguous(memory_format=cl).unflatten(0, (T, N))
                            for s, b in ((0.6, 0.3), (1.0, 0.0))]
    yield "time inside", [draw((N, T, C * H), s, b).transpose(0, 1) for s, b in ((0.6, 0.3), (1.0, 0.0))]
    yield "time innermost", [draw((N, C, T), s, b).permute(2, 0, 1) for s, b in ((0.6, 0.3), (1.0, 0.0))]


def _copies(op, *args) -> int:
    """How many copies op(*args) makes, as the profiler records them."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        op(*args)
    return sum(e.name in ("aten::copy_", "aten::clone", "aten::contiguous") for e in prof.events())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dense_layouts_are_read_in_place_and_give_the_same_bits(dtype, device, one_thread):
    """channels_last and any other dense layout: no copy, spikes, code and input gradient in x's layout, and the
    same bits as on the contiguous tensor; a gradient delivered in another layout is accepted."""
    for name, (x, grad) in _layouts(dtype, device):
        assert not x.is_contiguous() and x.stride() == grad.stride(), name
        spikes, code = torch.ops.deepspike.lif(x, *CONSTANTS[1])
        assert spikes.stride() == x.stride(), name
        ref_spikes, ref_code = torch.ops.deepspike.lif(x.contiguous(), *CONSTANTS[1])
        assert torch.equal(_bits(spikes), _bits(ref_spikes)), name
        assert torch.equal(unpack_code(code, x.shape, x.stride()), unpack_code(ref_code, x.shape, ref_spikes.stride()))
        assert 0.05 < float(spikes.float().mean()) < 0.95
        gx = torch.ops.deepspike.lif_backward(grad, code, x.stride(), CONSTANTS[1][0], CONSTANTS[1][2])
        assert gx.stride() == x.stride(), name
        ref_gx = torch.ops.deepspike.lif_backward(grad.contiguous(), ref_code, ref_spikes.stride(), CONSTANTS[1][0],
                                                  CONSTANTS[1][2])
        assert torch.equal(_bits(gx), _bits(ref_gx)), name
        other = torch.ops.deepspike.lif_backward(grad.contiguous(), code, x.stride(), CONSTANTS[1][0], CONSTANTS[1][2])
        assert torch.equal(_bits(other), _bits(ref_gx)), name
        assert torch.equal(_bits(_run(lif_sequence, x, grad, CONSTANTS[1])[1]), _bits(ref_gx)), name
        if device.type == "cpu":
            assert _copies(torch.ops.deepspike.lif, x, *CONSTANTS[1]) == 0, name
            assert _copies(torch.ops.deepspike.lif_backward, grad, code, x.stride(), CONSTANTS[1][0], 0.35) == 0, name
    strided = torch.ones(4, 6)[:, ::2]  # not dense: copied once
    assert _copies(torch.ops.deepspike.lif, strided, *CONSTANTS[1]) == 1


@pytest.mark.parametrize("dtype", DTYPES)
def test_code_spikes_unpack_to_the_spikes_in_the_layout_asked_for(dtype, device, one_thread):
    """lif_code_spikes: the spike bit as a 0/1 tensor of the conv's dtype, in the strides asked for, over the
    spikes' memory seen with time folded into the batch (rows whose size is not a multiple of 4 included)."""
    for name, (x, _) in [("contiguous", _inputs((3, 2, 3, 5, 7), dtype, device=device)), *_layouts(dtype, device)]:
        spikes, code = torch.ops.deepspike.lif(x, *CONSTANTS[1])
        folded = spikes.flatten(0, 1)
        for view in (spikes, folded) if folded.data_ptr() == spikes.data_ptr() else (spikes,):  # (time inside: a copy)
            for out_dtype in (dtype, torch.float32):
                out = torch.ops.deepspike.lif_code_spikes(code, view.shape, view.stride(), out_dtype)
                assert out.stride() == view.stride() and out.dtype == out_dtype, name
                assert torch.equal(_bits(out), _bits(view.to(out_dtype))), name


def test_code_spikes_and_backward_refuse_a_code_of_another_tensor():
    spikes, code = torch.ops.deepspike.lif(torch.randn(3, 2, 5), *CONSTANTS[1])
    with pytest.raises(ValueError, match="not the packed code"):
        torch.ops.deepspike.lif_code_spikes(code, (3, 2, 7), (14, 7, 1), torch.float32)  # 14 neurons a row, not 10
    with pytest.raises(ValueError, match="not a dense layout"):
        torch.ops.deepspike.lif_code_spikes(code, (3, 2, 5), (10, 5, 2), torch.float32)
    with pytest.raises(TypeError, match="dtype"):
        torch.ops.deepspike.lif_code_spikes(code, (3, 2, 5), (10, 5, 1), torch.int32)
    with pytest.raises(ValueError, match="code has shape"):
        torch.ops.deepspike.lif_backward(spikes, code, (1, 15, 3), *CONSTANTS[1][::2])  # time innermost: 15 rows
    with pytest.raises(ValueError, match="not a dense layout"):
        torch.ops.deepspike.lif_backward(spikes, code, (10, 5, 2), *CONSTANTS[1][::2])
    with pytest.raises(TypeError, match="uint8"):
        torch.ops.deepspike.lif_backward(spikes, code.float(), spikes.stride(), *CONSTANTS[1][::2])


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_spike_conv_from_the_code_equals_a_plain_conv_on_the_spikes(precision, device, one_thread):
    """SpikeConv2d handed the LIF's packed code: output, input and weight gradients bit for bit those of a plain
    conv on the spikes (time folded as models.blocks does, channels_last and an odd width included)."""
    from models.blocks import folded
    from models.spike_conv import SpikeConv2d

    torch.manual_seed(0)
    conv = SpikeConv2d(3, 4, 3, stride=2, padding=1).to(device)
    g = torch.Generator().manual_seed(7)
    for memory_format in (torch.contiguous_format, torch.channels_last):
        x = (torch.randn(6, 3, 7, 9, generator=g) * 0.6 + 0.3).to(device).contiguous(memory_format=memory_format)
        x = x.unflatten(0, (3, 2)).requires_grad_(True)
        results = []
        for use_code in (True, False):
            conv.zero_grad(set_to_none=True)
            x.grad = None
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                spikes, code = torch.ops.deepspike.lif(x, *CONSTANTS[0])
                if use_code:  # the code folded alongside, as models/blocks.py passes it
                    out = folded(conv, spikes, code)
                else:
                    out = folded(lambda s: torch.nn.functional.conv2d(s, conv.weight, None, 2, 1), spikes)
            out.float().square().sum().backward()
            results.append((out, x.grad, conv.weight.grad))
        for a, b in zip(*results):
            assert torch.equal(_bits(a), _bits(b)), memory_format
        assert results[0][2].abs().sum() > 0
