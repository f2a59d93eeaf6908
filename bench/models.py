"""Training-step speed and memory of deepspike's MS-ResNets against SpikingJelly and the authors' loop.

    python -m bench.models [--configs ms18_64,ms56_32] [--rows ds_fp32,sj_compiled] [--repeat N] [--out DIR]
    python -m bench.models --profile [--configs ...]   # profile of the deepspike rows, conv vs the rest

Rows (one fresh subprocess each, so peak RSS and compile caches don't leak between rows):
  ds_fp32      deepspike, fp32
  ds_default   deepspike, bf16 autocast (the trainer's default precision)
  ds_channels_last, ds_fp32_channels_last
               ds_default and ds_fp32 with engine.channels_last's layout (models.layout.use_channels_last: NHWC
               weights, the batch laid out NHWC as it enters the model); each is compared with its
               contiguous row of the same run
  sj_eager     the same architecture from SpikingJelly 2.0 multi-step layers (bench.peers); fp32, as every
               SpikingJelly row
  sj_compiled  the same, whole model under torch.compile (default mode; how SpikingJelly's own trainer
               compiles), reset_net outside the compiled region; compilation happens in the warm-up steps
               and is cached by Inductor on disk (a cold cache costs many minutes on 2 cores; run the bench
               twice and read the second run: the timed steps are warm either way, and the row prints its
               compile time and Inductor's cache hits and misses)
  sj_memopt    the same under SpikingJelly's memory optimiser (memopt level 1, the level that runs without
               CUDA: every residual block checkpointed, 1-bit spike storage where a block's input is binary;
               bench.peers says why no MS block's is), eager
  per_step     the authors' formulation: Python loop over T per conv and LIF (bench.peers)

A training step is forward + cross-entropy + backward + SGD step (momentum 0.9) on random data.
img/s = batch / fastest timed step: other processes on a shared box only ever slow a step down, so the
fastest one is the best estimate of the unloaded speed; the median step is printed beside it.

saved B/(sample*t): bytes packed by torch.autograd.graph.saved_tensors_hooks during the forward and
loss of one training step, divided by batch * T. Dedupe: a tensor counts as its whole untyped storage,
once per storage (keyed by storage data_ptr, unique because packed tensors stay alive until backward);
slices of one buffer (e.g. x[t]) therefore count once, and a saved view counts the full buffer it pins.
Parameters and copies of them (autocast's bf16 casts, a compiled graph's channels_last weights; spotted by
a parameter's shape, which also drops per-channel BN statistics) are left out: they don't scale with batch.
held B/(sample*t): what the forward and loss leave resident for backward, counted for every row alike: the
growth of the process's resident set across the forward and loss of one step (glibc's free pages released
by malloc_trim before each reading), divided by batch * T. memopt's checkpoints keep their inputs (and
would keep its compressors' bit-packed spikes) outside autograd's saved tensors, so the hooks above miss
them; the resident set does not. It also counts what the hooks leave out on purpose (autocast's weight
casts, LIF states kept on the module) and whatever the allocator cannot give back, so it reads a little
above saved where the hooks see everything.
peak RSS: ru_maxrss of the row's process. warm-up s: the untimed first steps (includes compilation).
sj_compiled's compile time, printed under the table: its first step's time less the median timed step.
load: the 1-minute load average as the row ended (2 cores: well above 2, timings are inflated).

LIF kernel: forward and backward ms of the LIF op on the input of each config's first LIF ([T, N, C, H, W]),
fp32 and bf16, against the PyTorch reference loop and SpikingJelly's LIFNode (bench.lif).

fp32 min: the analytic floor for exact backprop without recomputing convs: the fp32 bytes of the input
of every Conv2d, BatchNorm2d and Linear (the weight gradient needs a conv's input; BN's backward needs
its input; a LIF's state can be recomputed elementwise from its BN's input). Shapes come from a meta
forward of our model: the static stem counts once (not T times), a strided 1x1 conv counts the pixels
it reads.

Targets (reported, never asserted), against the fastest and the leanest SpikingJelly row, whichever it is:
deepspike default (bf16) >= 2.5x the fastest SpikingJelly row's images/s, deepspike fp32 >= 1.5x; held
bytes <= 0.5x those of the SpikingJelly row that holds least (memopt's, where it runs) at an images/s
equal to or above that row's. In the profile (--profile), everything that is not a convolution < 20 % of
the step: convolution = the self time of the aten ops named *conv* (forward and backward kernels), out of
the step's wall time; the LIF's share (forward + backward) is printed beside it.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from dataloaders.manifest import write_json


@dataclass(frozen=True)
class Config:
    title: str
    model: str
    num_classes: int
    size: int
    T: int = 4
    batch: int = 8
    warmup: int = 2
    steps: int = 8


CONFIGS = {
    "ms18_64": Config("MS-ResNet-18 @ 64x64", "ms_resnet18", 1000, 64),
    "ms18_224": Config("MS-ResNet-18 @ 224x224", "ms_resnet18", 1000, 224, warmup=1, steps=3),
    "ms56_32": Config("CIFAR MS-ResNet-56 @ 32x32", "ms_resnet56", 10, 32),
}
ROWS = {
    "ds_fp32": "deepspike fp32",
    "ds_default": "deepspike default (bf16)",
    "ds_channels_last": "deepspike bf16 channels_last",
    "ds_fp32_channels_last": "deepspike fp32 channels_last",
    "sj_eager": "SpikingJelly 2.0 eager",
    "sj_compiled": "SpikingJelly 2.0 compiled",
    "sj_memopt": "SpikingJelly 2.0 memopt",
    "per_step": "per-timestep loop (authors)",
}
SJ_ROWS = ("sj_eager", "sj_compiled", "sj_memopt")
BF16_ROWS = ("ds_default", "ds_channels_last")
CHANNELS_LAST_ROWS = {"ds_channels_last": "ds_default", "ds_fp32_channels_last": "ds_fp32"}
"""channels_last row -> the contiguous row it is compared with."""
TARGETS = {"ds_default": 2.5, "ds_fp32": 1.5}
MEMORY_TARGET = 0.5
NON_CONV_SHARE_TARGET = 20.0  # percent of the profiled step
LIF_BACKWARD_NODE = "GeneratedBackwardFor_deepspike_lif"  # torch.library's autograd node for the op


def build(cfg: Config, row: str) -> nn.Module:
    kw = dict(num_classes=cfg.num_classes, T=cfg.T)
    if row.startswith("ds_"):
        from models import create_model
        from models.layout import use_channels_last
        model = create_model(cfg.model, **kw)
        return use_channels_last(model) if row in CHANNELS_LAST_ROWS else model
    from bench import peers
    if row == "per_step":
        return peers.build_per_timestep_model(cfg.model, **kw)
    if row == "sj_memopt":
        return peers.build_spikingjelly_memopt_model(cfg.model, size=cfg.size, **kw)
    return peers.build_spikingjelly_model(cfg.model, **kw)


class SavedBytes:
    """saved_tensors_hooks that sum the storages packed for backward (see the module docstring)."""

    def __init__(self, model: nn.Module):
        params = list(model.parameters())
        self.skip = {t.untyped_storage().data_ptr() for t in [*params, *model.buffers()]}
        # Copies of parameters have a parameter's shape (transposed for 2-D) but their own storage:
        # autocast's bf16 casts, and the channels_last conv weights a compiled graph saves.
        self.param_shapes = {s for p in params for s in (tuple(p.shape), tuple(reversed(p.shape)))}
        self.seen: set[int] = set()
        self.total = 0

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key not in self.seen and key not in self.skip and tuple(t.shape) not in self.param_shapes:
            self.seen.add(key)
            self.total += storage.nbytes()
        return t

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)


def fp32_min_bytes(cfg: Config) -> int:
    from models import create_model
    with torch.device("meta"), torch.no_grad():
        model = create_model(cfg.model, num_classes=cfg.num_classes, T=cfg.T)
        total = 0

        def count(_module, inputs):
            nonlocal total
            total += inputs[0].numel() * 4

        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.BatchNorm2d, nn.Linear)):
                m.register_forward_pre_hook(count)
        model(torch.empty(cfg.batch, 3, cfg.size, cfg.size))
    return total


def make_step(cfg: Config, row: str, model: nn.Module):
    from spikingjelly.activation_based import functional as sjf

    from bench.max_batch import _settle
    cpu = torch.device("cpu")
    forward = torch.compile(model) if row == "sj_compiled" else model
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(cfg.batch, 3, cfg.size, cfg.size, generator=g)
    y = torch.randint(cfg.num_classes, (cfg.batch,), generator=g)
    precision = torch.autocast("cpu", dtype=torch.bfloat16) if row in BF16_ROWS else nullcontext()

    def step(saved: SavedBytes | None = None, measure_held: bool = False) -> int:
        """One training step; with measure_held, returns the resident-set growth across forward + loss."""
        if row in SJ_ROWS:
            sjf.reset_net(model)
        before = _settle(cpu) if measure_held else 0
        with precision, saved.hooks() if saved else nullcontext():
            loss = F.cross_entropy(forward(x).float(), y)
        held = _settle(cpu) - before if measure_held else 0
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return held

    return step


def run_row(cfg: Config, row: str, threads: int) -> dict:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = build(cfg, row).train()
    step = make_step(cfg, row, model)
    compiled = row == "sj_compiled"
    warmup = []
    # A compiled model's first step is all compilation: give it one more untimed step.
    for _ in range(cfg.warmup + (1 if compiled else 0)):
        t0 = time.perf_counter()
        step()
        warmup.append(time.perf_counter() - t0)
    times = []
    for _ in range(cfg.steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    saved = SavedBytes(model)
    step(saved)
    peak_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # before _settle resets the mark
    held = step(measure_held=True)
    n = cfg.batch * cfg.T
    result = dict(config=cfg.model, size=cfg.size, row=row, label=ROWS[row],
                  params=sum(p.numel() for p in model.parameters()),
                  images_per_s=cfg.batch / min(times), images_per_s_median=cfg.batch / statistics.median(times),
                  step_s=times, warmup_s=sum(warmup),
                  saved_bytes=saved.total, saved_per_sample_step=saved.total / n,
                  held_bytes=held, held_per_sample_step=held / n,
                  peak_rss_mib=peak_rss_mib,
                  load_avg_1min=os.getloadavg()[0])
    if compiled:
        from torch._dynamo.utils import counters
        result.update(compile_s=warmup[0] - statistics.median(times),
                      inductor_cache_hits=counters["inductor"]["fxgraph_cache_hit"],
                      inductor_cache_misses=counters["inductor"]["fxgraph_cache_miss"])
    if row == "sj_memopt":
        from bench import peers
        result["memopt_plan"] = peers.spikingjelly_memopt_plan(model)
    return result


def _label_layers(model: nn.Module) -> None:
    """Wrap every leaf layer's forward in a profiler range named 'fwd:<class>' (backward ops are
    already grouped by autograd node)."""
    open_ranges: list = []

    def enter(m, _inputs):
        open_ranges.append(torch.autograd.profiler.record_function(f"fwd:{type(m).__name__}"))
        open_ranges[-1].__enter__()

    def leave(_m, _inputs, _output):
        open_ranges.pop().__exit__(None, None, None)

    for m in model.modules():
        if next(m.children(), None) is None and not isinstance(m, nn.Identity):
            m.register_forward_pre_hook(enter)
            m.register_forward_hook(leave)


def profile_row(cfg: Config, row: str, threads: int, steps: int = 3) -> str:
    """Top ops by self CPU time, the time split by layer (forward ranges, backward autograd nodes), and the
    share of the step spent in convolution kernels against everything else."""
    from torch.profiler import ProfilerActivity, profile
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = build(cfg, row).train()
    step = make_step(cfg, row, model)
    for _ in range(cfg.warmup):
        step()
    _label_layers(model)
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    wall = (time.perf_counter() - t0) / steps
    events = prof.key_averages()
    backward = "autograd::engine::evaluate_function: "
    split = sorted(((e.cpu_time_total / steps / 1e6, e.key.removeprefix(backward)) for e in events
                    if e.key.startswith(("fwd:", backward, "Optimizer.step"))), reverse=True)
    lines = [f"{s:8.3f} s {100 * s / wall:5.1f}%  {k}" for s, k in split[:14] if s > 0.002 * wall]
    lif = sum(s for s, k in split if k == "fwd:LIF" or k.startswith(LIF_BACKWARD_NODE))
    # Self times don't overlap, so aten::convolution's wrappers and the kernel under them add up to the conv.
    conv = sum(e.self_cpu_time_total for e in events if e.key.startswith("aten::") and "conv" in e.key) / steps / 1e6
    other = 100 * (1 - conv / wall)
    mark = "PASS" if other < NON_CONV_SHARE_TARGET else "MISS"
    return (events.table(sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=44)
            + f"\nper step: {wall:.3f} s wall (under the profiler); by layer:\n" + "\n".join(lines)
            + f"\nconvolutions (forward + backward): {100 * conv / wall:.1f}% of the step; everything else: "
            f"{other:.1f}% (target < {NON_CONV_SHARE_TARGET:.0f}%: {mark})"
            f"\nLIF forward + backward: {100 * lif / wall:.1f}% of the step")


def _logits_and_grads(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    from spikingjelly.activation_based import functional as sjf
    sjf.reset_net(model)
    model.zero_grad(set_to_none=True)
    out = model(x)
    out.square().sum().backward()
    return out.detach(), {k.removeprefix("net."): p.grad for k, p in model.named_parameters()}


@functools.cache
def peer_check(model: str, num_classes: int, T: int) -> str:
    """Parameter counts; each peer's logits and parameter gradients vs ours, with our weights copied in."""
    from bench import peers
    from models import create_model
    kw = dict(num_classes=num_classes, T=T)
    torch.manual_seed(0)
    ours = create_model(model, **kw).train()
    with torch.no_grad():  # zero-init last BNs would leave half of every branch untested
        for m in ours.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.3, 0.8)
                m.bias.normal_(0, 0.2)
    sj = peers.build_spikingjelly_model(model, **kw).train()
    sj.load_state_dict(ours.state_dict())
    naive = peers.build_per_timestep_model(model, **kw).train()
    naive.net.load_state_dict(ours.state_dict())
    x = torch.randn(2, 3, 32, 32) * 2
    ref, ref_grads = _logits_and_grads(ours, x)
    n = [sum(p.numel() for p in m.parameters()) for m in (ours, sj, naive)]
    ok = n[0] == n[1] == n[2]
    parts = []
    for label, peer in (("SpikingJelly", sj), ("per-timestep", naive)):
        out, grads = _logits_and_grads(peer, x)
        d_out = float((out - ref).abs().max())
        d_grad = max(float((grads[k] - g).abs().max() / g.abs().max().clamp_min(1e-12)) for k, g in ref_grads.items())
        ok = ok and d_out <= 1e-5
        parts.append(f"{label} {d_out:.1e} (grads: max rel. diff {d_grad:.1e})")
    return (f"params: deepspike {n[0]:,}  SpikingJelly {n[1]:,}  per-timestep {n[2]:,}\n"
            f"   vs deepspike on a 2x3x32x32 batch with its weights copied in, max |logit diff|: "
            f"{', '.join(parts)} [{'OK' if ok else 'MISMATCH'} at 1e-5]")


def lif_kernel_lines(cfg: Config, threads: int) -> list[str]:
    from bench import lif
    torch.set_num_threads(threads)
    shape = lif.first_lif_input_shape(cfg.model, cfg.num_classes, cfg.T, cfg.batch, cfg.size)
    return [line for dtype in (torch.float32, torch.bfloat16)
            for line in lif.report(shape, dtype, lif.time_lif(shape, dtype, torch.device("cpu")))]


def _worker(args) -> None:
    cfg = CONFIGS[args.configs]
    if args.rows == "lif":
        print("\n".join(lif_kernel_lines(cfg, args.threads)))
    elif args.profile:
        print(profile_row(cfg, args.rows, args.threads))
    else:
        print("ROW " + json.dumps(run_row(cfg, args.rows, args.threads)))


def _spawn(config: str, row: str, args, profile: bool = False) -> str:
    cmd = [sys.executable, "-m", "bench.models", "--worker", "--configs", config, "--rows", row,
           "--threads", str(args.threads)] + (["--profile"] if profile else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{config}/{row} failed:\n{proc.stderr[-3000:]}")
    return proc.stdout


def _ratio_mark(value: float, target: float, higher_is_better: bool) -> str:
    ok = value >= target if higher_is_better else value <= target
    return f"{value:.2f}x {'PASS' if ok else 'MISS'}"


def report(cfg: Config, rows: list[dict], fp32_min: int, check: str, lif_lines: str) -> list[str]:
    per_st = fp32_min / (cfg.batch * cfg.T)
    by = {r["row"]: r for r in rows}
    sj = [by[k] for k in SJ_ROWS if k in by]
    fastest = max(sj, key=lambda r: r["images_per_s"], default=None)
    leanest = min(sj, key=lambda r: r["held_per_sample_step"], default=None)
    best_speed = fastest and fastest["images_per_s"]
    least_held = leanest and leanest["held_per_sample_step"]

    def vs(value: float, ref: float | None) -> str:
        return f"{value / ref:.2f}x" if ref else "-"

    lines = [f"== {cfg.title}, T={cfg.T}, batch {cfg.batch}, {cfg.num_classes} classes "
             f"(warm-up {cfg.warmup}, timed {cfg.steps} steps)", "   " + check,
             f"   {'row':<30}{'img/s':>8}{'median':>8}{'vs best SJ':>12}{'saved B/(sample*t)':>20}"
             f"{'vs fp32 min':>13}{'held B/(sample*t)':>19}{'vs min SJ':>11}{'peak RSS MiB':>14}"
             f"{'warm-up s':>11}{'load':>6}"]
    for r in rows:
        saved, held = r["saved_per_sample_step"], r["held_per_sample_step"]
        lines.append(f"   {r['label']:<30}{r['images_per_s']:>8.2f}{r['images_per_s_median']:>8.2f}"
                     f"{vs(r['images_per_s'], best_speed):>12}{saved:>20,.0f}{vs(saved, per_st):>13}"
                     f"{held:>19,.0f}{vs(held, least_held):>11}{r['peak_rss_mib']:>14,.0f}"
                     f"{r['warmup_s']:>11.1f}{r['load_avg_1min']:>6.1f}")
    lines.append(f"   {'analytic fp32 minimum':<30}{'':>28}{per_st:>20,.0f}{'1.00x':>13}{'':>19}"
                 f"{vs(per_st, least_held):>11}")
    if "sj_compiled" in by:
        r = by["sj_compiled"]
        lines.append(f"   {r['label']}: compile {r['compile_s']:.1f} s (first step less a warm one; Inductor "
                     f"cache {r['inductor_cache_hits']} hits, {r['inductor_cache_misses']} misses)")
    if "sj_memopt" in by:
        lines.append(f"   {by['sj_memopt']['label']}: {by['sj_memopt']['memopt_plan']}")
    for k in (k for k in TARGETS if k in by and sj):
        r = by[k]
        faster = r["images_per_s"] / leanest["images_per_s"]
        lines.append(f"   target {ROWS[k]}: img/s >= {TARGETS[k]}x the fastest SJ ({fastest['label']}): "
                     f"{_ratio_mark(r['images_per_s'] / best_speed, TARGETS[k], True)};  held <= "
                     f"{MEMORY_TARGET}x the leanest SJ ({leanest['label']}): "
                     f"{_ratio_mark(r['held_per_sample_step'] / least_held, MEMORY_TARGET, False)} "
                     f"at img/s >= its: {_ratio_mark(faster, 1.0, True)}")
    layouts = [f"{ROWS[k]} {by[k]['images_per_s'] / by[c]['images_per_s']:.2f}x"
               for k, c in CHANNELS_LAST_ROWS.items() if k in by and c in by]
    if layouts:
        lines.append(f"   channels_last vs contiguous, img/s: {', '.join(layouts)}")
    return [*lines, lif_lines.rstrip("\n")]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"comma list of {', '.join(CONFIGS)}")
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma list of {', '.join(ROWS)}")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeat", type=int, default=1, metavar="N",
                   help="run the rows N rounds and keep each row's fastest round (for a shared machine)")
    p.add_argument("--out", metavar="DIR", help="write every measured row (and the fp32 minima) to DIR/models.json")
    p.add_argument("--profile", action="store_true", help="torch.profiler top ops of the deepspike rows")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> None:
    p = build_parser()
    args = p.parse_args(argv)
    if args.worker:
        _worker(args)
        return
    configs, rows = args.configs.split(","), args.rows.split(",")
    unknown = [c for c in configs if c not in CONFIGS] + [r for r in rows if r not in ROWS]
    if unknown:
        p.error(f"unknown config/row: {', '.join(unknown)}")
    start = time.perf_counter()
    print(f"torch {torch.__version__}, {args.threads} threads, load average {os.getloadavg()[0]:.2f}",
          flush=True)
    if args.profile:
        for c in configs:
            for r in (r for r in rows if r.startswith("ds_")):
                print(f"== profile {CONFIGS[c].title} / {ROWS[r]}\n{_spawn(c, r, args, profile=True)}",
                      flush=True)
        return
    results = {}
    for c in configs:
        cfg = CONFIGS[c]
        best: dict[str, dict] = {}
        for _ in range(args.repeat):  # rounds interleave the rows, so a busy spell hits all of them alike
            for r in rows:
                run = json.loads(_spawn(c, r, args).split("ROW ", 1)[1])
                if r not in best or run["images_per_s"] > best[r]["images_per_s"]:
                    best[r] = run
        measured = [best[r] for r in rows]
        check = peer_check(cfg.model, cfg.num_classes, cfg.T)
        lif_lines = _spawn(c, "lif", args)
        results[c] = dict(config=asdict(cfg), fp32_min_bytes=fp32_min_bytes(cfg), peer_check=check, rows=measured,
                          lif_kernel=lif_lines)
        print("\n".join(report(cfg, measured, results[c]["fp32_min_bytes"], check, lif_lines)), flush=True)
    print(f"total {time.perf_counter() - start:.0f} s, load average now {os.getloadavg()[0]:.2f}")
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        write_json(Path(args.out) / "models.json", dict(torch=torch.__version__, threads=args.threads, configs=results))


if __name__ == "__main__":
    main()
