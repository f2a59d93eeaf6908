"""bench/gpu_check.sh, known to work before any GPU is at hand: its rehearsal end to end (the offline bundle
built, a fresh venv holding only what the GPU machine has, the bundle installed there with --no-index, the
ops built, every stage at toy sizes on the CPU: the speed and memory table, `trainer.train` killed and
resumed, the trainer's process group and evaluation, the CUDA test files), the Ray stage in this venv (a real
Ray head, `ray job submit`, a killed and resumed job), and the stage runner's timeout and failure handling."""

from __future__ import annotations

import contextlib
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from bench.gpu_check.run import STAGES, main, run_stage

ROOT = Path(__file__).resolve().parents[1]


def test_a_stage_past_its_timeout_is_stopped_with_its_children_and_a_failing_one_is_recorded():
    child = ("import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', 'import time; "
             "time.sleep(120)']); print(p.pid, flush=True); time.sleep(120)")
    t0 = time.monotonic()
    status, rc, tail = run_stage([sys.executable, "-c", child], timeout=3, env=dict(os.environ))
    assert status == "timeout" and rc != 0 and time.monotonic() - t0 < 30
    grandchild = int(tail.split()[0])
    time.sleep(0.5)
    with contextlib.suppress(psutil.NoSuchProcess):  # the whole process group went, not just the stage
        assert psutil.Process(grandchild).status() == psutil.STATUS_ZOMBIE  # (not reaped yet: gone too)
    assert run_stage([sys.executable, "-c", "print('boom'); raise SystemExit(3)"], 30, dict(os.environ)) == (
        "failed", 3, "boom\n")


def test_stages_left_without_budget_are_skipped_and_recorded(tmp_path):
    with pytest.raises(SystemExit) as e:
        main(["--out", str(tmp_path), "--work", str(tmp_path / "work"), "--budget-s", "5", "--cpu-dry-run"])
    assert e.value.code == 1
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert list(result["stages"]) == list(STAGES)
    assert all(s["status"] == "skipped" for s in result["stages"].values())


def log_and_result(out: Path, proc: subprocess.CompletedProcess) -> tuple[str, dict]:
    log = (out / "gpu_check.log").read_text()
    assert proc.returncode == 0, log[-5000:]
    return log, json.loads((out / "gpu_check.json").read_text())


@pytest.mark.slow
def test_rehearsal_installs_the_bundle_offline_and_runs_every_stage_without_ray(tmp_path):
    out = tmp_path / "out"
    # The stages' dry-run timeouts are for a quiet machine; a loaded one (5 developers' tests on 2 cores)
    # gets a stretched budget so that its stages do not time out.
    env = dict(os.environ, GPU_CHECK_BUDGET_S="2400")
    env.pop("PYTHONPATH", None)
    proc = subprocess.run(["bash", "bench/gpu_check.sh", "--rehearse", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=3600, check=False)
    log, r = log_and_result(out, proc)
    bundle = out / "rehearsal/bundle"
    wheels = {w.name.split("-")[0].lower() for w in bundle.glob("*.whl")}
    assert sum(w.stat().st_size for w in bundle.glob("*.whl")) <= 60 * 2**20
    assert {"deepspeed", "hjson", "pydantic", "pydantic_core", "webdataset", "wids", "simplejpeg",
            "spikingjelly", "loguru", "mlflow_skinny"} <= wheels
    assert not wheels & {"torch", "triton", "torchvision", "numpy", "pyyaml", "requests", "protobuf", "ray"}
    # Installed with --no-index into a venv that had only the GPU machine's packages; nothing reached an index.
    install = (out / "install.txt").read_text()
    assert "Successfully installed" in install and "deepspeed-" in install
    assert "No module named" not in log + json.dumps(r) and "ModuleNotFoundError" not in log + json.dumps(r)
    assert r["mode"] == "cpu-dry-run" and r["env"]["ray"] == "missing"
    assert r["env"]["deepspeed"] != "missing" and r["env"]["torch"] != "missing"
    assert [(n, s["status"]) for n, s in r["stages"].items()] == [
        ("speed", "ok"), ("train", "ok"), ("nccl", "ok"), ("tests", "ok"), ("ray", "unavailable")], r["stages"]
    for name in ("speed", "train", "nccl", "tests"):
        assert f"== {name}: start" in log and f"== {name}: OK" in log

    speed = r["stages"]["speed"]["result"]
    assert [(row["model"], row["setting"]) for row in speed["rows"]] == [
        ("ms_resnet18", "none"), ("ms_resnet18", "1"), ("ms_resnet34", "none"), ("ms_resnet34", "1")]
    for row in speed["rows"]:
        assert "error" not in row, row
        assert row["images_per_s"] > 0 and math.isfinite(row["loss"])
        assert 0 < row["step_gib"] < row["peak_gib"] and 0 < row["planned_step_gib"] < row["planned_peak_gib"]
    first, second = speed["largest_batch"]
    assert (first["setting"], second["setting"]) == ("none", "1") and "error" not in first and "error" not in second
    assert first["probes"][0][0] == first["predicted"] and len(first["probes"]) >= 2
    assert speed["lif"]["torch.float32"]["deepspike op"]["forward_ms"] > 0

    train = r["stages"]["train"]["result"]
    assert [run["precision"] for run in train["runs"]] == ["bf16", "fp16"]
    for run in train["runs"]:
        assert "error" not in run, run
        assert run["uninterrupted"]["final_step"] == run["killed"]["final_step"] == run["steps"] == 8
        assert 4 <= run["killed"]["resumed_from_step"] < 8
        assert run["weights"]["bitwise_equal"] and run["weights"]["max_abs_diff"] == 0
    assert train["runs"][1]["ran_as"] == "fp32" and train["runs"][1]["fp16"].startswith("substituted on CPU")

    nccl = r["stages"]["nccl"]["result"]
    assert nccl["ok"] and nccl["backend"] == "gloo" and nccl["evaluate"]["val/samples"] == 8

    tests = r["stages"]["tests"]["result"]
    assert tests["passed"] >= 40 and tests["failures"] == tests["errors"] == 0
    assert tests["cuda_cases"] >= 40
    if not torch.cuda.is_available():
        assert tests["cuda_cases_run"] == 0


@pytest.mark.slow
def test_ray_stage_submits_kills_and_resumes_a_job_where_ray_is_installed(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "bench.gpu_check.run", "--out", str(out), "--work",
                           str(tmp_path / "work"), "--stages", "ray", "--cpu-dry-run", "--budget-s", "1800"],
                          cwd=ROOT, capture_output=True, text=True, timeout=2000, check=False)
    assert proc.returncode == 0, proc.stdout[-5000:]
    r = json.loads((out / "gpu_check.json").read_text())
    ray = r["stages"]["ray"]["result"]
    assert [run["precision"] for run in ray["runs"]] == ["bf16"]  # no fp16 on a CPU
    for run in ray["runs"]:
        assert "error" not in run, run
        assert run["uninterrupted"]["final_step"] == run["killed"]["final_step"] == run["steps"] == 8
        assert run["uninterrupted"]["worker_groups"] == 1 and run["killed"]["worker_groups"] == 2
        assert 4 <= run["killed"]["resumed_from_step"] < 8
        assert run["weights"]["bitwise_equal"] and run["weights"]["max_abs_diff"] == 0
    assert (out / "ray_logs/job-bf16-killed.log").is_file()
