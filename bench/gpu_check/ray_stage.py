"""Stage `ray` of bench/gpu_check.sh, for machines that have Ray (the run skips it where Ray is missing):
`ray job submit -- python launch/imagenet.py --nodes 1 --gpus-per-node 1` on the train stage's synthetic
shards with its settings, bf16 then fp16, each run once uninterrupted and once with its training worker
SIGKILLed after the first checkpoint (Ray restarts the worker group, the trainer resumes), and the final
weights of the two compared.

    python -m bench.gpu_check.ray_stage --work DIR --json out.json [--cpu-dry-run]

The cluster is one Ray head on a loopback address with ports picked free here, started in its own session
and stopped by its process group, so nothing else on the machine is touched. With --cpu-dry-run the same
sequence runs at toy sizes on CPU workers (`--gpus-per-node 0`), in bf16 only: DeepSpeed has no fp16 on a
CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from bench.gpu_check.train import compare_runs, data_for, overrides, resumed_from, stage_args, stage_parser

ROOT = Path(__file__).resolve().parents[2]
HOST = "127.0.3.1"  # loopback, away from cluster/local.sh's 127.0.0.2 and the tests' 127.0.1.x
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
        # RAY_ADDRESS: Ray Train's placement-group cleaner looks its cluster up with address "auto", which
        # fails when another cluster runs on the machine (a demo's, a test's); the head's processes inherit it.
        self.env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled",
                        RAY_API_SERVER_ADDRESS=self.dashboard, RAY_ADDRESS=f"{HOST}:{ports['port']}")
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
        from cluster.local import kill_groups

        kill_groups(self.pgids)
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


def run_precision(head: RayHead, data: Path, storage: Path, p: dict, precision: str, on_cpu: bool,
                  timeout: float) -> dict:
    from ray.job_submission import JobStatus

    common = ["--nodes", "1", "--gpus-per-node", "0" if on_cpu else "1", "--recipe", "ms_resnet18_imagenet",
              "--data", str(data), "--storage", str(storage)]
    final = f"checkpoints/step_{p['steps']:08d}"
    row = {"precision": precision, "steps": p["steps"], "batch": p["batch"], "image_size": p["size"], "T": p["T"]}
    for kind in ("uninterrupted", "killed"):
        name = f"{precision}-{kind}"
        sid = f"gpucheck-{name}-{time.monotonic_ns()}"
        t0 = time.monotonic()
        deadline = t0 + timeout
        head.submit(sid, [*common, "--run-name", name, "--set", *overrides(p, precision)])
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
            row[kind]["resumed_from_step"] = resumed_from(logs)
        print(f"[ray] {name}: {status} in {row[kind]['seconds']} s", flush=True)
    row["weights"] = compare_runs(storage, precision, final, "ray")
    return row


def build_parser() -> argparse.ArgumentParser:
    return stage_parser(__doc__, "data, Ray logs and run storage",
                        ("--job-timeout", 150, "seconds per job start (the killed run starts twice)"))


def main(argv: list[str] | None = None) -> None:
    a, work, p = stage_args(build_parser(), argv)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # a stage timeout still stops the cluster
    data, result = data_for(work, p, "ray")
    with RayHead(work, gpus=0 if a.cpu_dry_run else 1) as head:
        print(f"[ray] head {HOST}, dashboard {head.dashboard}", flush=True)
        # The dry run leaves fp16 out: DeepSpeed has no fp16 on a CPU, and the fp32 run it would get instead
        # repeats the Ray sequence bf16 just ran (the train stage still rehearses the substitution).
        for precision in ("bf16",) if a.cpu_dry_run else ("bf16", "fp16"):
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
