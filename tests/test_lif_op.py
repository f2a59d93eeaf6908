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
from models.neuron import lif_sequence_reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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
        ref_code = lif_sequence_reference(x.requires_grad_(True), *constants).grad_fn.saved_tensors[0]
        assert torch.equal(torch.ops.deepspike.lif(x, *constants)[1], ref_code)
        x = x.detach()
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
    x, grad = _inputs((3, 2, 5), dtype, device=device)
    torch.library.opcheck(torch.ops.deepspike.lif.default, (x.requires_grad_(True), 0.25, 0.5, 0.5))
    code = torch.ops.deepspike.lif(x, 0.25, 0.5, 0.5)[1]
    torch.library.opcheck(torch.ops.deepspike.lif_backward.default, (grad, code, 0.25, 0.5))


def test_fake_kernel_shapes_under_meta():
    spikes, code = torch.ops.deepspike.lif(torch.empty(4, 2, 3, device="meta", dtype=torch.bfloat16), 0.25, 0.5, 0.5)
    assert (spikes.shape, spikes.dtype, code.dtype) == ((4, 2, 3), torch.bfloat16, torch.uint8)


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
    from models.neuron import lif_sequence_reference
    from tests.test_lif_op import (CONSTANTS, DTYPES, SHAPES, _bits, _inputs, _layouts, _nan_inputs, _nan_semantics,
                                   _run)

    def bitwise(a, b):
        return torch.equal(_bits(a), _bits(b))

    for dtype in DTYPES:
        for shape in SHAPES + [(3, 1100)]:  # two kernel blocks
            x, grad = _inputs(shape, dtype, contiguous=False)
            for constants in CONSTANTS:
                ref_spikes, ref_gx = _run(lif_sequence_reference, x, grad, constants)
                ref_code = lif_sequence_reference(x.clone().requires_grad_(True), *constants).grad_fn.saved_tensors[0]
                spikes, code = lif_triton.lif_forward(x, *constants)
                gx = lif_triton.lif_backward(grad, code, constants[0], constants[2])
                assert bitwise(spikes, ref_spikes), (dtype, shape, constants, "spikes")
                assert torch.equal(code, ref_code), (dtype, shape, constants, "code")
                assert bitwise(gx, ref_gx), (dtype, shape, constants, "grad", (gx - ref_gx).abs().max())
        x, grad = _nan_inputs(dtype)
        for constants in CONSTANTS:
            ref_spikes, ref_gx = _run(lif_sequence_reference, x, grad, constants)
            spikes, code = lif_triton.lif_forward(x, *constants)
            gx = lif_triton.lif_backward(grad, code, constants[0], constants[2])
            _nan_semantics(spikes)
            assert torch.equal(spikes.nan_to_num(2.0), ref_spikes.nan_to_num(2.0)), (dtype, constants, "nan")
            assert bitwise(gx, ref_gx), (dtype, constants, "nan grad")
        for name, (x, grad) in _layouts(dtype):
            spikes, code = lif_triton.lif_forward(x, *CONSTANTS[1])
            ref_spikes, ref_code = lif_triton.lif_forward(x.contiguous(), *CONSTANTS[1])
            assert spikes.stride() == code.stride() == x.stride(), (dtype, name)
            assert bitwise(spikes, ref_spikes) and torch.equal(code, ref_code), (dtype, name)
            for g in (grad, grad.contiguous()):
                gx = lif_triton.lif_backward(g, code, CONSTANTS[1][0], CONSTANTS[1][2])
                ref_gx = lif_triton.lif_backward(grad.contiguous(), ref_code, CONSTANTS[1][0], CONSTANTS[1][2])
                assert gx.stride() == x.stride() and bitwise(gx, ref_gx), (dtype, name, "grad")
    print("triton ok")
""")


def test_triton_kernel_equals_reference_under_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=ROOT)
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
        for op, args in ((lif, (x, decay, v_th, lens)),
                         (lif_backward, (x, torch.zeros(shape, dtype=torch.uint8), decay, lens))):
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
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=ROOT)
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
        ref_code = lif_sequence_reference(x.clone().requires_grad_(True), *constants).grad_fn.saved_tensors[0]
        assert torch.equal(torch.ops.deepspike.lif(x, *constants)[1], ref_code)
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
        assert spikes.stride() == code.stride() == x.stride(), name
        ref_spikes, ref_code = torch.ops.deepspike.lif(x.contiguous(), *CONSTANTS[1])
        assert torch.equal(_bits(spikes), _bits(ref_spikes)) and torch.equal(code, ref_code), name
        assert 0.05 < float(spikes.float().mean()) < 0.95
        gx = torch.ops.deepspike.lif_backward(grad, code, CONSTANTS[1][0], CONSTANTS[1][2])
        assert gx.stride() == x.stride(), name
        ref_gx = torch.ops.deepspike.lif_backward(grad.contiguous(), ref_code, CONSTANTS[1][0], CONSTANTS[1][2])
        assert torch.equal(_bits(gx), _bits(ref_gx)), name
        other = torch.ops.deepspike.lif_backward(grad.contiguous(), code, CONSTANTS[1][0], CONSTANTS[1][2])
        assert torch.equal(_bits(other), _bits(ref_gx)), name
        assert torch.equal(_bits(_run(lif_sequence, x, grad, CONSTANTS[1])[1]), _bits(ref_gx)), name
        if device.type == "cpu":
            assert _copies(torch.ops.deepspike.lif, x, *CONSTANTS[1]) == 0, name
            assert _copies(torch.ops.deepspike.lif_backward, grad, code, CONSTANTS[1][0], 0.35) == 0, name
    strided = torch.ones(4, 6)[:, ::2]  # not dense: copied once
    assert _copies(torch.ops.deepspike.lif, strided, *CONSTANTS[1]) == 1
