"""How many images fit on one GPU for each activation-checkpointing setting, from measured memory.

    python -m bench.max_batch --model ms_resnet104 --T 6 --size 224 --gpu-mem 80
    python -m bench.max_batch --model ms_resnet482 --T 6 --size 32 --gpu-mem 80 --calib-size 16 --validate

Settings (`--settings`): `none`; `k` = checkpoint every k-th residual block; `kxs` = every k-th segment
of s consecutive blocks (engine.activation_checkpointing=k, engine.activation_checkpointing_segment=s).

Model of a training step's peak memory, per setting:

    peak(batch, res) = fixed + batch * per_image(calib_res) * (res / calib_res)^2

`fixed` (weights, gradients, momentum, workspace) does not grow with the batch; activations grow with
the batch and, in a conv net, with the number of pixels. Both terms are fitted on this machine from two
measured training steps (batch 1 and 2 at the small calibration resolution, bf16 autocast, SGD), then
the planner solves for the largest batch whose peak stays under `gpu_mem - reserve`. Memory is
measured as the CUDA caching allocator's peak reservation on a GPU, and as the growth of the process's
peak resident set on a CPU. `--validate` measures held-out points (2x the calibration resolution,
batches 2 and 4) and prints the prediction error; on a GPU it also finds the largest batch that really
fits under `--cap-gib` at that resolution and compares it with the prediction.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models import create_model
from trainer.wrap import apply_activation_checkpointing

GiB = 2**30


@dataclass
class StepStats:
    step_s: float
    """Median wall time of the timed steps (nan with steps=0)."""
    cpu_s: float
    """Median CPU time of this process (all threads) per timed step: on a shared CPU machine it is the
    figure that does not depend on what else runs."""
    peak_bytes: int
    """Peak memory of one step above the memory held before it (weights and optimizer state)."""
    base_bytes: int
    """Memory held before the step (weights, momentum; gradients freed)."""


def _rss_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} missing from /proc/self/status")


def _settle(device: torch.device) -> int:
    """Release cached memory and return what is still held."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_reserved(device)
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets the peak-RSS high-water mark (VmHWM)
    return _rss_bytes("VmRSS")


def _peak(device: torch.device) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_reserved(device)
    return _rss_bytes("VmHWM")


def measure_step(model: nn.Module, batch: int, res: int, num_classes: int, device: torch.device,
                 precision: str = "bf16", steps: int = 3, warmup: int = 1,
                 before_forward: Callable[[], None] | None = None) -> StepStats:
    """Time `steps` training steps (forward, loss, backward, SGD) and measure the peak of one."""
    model.to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, res, res, generator=g).to(device)
    y = torch.randint(num_classes, (batch,), generator=g).to(device)
    cast = torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()

    def step() -> None:
        if before_forward is not None:
            before_forward()
        with cast:
            loss = F.cross_entropy(model(x).float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    base = _settle(device)
    step()
    peak = _peak(device) - base
    times, cpu = [], []
    for _ in range(steps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    median = (lambda v: statistics.median(v) if v else float("nan"))  # noqa: E731
    return StepStats(median(times), median(cpu), peak, base)


def parse_setting(setting: str) -> tuple[int, int]:
    """'none' -> (0, 1), 'k' -> (k, 1), 'kxs' -> (k, s): engine.activation_checkpointing and
    engine.activation_checkpointing_segment."""
    if setting == "none":
        return 0, 1
    every, _, segment = setting.partition("x")
    return int(every), int(segment or 1)


def build(name: str, T: int, setting: str) -> nn.Module:
    model = create_model(name, T=T)
    apply_activation_checkpointing(model, *parse_setting(setting))
    return model


def measure(name: str, T: int, setting: str, batch: int, res: int, device: torch.device,
            steps: int = 1) -> StepStats:
    """One setting's step, in a fresh model."""
    torch.manual_seed(0)
    model = build(name, T, setting)
    stats = measure_step(model, batch, res, model.num_classes, device, steps=steps)
    del model
    return stats


@dataclass
class Fit:
    setting: str
    held: float
    """Held across steps: weights and momentum (on a CPU, the whole process)."""
    step_fixed: float
    """Step memory that does not grow with the batch: gradients, workspaces."""
    per_image: float
    """Step memory per image at the calibration resolution."""
    calib_res: int

    def step_peak(self, batch: int, res: int) -> float:
        return self.step_fixed + batch * self.per_image * (res / self.calib_res) ** 2

    def peak(self, batch: int, res: int) -> float:
        return self.held + self.step_peak(batch, res)

    def max_batch(self, res: int, budget: float) -> int:
        per = self.per_image * (res / self.calib_res) ** 2
        return max(0, int((budget - self.held - self.step_fixed) // per))


def calibrate(name: str, T: int, setting: str, calib_res: int, device: torch.device) -> Fit:
    s1, s2 = (measure(name, T, setting, b, calib_res, device, steps=0) for b in (1, 2))  # memory only
    return Fit(setting, held=s1.base_bytes, step_fixed=2 * s1.peak_bytes - s2.peak_bytes,
               per_image=s2.peak_bytes - s1.peak_bytes, calib_res=calib_res)


def search_largest(fits: Callable[[int], bool], start: int = 1, grow: float = 2.0, tol: float = 0.0) -> int:
    """Largest batch b >= 0 with fits(b), fits being monotone: grow from `start` by `grow` (or shrink) until
    the answer is bracketed, then bisect until the bracket is within `tol` (a fraction) of the answer."""
    lo, hi = 0, start
    if fits(start):
        lo, hi = start, max(start + 1, int(start * grow))
        while fits(hi):
            lo, hi = hi, max(hi + 1, int(hi * grow))
    else:
        lo = int(start / grow)
        while lo > 0 and not fits(lo):
            lo, hi = int(lo / grow), lo
    while hi - lo > max(1.0, tol * lo):
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def gpu_fits(name: str, T: int, setting: str, res: int, device: torch.device) -> Callable[[int], bool]:
    """fits(batch): whether a fresh model's training step at that batch runs without a CUDA OOM."""
    def fits(b: int) -> bool:
        try:
            measure(name, T, setting, b, res, device, steps=0)
            return True
        except torch.OutOfMemoryError:
            return False
        finally:
            gc.collect()
            torch.cuda.empty_cache()
    return fits


@contextmanager
def memory_cap(cap_gib: float, device: torch.device) -> Iterator[None]:
    """The caching allocator limited to cap_gib on the GPU, as if it had only that much memory."""
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, cap_gib * GiB / total), device)
    try:
        yield
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)


def largest_fitting_batch(name: str, T: int, setting: str, res: int, cap_gib: float,
                          device: torch.device) -> int:
    """Largest batch whose step runs with the allocator capped at cap_gib (GPU only)."""
    with memory_cap(cap_gib, device):
        return search_largest(gpu_fits(name, T, setting, res, device))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="ms_resnet104")
    p.add_argument("--T", type=int, default=6)
    p.add_argument("--size", type=int, default=224, help="image side")
    p.add_argument("--gpu-mem", type=float, default=80, help="GPU memory in GB (1e9 bytes), as sold")
    p.add_argument("--reserve-gib", type=float, default=2.0, help="CUDA context, NCCL buffers, headroom")
    p.add_argument("--settings", default="none,1,2,4,1x4,1x8", help="none, k (every k-th block) or "
                   "kxs (every k-th segment of s blocks), comma-separated")
    p.add_argument("--calib-size", type=int, default=64, help="calibration image side, large enough that the "
                   "per-image memory stands out of the measurement noise (on a CPU, peak-RSS noise is a few MiB)")
    p.add_argument("--validate", action="store_true", help="measure held-out points, print the errors")
    p.add_argument("--cap-gib", type=float, default=16.0, help="--validate on GPU: memory cap for the "
                   "largest-batch search")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    device = torch.device(args.device)
    budget = args.gpu_mem * 1e9 - args.reserve_gib * GiB
    settings = args.settings.split(",")
    print(f"{args.model}, T={args.T}, {args.size}px, bf16, SGD; budget {budget / GiB:.1f} GiB of "
          f"{args.gpu_mem:g} GB; calibrated on {device} at {args.calib_size}px, batch 1 and 2")
    print(f"{'checkpointing':>14}{'held GiB':>10}{'step fixed':>12}{'GiB/image':>11}{'max batch/GPU':>15}")
    fits = {}
    for k in settings:
        fit = fits[k] = calibrate(args.model, args.T, k, args.calib_size, device)
        every, segment = parse_setting(k)
        label = "none" if not every else f"every {every}" + (f" x{segment}" if segment > 1 else "")
        per = fit.per_image * (args.size / args.calib_size) ** 2
        print(f"{label:>14}{fit.held / GiB:>10.2f}{fit.step_fixed / GiB:>12.2f}{per / GiB:>11.3f}"
              f"{fit.max_batch(args.size, budget):>15}", flush=True)
    if not args.validate:
        return
    vres = 2 * args.calib_size
    print(f"\nvalidation at {vres}px (held out): predicted vs measured step memory (above what is held)")
    errors = []
    for k, fit in fits.items():
        for b in (2, 4):
            got = measure(args.model, args.T, k, b, vres, device).peak_bytes
            pred = fit.step_peak(b, vres)
            errors.append(abs(pred - got) / got)
            print(f"  {k} batch={b}: predicted {pred / GiB:.3f} GiB, measured {got / GiB:.3f} GiB, "
                  f"error {100 * (pred - got) / got:+.1f}%", flush=True)
        if device.type == "cuda":
            pred_b = fit.max_batch(vres, args.cap_gib * GiB)
            real_b = largest_fitting_batch(args.model, args.T, k, vres, args.cap_gib, device)
            print(f"  {k}: largest batch under {args.cap_gib:g} GiB: predicted {pred_b}, "
                  f"measured {real_b}", flush=True)
    print(f"mean |error| of the step-memory prediction: {100 * statistics.mean(errors):.1f}%, "
          f"max {100 * max(errors):.1f}%")


if __name__ == "__main__":
    main()
