"""Peak memory and step time of very deep MS-ResNets with activation checkpointing, against SpikingJelly.

    python -m bench.memory                                   # 104 @ 224 px and 482 @ 32 px, batch 2, T 6
    python -m bench.memory --configs ms_resnet482@32 --settings 1,4,1x8 --steps 2 --out runs/bench

Rows per config, each in a fresh process (so one row's allocations cannot hide in another's peak):
  none       deepspike, no activation checkpointing
  k          deepspike, every k-th residual block checkpointed over its whole T sequence (trainer.wrap)
  kxs        deepspike, every k-th segment of s consecutive blocks checkpointed as one unit
  sj         SpikingJelly 2.0 multi-step build of the same architecture (bench.peers), no checkpointing
  sj_memopt  the same under SpikingJelly's memory optimiser (memopt level 1, the level that runs without
             CUDA: every residual block checkpointed, 1-bit spikes where a block's input is binary, which
             no MS block's is; bench.peers)
A step is bf16 autocast forward + loss + backward + SGD (momentum) on random data
(`bench.max_batch.measure_step`).

Columns: median step time (wall; on a CPU also the process's CPU time, which other load does not
inflate as long as the row runs one thread, the CPU default here, and "time vs none" uses it);
"step GiB" = the step's peak memory above what is held before it (weights,
momentum): on a GPU the caching allocator's peak reservation, on a CPU the growth of the peak resident
set; "act GiB" = the part of it that grows with the batch (batch x the difference between the step
peaks at this batch and at batch 1), i.e. activations and what backward recomputes, without gradients,
weight casts and optimizer temporaries; act vs sj (SpikingJelly's default) and vs sj_memopt; time vs none.
(Bytes packed for backward, as bench.models counts them, would miss what checkpointing holds and
recomputes.)

Target (reported, never asserted, marked on every deepspike checkpointed row): <= 0.08x SpikingJelly's
default activation memory at <= 1.3x our own no-checkpoint step time.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

from dataloaders.manifest import write_json

MEM_TARGET, TIME_TARGET = 0.08, 1.3
GiB = 2**30
SJ_ROWS = ("sj", "sj_memopt")


def run_row(name: str, res: int, row: str, batch: int, T: int, steps: int, device: str,
            threads: int) -> dict:
    from bench.max_batch import build, measure_step

    dev = torch.device(device)
    if threads:
        torch.set_num_threads(threads)  # several threads spin-wait on a busy machine, inflating CPU time
    torch.manual_seed(0)
    if row in SJ_ROWS:
        from spikingjelly.activation_based import functional as sjf

        from bench.peers import build_spikingjelly_memopt_model, build_spikingjelly_model

        model = build_spikingjelly_model(name, T=T) if row == "sj" else build_spikingjelly_memopt_model(
            name, T=T, size=res)
        reset = lambda: sjf.reset_net(model)  # noqa: E731  LIFNode keeps its membrane between calls
    else:
        model = build(name, T, row)
        reset = None
    classes = model.fc.out_features
    stats = measure_step(model, batch, res, classes, dev, steps=steps, before_forward=reset)
    one = measure_step(model, 1, res, classes, dev, steps=0, before_forward=reset)
    per_image = (stats.peak_bytes - one.peak_bytes) / (batch - 1)
    return {"row": row, "step_s": stats.step_s, "cpu_s": stats.cpu_s, "step_bytes": stats.peak_bytes,
            "held_bytes": stats.base_bytes, "act_bytes": per_image * batch, "device": device}


def _spawn(name, res, row, args) -> dict:
    cmd = [sys.executable, "-m", "bench.memory", "--worker", f"{name}@{res}", "--rows", row,
           "--batch-size", str(args.batch_size), "--T", str(args.T), "--steps", str(args.steps),
           "--device", args.device, "--threads", str(args.threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines()
        return {"row": row, "error": lines[-1] if lines else f"exit code {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def report(title: str, rows: list[dict]) -> list[str]:
    by = {r["row"]: r for r in rows}
    sj, memopt, none = by.get("sj", {}), by.get("sj_memopt", {}), by.get("none", {})
    out = [title, f"{'row':>10}{'step s':>9}{'cpu s':>9}{'step GiB':>10}{'act GiB':>9}{'act vs sj':>11}"
                  f"{'vs memopt':>11}{'time vs none':>14}"]

    def ratio(value: float, ref: dict, key: str) -> float:
        return value / ref[key] if ref.get(key) else float("nan")

    for r in rows:
        if "error" in r:
            out.append(f"{r['row']:>10}  failed: {r['error'][:90]}")
            continue
        mem = ratio(r["act_bytes"], sj, "act_bytes")
        key = "cpu_s" if r.get("device") == "cpu" else "step_s"
        tim = ratio(r[key], none, key)
        mark = ""
        if r["row"] not in ("none", *SJ_ROWS):
            ok = mem <= MEM_TARGET and tim <= TIME_TARGET
            mark = f"  target <= {MEM_TARGET}x / <= {TIME_TARGET}x: {'PASS' if ok else 'MISS'}"
        out.append(f"{r['row']:>10}{r['step_s']:>9.3f}{r['cpu_s']:>9.3f}{r['step_bytes'] / GiB:>10.3f}"
                   f"{r['act_bytes'] / GiB:>9.3f}{mem:>10.3f}x{ratio(r['act_bytes'], memopt, 'act_bytes'):>10.3f}x"
                   f"{tim:>13.2f}x{mark}")
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default="ms_resnet104@224,ms_resnet482@32", help="model@resolution, ...")
    p.add_argument("--settings", default="1,4,1x8", help="checkpointing rows: k or kxs (see above)")
    p.add_argument("--batch-size", type=int, default=2, help=">= 2 (activations = growth over batch 1)")
    p.add_argument("--T", type=int, default=6)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None, help="torch threads per row (CPU default 1)")
    p.add_argument("--out", metavar="DIR", help="also write the raw rows to DIR/memory.json")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--rows", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.threads is None:
        args.threads = 1 if args.device == "cpu" else 0
    if args.worker:
        name, res = args.worker.split("@")
        print(json.dumps(run_row(name, int(res), args.rows, args.batch_size, args.T, args.steps, args.device,
                                 args.threads)))
        return
    results = {}
    row_names = ["none", *args.settings.split(","), *SJ_ROWS]
    for config in args.configs.split(","):
        name, res = config.split("@")
        rows = [_spawn(name, int(res), row, args) for row in row_names]
        results[config] = rows
        title = f"\n{name} @ {res}px, batch {args.batch_size}, T={args.T}, bf16, {args.device}"
        print("\n".join(report(title, rows)), flush=True)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        write_json(Path(args.out) / "memory.json", results)


if __name__ == "__main__":
    main()
