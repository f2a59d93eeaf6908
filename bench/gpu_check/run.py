"""The GPU check's stages, run by bench/gpu_check.sh after it installed the offline bundle and built the
compiled ops; one H100 or H200, 6 minutes in all with those install steps. Never run by CI.

    python -m bench.gpu_check.run --out DIR [--budget-s 300] [--cpu-dry-run] [--work DIR] [--stages a,b]

Stages, in this order (the speed table first: it is what the GPU time is for), each a subprocess with its
own timeout, cut to what the whole budget has left; a stage that fails or runs out of time is recorded in
DIR/gpu_check.json (rewritten after every stage) and the next one runs:
  speed  bench.gpu_check.speed: MS-ResNet-18/34/104 at 224 px, T=6, bf16, images/s and memory with and
         without activation checkpointing, the largest 104 batch, bench.max_batch's prediction beside each; the
         LIF op's forward + backward against the reference and SpikingJelly's LIFNode (its CuPy kernels too)
  train  bench.gpu_check.train: `python -m trainer.train` on one GPU, bf16 then fp16, killed and resumed,
         weights against an uninterrupted run
  nccl   bench.gpu_check.nccl: the trainer's 'cpu:gloo,cuda:nccl' group, world of one, evaluation on the device
  tests  pytest tests/test_models_reference.py tests/test_lif_op.py, their CUDA variants (the Triton LIF
         kernel through the registered op and autograd against the reference, double backward, compile)
  ray    bench.gpu_check.ray_stage: the train stage through `ray job submit`; skipped, with the reason in
         the JSON, where Ray is not installed (the offline bundle leaves it out: its wheel alone is ~78 MB)
--cpu-dry-run runs the same sequence at toy sizes on the CPU (tests/test_gpu_check.py): DeepSpeed has no
fp16 there, so the train stage's fp16 runs are fp32 and the JSON says "fp16": "substituted on CPU"; the Ray
stage runs bf16 only.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from importlib import metadata
from pathlib import Path

from bench.gpu_check.bundle import NO_DEPS, PREINSTALLED, RESOLVED
from bench.gpu_check.train import FP16_ON_CPU

ROOT = Path(__file__).resolve().parents[2]
TEST_FILES = ["tests/test_models_reference.py", "tests/test_lif_op.py"]
# On a GPU only the CUDA variants (CI runs the CPU ones). The dry run leaves out the four tests that only
# re-check CPU-side machinery (interpreter, compile, opcheck, the missing-op message): they take most of the
# files' CPU time.
GPU_TESTS = "cuda"
DRY_RUN_TESTS = "not triton and not traces and not opcheck and not missing_compiled"
# name: (timeout on one H100, timeout in the CPU dry run), seconds. No GPU has run them yet; the GPU column
# is an estimate from the CPU runs and the work each does: speed 6 rows of ~8 s (2 warm-up + 5 steps, an
# engine build) plus the calibrations, the largest-batch search stops in time; train 4 trainer.train
# processes of ~15 s start-up + 30 steps (2 of them twice: killed, resumed); nccl one start-up; tests ~25
# CUDA cases, most of the time cold Triton compiles. With ~15 s of bundle install and ~45 s of op build they
# fill the 6 minutes (gpu_check.sh). Ray is 0 there: the bundle has no Ray.
STAGES = {"speed": (110, 150), "train": (100, 240), "nccl": (25, 60), "tests": (70, 90), "ray": (230, 300)}
# Every version the JSON records: the machine's own packages, the bundle's, and what the bundle leaves out.
PACKAGES = (*PREINSTALLED, "deepspeed", *RESOLVED, *NO_DEPS, "pydantic-core", "mlflow", "ray")


def environment(dry_run: bool) -> dict:
    import torch

    from trainer.distributed import cuda_found

    env = {"python": platform.python_version(), "mode": "cpu-dry-run" if dry_run else "gpu",
           "cuda_available": torch.cuda.is_available(), "cuda_found": cuda_found(), "torch_cuda": torch.version.cuda,
           "cpus": os.cpu_count()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda)
    for name in PACKAGES:  # without importing: a missing one explains a failing stage, it does not stop them
        try:
            env[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            env[name] = "missing"
    return env


def run_stage(cmd: list[str], timeout: float, env: dict[str, str]) -> tuple[str, int | None, str]:
    """(status, return code, last output) of `cmd` in its own process group, its output streamed to ours.
    Past `timeout` the group gets SIGTERM (a stage cleans up on it) and, 30 s later, SIGKILL."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            bufsize=1, start_new_session=True)
    tail: list[str] = []

    def pump() -> None:
        for line in proc.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            tail.append(line)
            del tail[:-60]

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    status = "ok"
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        status = "timeout"
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    reader.join(timeout=10)
    if status == "ok" and proc.returncode != 0:
        status = "failed"
    return status, proc.returncode, "".join(tail)[-4000:]


def junit_counts(xml_path: Path) -> dict:
    suite = ET.parse(xml_path).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    cuda = [c for c in suite.iter("testcase") if "cuda" in c.get("name", "")]
    ran = [c for c in cuda if c.find("skipped") is None]
    counts["cuda_cases"] = len(cuda)
    counts["cuda_cases_run"] = len(ran)
    counts["cuda_cases_passed"] = sum(c.find("failure") is None and c.find("error") is None for c in ran)
    counts["failed_cases"] = [c.get("name") for c in suite.iter("testcase")
                              if c.find("failure") is not None or c.find("error") is not None][:20]
    return counts


def commands(work: Path, dry_run: bool, timeouts: dict[str, float]) -> dict[str, tuple[list[str], Path]]:
    py, dry = sys.executable, ["--cpu-dry-run"] if dry_run else []
    xml = work / "tests.xml"
    tests = [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", *TEST_FILES, f"--junitxml={xml}", "-rfEs",
             "-k", DRY_RUN_TESTS if dry_run else GPU_TESTS]
    # Each job may use the stage's time less what data and the cluster start take, split over 4 jobs.
    job_timeout = max(30.0, (timeouts["ray"] - 20) / 4 * 1.5)
    # The train stage's 6 processes (2 of them restarts) share its time less the data's.
    run_timeout = max(30.0, (timeouts["train"] - 10) / 4)
    return {"speed": ([py, "-m", "bench.gpu_check.speed", "--json", str(work / "speed.json"),
                       "--budget-s", f"{timeouts['speed']:.0f}", *dry], work / "speed.json"),
            "train": ([py, "-m", "bench.gpu_check.train", "--work", str(work / "train"), "--json",
                       str(work / "train.json"), "--run-timeout", f"{run_timeout:.0f}", *dry], work / "train.json"),
            "nccl": ([py, "-m", "bench.gpu_check.nccl", "--json", str(work / "nccl.json"), *dry], work / "nccl.json"),
            "tests": (tests, xml),
            "ray": ([py, "-m", "bench.gpu_check.ray_stage", "--work", str(work / "ray"), "--json",
                     str(work / "ray.json"), "--job-timeout", f"{job_timeout:.0f}", *dry], work / "ray.json")}


def after_ray(work: Path, out: Path) -> None:
    """Stop a Ray head the stage could not stop itself (killed past its timeout), keep the job logs."""
    from cluster.local import kill_groups

    pgids = work / "ray/ray_pgids.json"
    if pgids.is_file():
        kill_groups(json.loads(pgids.read_text()))
        print("[gpu_check] stopped the ray stage's Ray head left behind", flush=True)
    (out / "ray_logs").mkdir(exist_ok=True)
    for log in (work / "ray").glob("*.log"):
        shutil.copy(log, out / "ray_logs" / log.name)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="gpu_check.json and the Ray job logs go here")
    ap.add_argument("--work", help="data, checkpoints, Ray job logs (default: a new folder under /tmp, removed "
                    "when every stage is ok)")
    ap.add_argument("--budget-s", type=float, help="all stages together (default: the sum of their timeouts; "
                    "more stretches each timeout in proportion)")
    ap.add_argument("--cpu-dry-run", action="store_true")
    ap.add_argument("--stages", default=",".join(STAGES), help="a subset, in this order")
    return ap


def main(argv: list[str] | None = None) -> None:
    ap = build_parser()
    a = ap.parse_args(argv)
    if unknown := set(a.stages.split(",")) - set(STAGES):
        ap.error(f"unknown stage(s) {', '.join(sorted(unknown))}; the stages are {', '.join(STAGES)}")
    t0 = time.monotonic()
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = Path(a.work or tempfile.mkdtemp(prefix="deepspike-gpu-check-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    col = 1 if a.cpu_dry_run else 0
    names = a.stages.split(",")
    unavailable = {"ray"} & set(names) if importlib.util.find_spec("ray") is None else set()
    planned = sum(STAGES[n][col] for n in names if n not in unavailable)
    budget = a.budget_s or planned
    result = {"mode": "cpu-dry-run" if a.cpu_dry_run else "gpu", "started": time.strftime("%Y-%m-%dT%H:%M:%SZ",
              time.gmtime()), "budget_s": budget, "work": str(work), "env": environment(a.cpu_dry_run),
              "stages": {}}
    if a.cpu_dry_run:
        result["fp16"] = FP16_ON_CPU
    json_path = out / "gpu_check.json"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    # A larger budget (a loaded machine) stretches every stage's timeout alike.
    timeouts = {name: t[col] * max(1.0, budget / planned) for name, t in STAGES.items()}
    cmds = commands(work, a.cpu_dry_run, timeouts)
    for name in names:
        if name in unavailable:
            why = "Ray is not installed here (the offline bundle leaves it out); the train stage ran without it"
            result["stages"][name] = {"status": "unavailable", "error": why}
            print(f"[gpu_check] == {name}: UNAVAILABLE ({why})", flush=True)
            continue
        left = budget - (time.monotonic() - t0)
        timeout = min(timeouts[name], left)
        if timeout < 10:
            result["stages"][name] = {"status": "skipped", "error": f"{left:.0f} s of the budget left"}
            print(f"[gpu_check] == {name}: SKIPPED ({left:.0f} s of the budget left)", flush=True)
            continue
        cmd, part = cmds[name]
        print(f"[gpu_check] == {name}: start, timeout {timeout:.0f} s: {' '.join(cmd)}", flush=True)
        t_stage = time.monotonic()
        part.unlink(missing_ok=True)
        status, rc, tail = run_stage(cmd, timeout, env)
        stage = {"status": status, "returncode": rc, "seconds": round(time.monotonic() - t_stage, 1)}
        if name == "ray":
            after_ray(work, out)
        try:
            if part.is_file():  # a stage that timed out or failed may still have written part of its results
                stage["result"] = junit_counts(part) if name == "tests" else json.loads(part.read_text())
        except (ET.ParseError, json.JSONDecodeError) as e:
            stage["result_error"] = f"{part}: {e}"
        if status != "ok":
            stage["error"] = tail
        result["stages"][name] = stage
        result["total_seconds"] = round(time.monotonic() - t0, 1)
        json_path.write_text(json.dumps(result, indent=1))
        print(f"[gpu_check] == {name}: {status.upper()} in {stage['seconds']} s", flush=True)
    result["total_seconds"] = round(time.monotonic() - t0, 1)
    json_path.write_text(json.dumps(result, indent=1))
    failed = [n for n, s in result["stages"].items() if s["status"] not in ("ok", "unavailable")]
    if not a.work and not failed:
        shutil.rmtree(work, ignore_errors=True)  # data and checkpoints; kept when a stage needs looking into
    print(f"[gpu_check] done in {result['total_seconds']} s; {json_path}; "
          + (f"not ok: {', '.join(failed)}; its data and checkpoints are in {work}" if failed else "every stage ok"),
          flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
