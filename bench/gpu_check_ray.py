"""Stage (b) of bench/gpu_check.sh: `ray job submit -- python launch/imagenet.py --nodes 1 --gpus-per-node 1`
on synthetic ImageNet-layout shards, bf16 then fp16, each run once uninterrupted and once with its training
worker SIGKILLed after the first checkpoint (Ray restarts the worker group, the trainer resumes), and the
final weights of the two compared.

    python -m bench.gpu_check_ray --work DIR --json out.json [--cpu-dry-run]

The JPEG folders come from dataloaders.synthetic and are converted with `python -m dataloaders.convert`,
as a user would. The cluster is one Ray head on a loopback address with ports picked free here, started in
its own session and stopped by its process group, so nothing else on the machine is touched. With
--cpu-dry-run the same sequence runs at toy sizes on CPU workers (`--gpus-per-node 0`); DeepSpeed has no
fp16 on a CPU, so the fp16 stage runs in fp32 (the other precision without autocast) and says so.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
HOST = "127.0.3.1"  # loopback, away from cluster/local.sh's 127.0.0.2 and the tests' 127.0.1.x
# (classes, train per class, val per class, side range, steps, checkpoint every, per-rank batch, image
# size, loader workers, T)
GPU = dict(classes=10, per_class=32, val_per_class=4, sides=(96, 256), steps=50, every=10, batch=32,
           size=112, workers=8, T=6)
CPU = dict(classes=4, per_class=8, val_per_class=2, sides=(40, 64), steps=8, every=4, batch=4,
           size=32, workers=1, T=2)


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


class RayHead:
    """One Ray head node (with the GPU or the CPUs as its resources), its ports picked free now."""

    def __init__(self, work: Path, gpus: int):
        from trainer.distributed import free_port

        self.work, self.pgids = work, []
        ports = {flag: free_port() for flag in ("port", "dashboard-port", "dashboard-agent-listen-port",
                                                "dashboard-agent-grpc-port", "metrics-export-port",
                                                "runtime-env-agent-port", "ray-client-server-port")}
        self.dashboard = f"http://{HOST}:{ports['dashboard-port']}"
        self.tmp = f"/tmp/dsgc-ray-{ports['port']}"  # Ray's socket paths must stay short
        self.env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled",
                        RAY_API_SERVER_ADDRESS=self.dashboard)
        if not gpus:
            self.env["DS_ACCELERATOR"] = "cpu"
        self.argv = [*_ray_cli(), "start", "--head", f"--node-ip-address={HOST}", f"--dashboard-host={HOST}",
                     *(f"--{k}={v}" for k, v in ports.items()), f"--temp-dir={self.tmp}",
                     f"--num-cpus={os.cpu_count()}", f"--num-gpus={gpus}", "--object-store-memory=500000000",
                     "--disable-usage-stats"]

    def __enter__(self) -> RayHead:
        log = open(self.work / "ray_head.log", "ab")  # noqa: SIM115  the daemons keep writing after `start`
        proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=ROOT,
                                start_new_session=True)
        self.pgids.append(proc.pid)
        # The orchestrator kills these groups if this process dies before __exit__ could.
        (self.work / "ray_pgids.json").write_text(json.dumps(self.pgids))
        if proc.wait(timeout=120) != 0:
            raise RuntimeError(f"`ray start --head` failed; see {self.work / 'ray_head.log'}")
        return self

    def __exit__(self, *exc) -> None:
        from cluster.local import _kill_groups

        _kill_groups(self.pgids)
        (self.work / "ray_pgids.json").unlink(missing_ok=True)
        shutil.rmtree(self.tmp, ignore_errors=True)  # Ray's session files; the job logs are kept in `work`

    def submit(self, sid: str, args: list[str]) -> None:
        """`ray job submit --no-wait --submission-id SID -- python launch/imagenet.py ARGS`."""
        subprocess.run([*_ray_cli(), "job", "submit", "--no-wait", "--submission-id", sid, "--",
                        sys.executable, str(ROOT / "launch/imagenet.py"), *args],
                       cwd=ROOT, env=self.env, check=True, capture_output=True, timeout=120)

    def wait(self, sid: str, timeout: float, until=None):
        """Poll until the job ends or `until()` holds; a job still running at the timeout is stopped (it
        would hold the node's resources against the next one)."""
        from ray.job_submission import JobSubmissionClient

        client, end = JobSubmissionClient(self.dashboard), time.monotonic() + timeout
        while time.monotonic() < end:
            status = client.get_job_status(sid)
            if status.is_terminal() or (until is not None and until()):
                return status
            time.sleep(0.5)
        client.stop_job(sid)
        raise TimeoutError(f"job {sid} still {status} after {timeout:.0f} s; stopped it")

    def logs(self, sid: str) -> str:
        from ray.job_submission import JobSubmissionClient

        return JobSubmissionClient(self.dashboard).get_job_logs(sid)

    def train_workers(self, sid: str) -> list:
        from ray.job_submission import JobSubmissionClient
        from ray.util.state import list_actors

        job_id = JobSubmissionClient(self.dashboard).get_job_info(sid).job_id
        return list_actors(address=self.dashboard, detail=True, limit=1000,
                           filters=[("class_name", "=", "RayTrainWorker"), ("job_id", "=", job_id)])


def _ray_cli() -> list[str]:
    # Not the `ray` script: on a bare GPU box the wheels sit in a --target folder without a usable bin/.
    return [sys.executable, "-m", "ray.scripts.scripts"]


def weights(step_dir: Path) -> dict[str, torch.Tensor]:
    sd = torch.load(step_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    return {k: v for k, v in sd.items() if torch.is_tensor(v)}


def compare(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict:
    if a.keys() != b.keys():
        return {"bitwise_equal": False, "error": f"different tensors: {sorted(a.keys() ^ b.keys())[:5]}"}
    diff = {k: a[k].double() - b[k].double() for k in a if a[k].numel()}
    norm = sum(a[k].double().square().sum().item() for k in diff) ** 0.5
    # On CUDA, cuDNN's non-deterministic kernels alone may make a resumed run differ: rel_l2 says by how much.
    return {"bitwise_equal": all(torch.equal(a[k], b[k]) for k in a),
            "max_abs_diff": max(d.abs().max().item() for d in diff.values()),
            "rel_l2": sum(d.square().sum().item() for d in diff.values()) ** 0.5 / max(norm, 1e-30),
            "tensors": len(a)}


def run_precision(head: RayHead, data: Path, storage: Path, p: dict, precision: str, on_cpu: bool,
                  timeout: float) -> dict:
    from ray.job_submission import JobStatus

    run_as = "fp32" if on_cpu and precision == "fp16" else precision
    overrides = [f"optim.max_steps={p['steps']}", f"optim.global_batch={p['batch']}", f"data.batch_size={p['batch']}",
                 f"data.image_size={p['size']}", f"data.val_crop={p['size']}", f"data.val_resize={p['size'] * 8 // 7}",
                 f"data.num_workers={p['workers']}", f"model.T={p['T']}", f"checkpoint.every_steps={p['every']}",
                 f"log_every={p['every']}", "eval_every_epochs=1000", f"engine.precision={run_as}",
                 "mlflow.log_model=false", "mlflow.system_metrics=false"]
    if importlib.util.find_spec("deepspike_jpeg") is None:  # a box without libjpeg's headers: see gpu_check.sh
        overrides.append("data.window_decode=false")
    common = ["--nodes", "1", "--gpus-per-node", "0" if on_cpu else "1", "--recipe", "ms_resnet18_imagenet",
              "--data", str(data), "--storage", str(storage)]
    final = f"checkpoints/step_{p['steps']:08d}"
    row = {"precision": precision, "ran_as": run_as, "steps": p["steps"], "batch": p["batch"],
           "image_size": p["size"], "T": p["T"]}
    if run_as != precision:
        row["fp16"] = "substituted on CPU: DeepSpeed's CPU accelerator has no fp16, the stage ran in fp32"
    for kind in ("uninterrupted", "killed"):
        name = f"{precision}-{kind}"
        sid = f"gpucheck-{name}-{time.monotonic_ns()}"
        t0 = time.monotonic()
        deadline = t0 + timeout
        head.submit(sid, [*common, "--run-name", name, "--set", *overrides])
        print(f"[ray] {name}: submitted {sid}", flush=True)
        if kind == "killed":
            first = storage / name / f"checkpoints/step_{p['every']:08d}"
            status = head.wait(sid, deadline - time.monotonic(), until=first.exists)
            alive = [w for w in head.train_workers(sid) if w.state == "ALIVE"]
            if status.is_terminal() or not alive:
                raise RuntimeError(f"{name}: job {status} before its first checkpoint could be interrupted:\n"
                                   f"{head.logs(sid)[-2000:]}")
            os.kill(max(w.pid for w in alive), signal.SIGKILL)
            print(f"[ray] {name}: SIGKILLed the training worker after {first.name}", flush=True)
            # The restarted worker group starts up again like a new job: the killed run gets a second timeout.
            deadline = time.monotonic() + timeout
        status = head.wait(sid, deadline - time.monotonic())
        logs = head.logs(sid)
        (head.work / f"job-{name}.log").write_text(logs)
        if status != JobStatus.SUCCEEDED or not (storage / name / final).is_dir():
            raise RuntimeError(f"{name}: job {status}, no {final}:\n{logs[-3000:]}")
        done = re.search(r"\[launch\] done: step (\d+), test top-1 (\S+),", logs)
        row[kind] = {"seconds": round(time.monotonic() - t0, 1), "final_step": int(done[1]) if done else None,
                     "val_top1": float(done[2]) if done and done[2] != "None" else None,
                     "worker_groups": len(head.train_workers(sid))}
        if kind == "killed":
            resumed = re.search(r"resuming from \S*step_(\d{8})", logs)
            row[kind]["resumed_from_step"] = int(resumed[1]) if resumed else None
        print(f"[ray] {name}: {status} in {row[kind]['seconds']} s", flush=True)
    row["weights"] = compare(weights(storage / f"{precision}-uninterrupted" / final),
                             weights(storage / f"{precision}-killed" / final))
    print(f"[ray] {precision}: resumed weights vs uninterrupted: {row['weights']}", flush=True)
    return row


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", required=True, help="data, Ray logs and run storage")
    ap.add_argument("--json", required=True)
    ap.add_argument("--cpu-dry-run", action="store_true")
    ap.add_argument("--job-timeout", type=float, default=150, help="seconds per job start (the killed run "
                    "starts twice)")
    a = ap.parse_args(argv)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # a stage timeout still stops the cluster
    work = Path(a.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    p = CPU if a.cpu_dry_run else GPU
    t0 = time.monotonic()
    data = make_data(work, p)
    result = {"data": str(data), "data_seconds": round(time.monotonic() - t0, 1), "runs": []}
    print(f"[ray] synthetic ImageNet shards in {data} ({result['data_seconds']} s)", flush=True)
    with RayHead(work, gpus=0 if a.cpu_dry_run else 1) as head:
        print(f"[ray] head {HOST}, dashboard {head.dashboard}", flush=True)
        for precision in ("bf16", "fp16"):
            try:
                result["runs"].append(run_precision(head, data, work / "storage", p, precision, a.cpu_dry_run,
                                                    a.job_timeout))
            except (RuntimeError, TimeoutError, subprocess.SubprocessError) as e:
                result["runs"].append({"precision": precision, "error": str(e)[-3000:]})
                print(f"[ray] {precision} FAILED: {str(e)[-2000:]}", flush=True)
            Path(a.json).write_text(json.dumps(result, indent=1))
    Path(a.json).write_text(json.dumps(result, indent=1))
    if failed := [r["precision"] for r in result["runs"] if "error" in r]:
        raise SystemExit(f"[ray] failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
