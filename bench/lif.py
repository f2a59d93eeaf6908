"""Per-kernel timing of the LIF: forward and backward ms of torch.ops.deepspike.lif on the input of a model's
first LIF, against the PyTorch reference loop and SpikingJelly's LIFNode (used by bench.models and bench.gpu_check).

SpikingJelly's fused CUDA kernels do not take a rectangular surrogate (ours, the authors'): with surrogate.Rect
its LIFNode runs its Torch reference loop, on CPU always. On CUDA the timing adds LIFNode with surrogate.Sigmoid,
which its fused kernels do run: a different surrogate, timed only as the fastest LIF SpikingJelly has.
"""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Callable

import torch

from models import LIF, create_model, lif_sequence
from models.neuron import lif_sequence_reference


def first_lif_input_shape(model: str, num_classes: int, T: int, batch: int, size: int) -> tuple[int, ...]:
    """[T, N, C, H, W] entering the model's first LIF (its largest), from a forward on the meta device."""
    shapes = []
    with torch.device("meta"), torch.no_grad():
        net = create_model(model, num_classes=num_classes, T=T)
        lif = next(m for m in net.modules() if isinstance(m, LIF))
        lif.register_forward_pre_hook(lambda _m, inputs: shapes.append(tuple(inputs[0].shape)))
        net(torch.empty(batch, 3, size, size))
    return shapes[0]


def _implementations(device: torch.device) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    from spikingjelly.activation_based import functional, surrogate

    from bench.peers import spikingjelly_lif

    def stateful(node):
        node = node.to(device)

        def run(x):
            functional.reset_net(node)
            return node(x)
        return run

    impls = {"deepspike op": lif_sequence, "reference (PyTorch loop)": lif_sequence_reference,
             "SpikingJelly LIFNode, Rect": stateful(spikingjelly_lif(LIF()))}
    if device.type == "cuda":
        sigmoid = spikingjelly_lif(LIF())
        sigmoid.surrogate_function = surrogate.Sigmoid()
        impls["SpikingJelly LIFNode, Sigmoid (fused)"] = stateful(sigmoid)
        if importlib.util.find_spec("cupy") is not None:  # its CuPy kernels, where CuPy is installed
            cupy = spikingjelly_lif(LIF())
            cupy.surrogate_function, cupy.backend = surrogate.Sigmoid(), "cupy"
            impls["SpikingJelly LIFNode, Sigmoid (CuPy)"] = stateful(cupy)
    return impls


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_lif(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, reps: int = 20) -> dict[str, tuple]:
    """{implementation: (forward ms, backward ms)}, the fastest of `reps` runs each."""
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=g) * 0.6 + 0.3).to(device, dtype).requires_grad_(True)
    grad = torch.randn(shape, generator=g).to(device, dtype)
    out = {}
    for name, fn in _implementations(device).items():
        fwd, bwd = [], []
        for _ in range(reps + 3):  # the first runs warm up (autograd registration, allocator, Triton compilation)
            _sync(device)
            t0 = time.perf_counter()
            spikes = fn(x)
            _sync(device)
            t1 = time.perf_counter()
            spikes.backward(grad)
            _sync(device)
            fwd.append(t1 - t0)
            bwd.append(time.perf_counter() - t1)
            x.grad = None
        out[name] = (1e3 * min(fwd[3:]), 1e3 * min(bwd[3:]))
    return out


def report(shape: tuple[int, ...], dtype: torch.dtype, timings: dict[str, tuple]) -> list[str]:
    ours = sum(timings["deepspike op"])
    lines = [f"   LIF {list(shape)} {str(dtype).removeprefix('torch.')}: forward + backward ms "
             f"(deepspike op's speed-up on fwd+bwd)"]
    for name, (f, b) in timings.items():
        ratio = "" if name == "deepspike op" else f"  {(f + b) / ours:6.1f}x"
        lines.append(f"     {name:<40}{f:9.2f} +{b:9.2f}{ratio}")
    return lines
