"""Stage `speed` of bench/gpu_check.sh: training speed and memory, and the memory planner beside them.

    python -m bench.gpu_check.speed --json out.json [--cpu-dry-run] [--budget-s 100]

(c) MS-ResNet-18, -34 and -104 at 224 px, T=6, bf16, without and with activation checkpointing (every
block): images/s and memory of the trainer's step (the recipe's config, the DeepSpeed engine from
`trainer.wrap`, autocast forward, loss, engine.backward, engine.step) on in-memory batches, so the figures
are the model's and the engine's, not a JPEG decoder's. Then the largest MS-ResNet-104 batch that fits the
GPU (bench.max_batch's step with the allocator capped, searched from the planner's answer), for each setting
while the time budget lasts.
(d) Beside each measured figure, bench.max_batch's prediction, calibrated on the same device (batch 1 and 2 at a
small resolution): the step memory above what is held (the planner's fitted quantity, comparable on any
device), the whole peak (on a GPU: the caching allocator's peak reservation; on a CPU the process's peak
resident set, which also counts the interpreter and libraries) and the largest batch.
Also the fused LIF op's forward + backward ms against the reference and SpikingJelly (bench.lif).

--cpu-dry-run: the same sequence at toy sizes on the CPU (MS-ResNet-34 in the 104's place), the largest-batch
search against a cap on the measured peak resident set instead of an allocator cap (a CPU allocation does
not fail).
"""

from __future__ import annotations

import argparse
import json
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.max_batch import GiB, _peak, _settle, calibrate, measure, parse_setting, search_largest

# model, activation checkpointing setting (bench.max_batch's notation), batch
GPU_ROWS = [("ms_resnet18", "none", 64), ("ms_resnet18", "1", 64), ("ms_resnet34", "none", 64),
            ("ms_resnet34", "1", 64), ("ms_resnet104", "none", 32), ("ms_resnet104", "1", 32)]
# grow, tol: the largest-batch search's steps (bench.max_batch.search_largest) for the deepest model's rows; the dry
# run's are coarse, as its steps are slow on a CPU.
GPU = dict(res=224, T=6, steps=5, warmup=2, calib_res=64, reserve_gib=2.0, lif_batch=64, grow=1.25, tol=0.03,
           deepest="ms_resnet104")
# The dry run's deep model is MS-ResNet-34: the same code paths, in a fraction of the 104's CPU time.
CPU_ROWS = [("ms_resnet18", "none", 2), ("ms_resnet18", "1", 2), ("ms_resnet34", "none", 2),
            ("ms_resnet34", "1", 2)]
# 32 px is the least the models' stems and strides take, so the dry run calibrates at the rows' size.
CPU = dict(res=32, T=2, steps=1, warmup=1, calib_res=32, lif_batch=2, grow=2.0, tol=0.5, deepest="ms_resnet34")


def engine_row(name: str, setting: str, batch: int, p: dict, device: torch.device) -> dict:
    from trainer.batch_setting import batch_setting
    from trainer.config import apply_overrides
    from trainer.deepspeed_config import deepspeed_config
    from trainer.precision import autocast, weights_dtype
    from trainer.recipes import get_recipe
    from trainer.wrap import wrap

    every, segment = parse_setting(setting)
    cfg = get_recipe(f"{name}_imagenet")
    apply_overrides(cfg, [f"model.T={p['T']}", f"engine.activation_checkpointing={every}",
                          f"engine.activation_checkpointing_segment={segment}", f"data.batch_size={batch}",
                          f"optim.global_batch={batch}"])
    on_gpu = device.type == "cuda"
    before = _settle(device)
    torch.manual_seed(0)
    model = cfg.model.build()
    one_rank = batch_setting(cfg.optim, cfg.data.batch_size, 1)
    engine = wrap(model, cfg, deepspeed_config(cfg, one_rank, on_gpu), one_rank, 100, 100, on_gpu=on_gpu)
    x = torch.randn(batch, 3, p["res"], p["res"], device=device)
    y = torch.randint(0, cfg.model.num_classes, (batch,), device=device)

    def step() -> float:
        with autocast(device, cfg.engine.precision):
            logits = engine(x.to(weights_dtype(engine.module)))
        loss = F.cross_entropy(logits.float(), y)
        engine.backward(loss)
        engine.step()
        return loss.item()

    for _ in range(p["warmup"]):
        step()
    base = _settle(device)
    t0 = time.perf_counter()
    losses = [step() for _ in range(p["steps"])]
    if on_gpu:
        torch.cuda.synchronize(device)
    dt = time.perf_counter() - t0
    peak = _peak(device)
    return {"images_per_s": batch * p["steps"] / dt, "step_s": dt / p["steps"], "loss": losses[-1],
            "step_gib": (peak - base) / GiB, "peak_gib": peak / GiB, "row_peak_gib": (peak - before) / GiB}


def largest_batch(name: str, setting: str, fit, p: dict, device: torch.device, cap_gib: float,
                  deadline: float, image_s: float) -> dict:
    """Measured against predicted, the search starting from the prediction. A probe (two training steps)
    that `image_s`, the seconds per image of that row's step, says would end past `deadline` is not
    started: the search stops there and reports the bracket its probes reached."""
    from bench.max_batch import gpu_fits, memory_cap

    predicted = fit.max_batch(p["res"], cap_gib * GiB)
    row = {"model": name, "setting": setting, "res": p["res"], "T": p["T"], "cap_gib": cap_gib,
           "predicted": predicted, "tolerance": p["tol"], "probes": []}
    if device.type == "cuda":
        fits, cap = gpu_fits(name, p["T"], setting, p["res"], device), memory_cap(cap_gib, device)
    else:
        def fits(b: int) -> bool:
            # What is held is the calibration's: this process's resident set has grown since (the engine rows).
            return fit.held + measure(name, p["T"], setting, b, p["res"], device, steps=0).peak_bytes <= cap_gib * GiB
        cap = nullcontext()

    def probe(b: int) -> bool:
        if time.monotonic() + 2.5 * b * image_s > deadline:
            raise TimeoutError(f"no time left for a probe at batch {b}")
        row["probes"].append([b, fits(b)])
        return row["probes"][-1][1]

    t0 = time.monotonic()
    try:
        with cap:
            row["measured"] = search_largest(probe, start=max(predicted, 1), grow=p["grow"], tol=p["tol"])
    except TimeoutError as e:
        ok = [b for b, f in row["probes"] if f]
        bad = [b for b, f in row["probes"] if not f]
        row["incomplete"] = f"{e}: fits {max(ok, default=0)}, not {min(bad, default='-')}"
    row["seconds"] = round(time.monotonic() - t0, 1)
    return row


def lif_timings(p: dict, device: torch.device) -> dict:
    from bench import lif

    shape = lif.first_lif_input_shape("ms_resnet18", 1000, p["T"], p["lif_batch"], p["res"])
    out = {"shape": list(shape)}
    for dtype in (torch.float32, torch.bfloat16):
        t = lif.time_lif(shape, dtype, device, reps=20 if device.type == "cuda" else 3)
        out[str(dtype)] = {k: {"forward_ms": f, "backward_ms": b} for k, (f, b) in t.items()}
        print("\n".join(lif.report(shape, dtype, t)), flush=True)
    return out


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", required=True)
    ap.add_argument("--cpu-dry-run", action="store_true")
    ap.add_argument("--budget-s", type=float, default=170, help="the largest-batch searches stop in time "
                    "for the rest to fit in it")
    return ap


def main(argv: list[str] | None = None) -> None:
    a = build_parser().parse_args(argv)
    t_start = time.monotonic()
    from trainer.distributed import init_distributed

    if not a.cpu_dry_run and not torch.cuda.is_available():
        raise SystemExit("bench.gpu_check.speed needs a CUDA GPU (or --cpu-dry-run)")
    _, _, device = init_distributed("", "cpu" if a.cpu_dry_run else "cuda")
    p, rows = (CPU, CPU_ROWS) if a.cpu_dry_run else (GPU, GPU_ROWS)
    if device.type == "cuda":
        total_gib = torch.cuda.get_device_properties(device).total_memory / GiB
        cap_gib = total_gib - p["reserve_gib"]
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "res": p["res"], "T": p["T"], "precision": "bf16", "rows": [], "largest_batch": []}

    def save() -> None:
        Path(a.json).write_text(json.dumps(result, indent=1))

    print(f"[speed] {result['device']}: {p['res']} px, T={p['T']}, bf16; planner calibrated at "
          f"{p['calib_res']} px", flush=True)
    print(f"{'model':<14}{'ckpt':>5}{'batch':>6}{'img/s':>9}{'step GiB':>10}{'planned':>9}{'peak GiB':>10}"
          f"{'planned':>9}", flush=True)
    fits, image_s = {}, {}
    for name, setting, batch in rows:
        row = {"model": name, "setting": setting, "batch": batch}
        try:
            fit = fits[name, setting] = calibrate(name, p["T"], setting, p["calib_res"], device)
            row.update(engine_row(name, setting, batch, p, device))
            image_s[name, setting] = row["step_s"] / batch
            row["planned_step_gib"] = fit.step_peak(batch, p["res"]) / GiB
            row["planned_peak_gib"] = fit.peak(batch, p["res"]) / GiB
            row["step_error_pct"] = 100 * (row["planned_step_gib"] - row["step_gib"]) / row["step_gib"]
            print(f"{name:<14}{setting:>5}{batch:>6}{row['images_per_s']:>9.1f}{row['step_gib']:>10.3f}"
                  f"{row['planned_step_gib']:>9.3f}{row['peak_gib']:>10.3f}{row['planned_peak_gib']:>9.3f}",
                  flush=True)
        except (torch.OutOfMemoryError, RuntimeError) as e:
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            print(f"{name:<14}{setting:>5}{batch:>6}  FAILED {row['error']}", flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        result["rows"].append(row)
        save()
    for (name, setting), fit in fits.items():
        if name != p["deepest"] or (name, setting) not in image_s:  # not its failed rows
            continue
        if device.type == "cpu":
            # A toy cap: what the planner says 4 images need in this setting, so that the search has an
            # answer near 4 (one cap for both settings sent the checkpointed row's search to batch 32).
            cap_gib = fit.peak(4, p["res"]) / GiB
        # What is left of the budget, less time for the LIF timings and the exit.
        deadline = t_start + a.budget_s - (30 if device.type == "cuda" else 15)
        if time.monotonic() > deadline:
            result["largest_batch"].append({"model": name, "setting": setting, "skipped": "no time left"})
            continue
        try:
            lb = largest_batch(name, setting, fit, p, device, cap_gib, deadline, image_s[name, setting])
            print(f"[speed] {name} ckpt {setting}: largest batch under {cap_gib:.1f} GiB: measured "
                  f"{lb.get('measured', lb.get('incomplete'))}, planned {lb['predicted']} ({lb['seconds']} s)",
                  flush=True)
        except RuntimeError as e:
            lb = {"model": name, "setting": setting, "error": f"{type(e).__name__}: {str(e)[:300]}"}
        result["largest_batch"].append(lb)
        save()
    try:
        result["lif"] = lif_timings(p, device)
    except (ImportError, RuntimeError) as e:
        result["lif"] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    save()
    failed = [r for r in [*result["rows"], *result["largest_batch"], result["lif"]] if "error" in r]
    if failed:
        raise SystemExit(f"[speed] {len(failed)} part(s) failed; see their 'error' in {a.json}")


if __name__ == "__main__":
    main()
