"""Stage `train` of bench/gpu_check.sh, no Ray: `python -m trainer.train` on one GPU, MS-ResNet-18 on synthetic
ImageNet-layout shards, bf16 then fp16 (DeepSpeed's dynamic loss scaling), each run once uninterrupted and once
SIGKILLed after its first checkpoint and started again with the same command (it resumes from that
checkpoint); the final weights of the two compared. cuDNN's autotuner is off (engine.cudnn_benchmark=false)
so both runs pick the same algorithms; where a kernel is still non-deterministic the relative L2 difference
says by how much the weights moved apart.

    python -m bench.gpu_check.train --work DIR --json out.json [--cpu-dry-run] [--run-timeout 60]

The JPEG folders come from dataloaders.synthetic, converted with `python -m dataloaders.convert` as a user
would (the Ray stage reads the same shards). --cpu-dry-run: toy sizes on the CPU (engine.device=cpu), where
DeepSpeed has no fp16: that run is fp32, and the JSON says so.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
# (classes, train per class, val per class, side range, steps, checkpoint every, batch, image size, loader
# workers, T)
GPU = dict(classes=10, per_class=32, val_per_class=4, sides=(96, 256), steps=30, every=10, batch=32,
           size=112, workers=6, T=6)
CPU = dict(classes=4, per_class=8, val_per_class=2, sides=(40, 64), steps=8, every=4, batch=4,
           size=32, workers=1, T=2)
FP16_ON_CPU = "substituted on CPU: DeepSpeed's CPU accelerator has no fp16; the run was fp32"


def make_data(work: Path, p: dict) -> Path:
    from dataloaders import synthetic

    src, out = work / "imagenet-jpeg", work / "imagenet-wds"
    if not (out / "val/manifest.json").is_file():
        synthetic.imagenet(src, p["classes"], p["per_class"], p["val_per_class"], min_side=p["sides"][0],
                           max_side=p["sides"][1])
        shard = max(1, p["classes"] * p["per_class"] // (2 * p["workers"]))  # a shard per loader worker, at least
        subprocess.run([sys.executable, "-m", "dataloaders.convert", "imagenet", "--src", str(src), "--out",
                        str(out), "--format", "wds", "--shard-size", str(shard),
                        "--workers", str(min(p["workers"], os.cpu_count() or 1))],
                       cwd=ROOT, check=True, capture_output=True, timeout=300)
    return out


def overrides(p: dict, precision: str) -> list[str]:
    """The training settings both the Ray stage and this one run."""
    import importlib.util

    sets = [f"optim.max_steps={p['steps']}", f"optim.global_batch={p['batch']}", f"data.batch_size={p['batch']}",
            f"data.image_size={p['size']}", f"data.val_crop={p['size']}", f"data.val_resize={p['size'] * 8 // 7}",
            f"data.num_workers={p['workers']}", f"model.T={p['T']}", f"checkpoint.every_steps={p['every']}",
            f"log_every={p['every']}", "eval_every_epochs=1000", f"engine.precision={precision}",
            "engine.cudnn_benchmark=false", "mlflow.log_model=false", "mlflow.system_metrics=false"]
    if importlib.util.find_spec("deepspike_jpeg") is None:  # a machine without libjpeg's headers (gpu_check.sh)
        sets.append("data.window_decode=false")
    return sets


def weights(step_dir: Path) -> dict[str, torch.Tensor]:
    from trainer.safe_load import safe_load

    sd = safe_load(step_dir / "mp_rank_00_model_states.pt")["module"]
    return {k: v for k, v in sd.items() if torch.is_tensor(v)}


def compare(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict:
    if a.keys() != b.keys():
        return {"bitwise_equal": False, "error": f"different tensors: {sorted(a.keys() ^ b.keys())[:5]}"}
    diff = {k: a[k].double() - b[k].double() for k in a if a[k].numel()}
    norm = sum(a[k].double().square().sum().item() for k in diff) ** 0.5
    return {"bitwise_equal": all(torch.equal(a[k], b[k]) for k in a),
            "max_abs_diff": max(d.abs().max().item() for d in diff.values()),
            "rel_l2": sum(d.square().sum().item() for d in diff.values()) ** 0.5 / max(norm, 1e-30),
            "tensors": len(a)}


def resumed_from(log: str) -> int | None:
    """The step a resumed run's log says it started from."""
    m = re.search(r"resuming from \S*step_(\d{8})", log)
    return int(m[1]) if m else None


def compare_runs(root: Path, precision: str, final: str, tag: str) -> dict:
    """The killed-and-resumed run's final weights against the uninterrupted run's, printed and returned."""
    result = compare(weights(root / f"{precision}-uninterrupted" / final),
                     weights(root / f"{precision}-killed" / final))
    print(f"[{tag}] {precision}: resumed weights vs uninterrupted: {result}", flush=True)
    return result


def stage_parser(doc: str, work_help: str, timeout: tuple[str, float, str]) -> argparse.ArgumentParser:
    """The command line this stage and the Ray stage share, plus `timeout` (flag, default, help)."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", required=True, help=work_help)
    ap.add_argument("--json", required=True)
    ap.add_argument("--cpu-dry-run", action="store_true")
    ap.add_argument(timeout[0], type=float, default=timeout[1], help=timeout[2])
    return ap


def stage_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> tuple[argparse.Namespace, Path, dict]:
    """The arguments, the work folder (made) and the sizes (toy sizes with --cpu-dry-run)."""
    a = parser.parse_args(argv)
    work = Path(a.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    return a, work, CPU if a.cpu_dry_run else GPU


def data_for(work: Path, p: dict, tag: str) -> tuple[Path, dict]:
    """The stage's shards and the start of its JSON."""
    t0 = time.monotonic()
    data = make_data(work, p)
    result = {"data": str(data), "data_seconds": round(time.monotonic() - t0, 1), "runs": []}
    print(f"[{tag}] synthetic ImageNet shards in {data} ({result['data_seconds']} s)", flush=True)
    return data, result


def _train(argv: list[str], log: Path, timeout: float, until=None) -> tuple[int | None, str]:
    """Run `python -m trainer.train ARGV` in its own session; with `until`, SIGKILL it (its loader workers
    too) as soon as `until()` holds. Returns (exit code, None when killed; its output)."""
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "trainer.train", *argv], cwd=ROOT, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
        end = time.monotonic() + timeout
        try:
            while proc.poll() is None:
                if time.monotonic() > end:
                    raise TimeoutError(f"trainer.train still running after {timeout:.0f} s; see {log}")
                if until is not None and until():
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                    return None, log.read_text()
                time.sleep(0.2)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    return proc.returncode, log.read_text()


def run_precision(work: Path, data: Path, p: dict, precision: str, on_cpu: bool, timeout: float) -> dict:
    run_as = "fp32" if on_cpu and precision == "fp16" else precision
    row = {"precision": precision, "ran_as": run_as, "steps": p["steps"], "batch": p["batch"],
           "image_size": p["size"], "T": p["T"]}
    if run_as != precision:
        row["fp16"] = FP16_ON_CPU
    final = f"checkpoints/step_{p['steps']:08d}"
    for kind in ("uninterrupted", "killed"):
        run_dir = work / f"{precision}-{kind}"
        argv = ["--recipe", "ms_resnet18_imagenet", "--set", f"data.path={data}", f"run_dir={run_dir}",
                f"engine.device={'cpu' if on_cpu else 'cuda'}", "mlflow.enabled=false", *overrides(p, run_as)]
        t0 = time.monotonic()
        if kind == "killed":
            first = run_dir / f"checkpoints/step_{p['every']:08d}"
            code, out = _train(argv, work / f"{precision}-killed-1.log", timeout, until=first.exists)
            if code is not None:
                raise RuntimeError(f"{precision}-killed: exited ({code}) before its first checkpoint:\n{out[-2000:]}")
            print(f"[train] {precision}-killed: SIGKILLed after {first.name}", flush=True)
        code, out = _train(argv, work / f"{precision}-{kind}.log", timeout)
        if code != 0 or not (run_dir / final).is_dir():
            raise RuntimeError(f"{precision}-{kind}: exit code {code}, no {final}:\n{out[-3000:]}")
        result = json.loads(next(line for line in out.splitlines() if line.startswith("result "))[7:])
        row[kind] = {"seconds": round(time.monotonic() - t0, 1), "final_step": result.get("step"),
                     "val_top1": result.get("val/top1")}
        if kind == "killed":
            row[kind]["resumed_from_step"] = resumed_from(out)
        print(f"[train] {precision}-{kind}: done in {row[kind]['seconds']} s", flush=True)
    row["weights"] = compare_runs(work, precision, final, "train")
    return row


def build_parser() -> argparse.ArgumentParser:
    return stage_parser(__doc__, "data, run directories and their logs",
                        ("--run-timeout", 60, "seconds per trainer.train process"))


def main(argv: list[str] | None = None) -> None:
    a, work, p = stage_args(build_parser(), argv)
    data, result = data_for(work, p, "train")
    for precision in ("bf16", "fp16"):
        try:
            result["runs"].append(run_precision(work, data, p, precision, a.cpu_dry_run, a.run_timeout))
        except (RuntimeError, TimeoutError, StopIteration) as e:
            result["runs"].append({"precision": precision, "error": str(e)[-3000:]})
            print(f"[train] {precision} FAILED: {str(e)[-2000:]}", flush=True)
        Path(a.json).write_text(json.dumps(result, indent=1))
    if failed := [r["precision"] for r in result["runs"] if "error" in r]:
        raise SystemExit(f"[train] failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
