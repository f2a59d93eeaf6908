"""Ray Train against plain torchrun for the same tiny job at world size 2: time to first step and
steady-state step time, side by side.

    python -m bench.launch [--steps 60] [--warmup 10]

Both sides train `digits_tiny` (fp32, one thread per rank, a checkpoint only at the end) on 2 CPU ranks:
torchrun on this machine, and `ray job submit -- python launch/cifar10.py --nodes 2` on the local 2-node
cluster (`cluster/local.sh up 2`; started here if it is not up, and stopped again). Every step is logged
to one MLflow store, so both sides are timed by the same code: the time to the first step runs from the
moment the command is started to the wall-clock stamp of step 1's metrics, the step time is the median
of the trainer's own `perf/step_s` after the warm-up. Targets (issue 5): Ray's steady-state step time
within 10 % of torchrun's, its first step within 30 s of submission.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import mlflow

from cluster.local import client_env
from trainer.run_record import local_store_uri

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
OUT = ROOT / "runs/bench-launch"


def overrides(steps: int, store: str) -> list[str]:
    return [f"optim.max_steps={steps}", "checkpoint.every_steps=0", "log_every=1", "engine.precision=fp32",
            f"mlflow.tracking_uri={store}", "mlflow.system_metrics=false", "mlflow.log_model=false"]


def timed(argv: list[str], env: dict[str, str], log: Path) -> float:
    """Run to completion; returns the wall-clock start (time.time(), like MLflow's metric stamps)."""
    start = time.time()
    with open(log, "w") as f:
        if subprocess.run(argv, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT).returncode:
            sys.exit(f"{argv[0]} failed; see {log}")
    return start


def measure(store: str, run_name: str, start: float, warmup: int) -> tuple[float, float]:
    client = mlflow.MlflowClient(store)
    [run] = client.search_runs([client.get_experiment_by_name("digits_tiny").experiment_id],
                               f"attributes.run_name = '{run_name}'")
    history = sorted(client.get_metric_history(run.info.run_id, "perf/step_s"), key=lambda m: m.step)
    first = history[0].timestamp / 1000 - start
    return first, statistics.median(m.value for m in history if m.step > warmup)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--warmup", type=int, default=10, help="steps left out of the steady-state median")
    return p


def main(argv: list[str] | None = None) -> None:
    a = build_parser().parse_args(argv)
    OUT.mkdir(parents=True, exist_ok=True)
    data = ROOT / "data/digits16"
    if not (data / "test/manifest.json").is_file():
        subprocess.run([sys.executable, "-m", "dataloaders.convert", "digits", "--out", str(data), "--format",
                        "wds", "--size", "16"], cwd=ROOT, check=True)
    store = local_store_uri(OUT)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    env = dict(os.environ, OMP_NUM_THREADS="1")

    name = f"torchrun-{stamp}"
    start = timed([str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", "-m", "trainer.train",
                   "--recipe", "digits_tiny", "--run-name", name, "--set", f"data.path={data}",
                   f"run_dir={OUT / name}", *overrides(a.steps, store)], env, OUT / f"{name}.log")
    torchrun = measure(store, name, start, a.warmup)

    started_cluster = not (ROOT / "runs/cluster/state.json").is_file()
    subprocess.run([str(ROOT / "cluster/local.sh"), "up", "2"], cwd=ROOT, check=True, capture_output=True)
    try:
        state = json.loads((ROOT / "runs/cluster/state.json").read_text())
        name = f"ray-{stamp}"
        start = timed([str(BIN / "ray"), "job", "submit", "--", "python", "launch/cifar10.py", "--nodes", "2",
                       "--recipe", "digits_tiny", "--data", str(data), "--storage", str(OUT),
                       "--run-name", name, "--set", *overrides(a.steps, store)],
                      dict(env, **client_env(state)), OUT / f"{name}.log")
        ray = measure(store, name, start, a.warmup)
    finally:
        if started_cluster:
            subprocess.run([str(ROOT / "cluster/local.sh"), "down"], cwd=ROOT, check=True)

    print(f"digits_tiny, world size 2 (one CPU rank per node under Ray), {a.steps} steps, "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(f"{'':28s}{'torchrun':>10s}{'Ray Train':>11s}{'Ray/torchrun':>14s}")
    for label, i in (("time to first step (s)", 0), ("steady-state step (s)", 1)):
        print(f"{label:28s}{torchrun[i]:10.2f}{ray[i]:11.2f}{ray[i] / torchrun[i]:14.2f}")
    steady = ray[1] / torchrun[1] - 1
    print(f"targets: steady-state within 10 %: {steady:+.1%} {'ok' if steady <= 0.10 else 'MISSED'}; "
          f"first step within 30 s of submission: {ray[0]:.1f} s {'ok' if ray[0] <= 30 else 'MISSED'}")


if __name__ == "__main__":
    main()
