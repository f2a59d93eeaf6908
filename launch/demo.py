"""`make demo`: the README's main command end to end on this machine.

1. converts scikit-learn's real handwritten digits into WebDataset shards in data/digits16 (kept);
2. starts a local Ray cluster (a head + 2 worker nodes) and an MLflow server: `cluster/local.sh up 2`,
   reused when it is already up;
3. runs `ray job submit -- python launch/cifar10.py --nodes 2 --recipe digits_demo ...` (DeepSpeed bf16 on
   two CPU workers, one per node) and prints its progress lines;
4. prints the test accuracy, every run of the experiment so far, and the MLflow UI address.

The cluster and the MLflow server stay up, so the next `make demo` starts faster and its run appears next
to this one; `cluster/local.sh down` stops them. Data, runs and logs stay under data/ and runs/
(git-ignored); the full job log of each run is runs/demo/<run name>.log.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from cluster.local import client_env

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DATA = ROOT / "data/digits16"
# Lines worth showing from the job's log stream: ours, not Ray's bookkeeping.
PROGRESS = re.compile(r"\[launch\]|\[trainer\]|^step \d+/\d+ |^eval step |^error:|Error|Traceback")


def step(msg: str) -> None:
    print(f"\n== {msg}", flush=True)


def run(argv: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=ROOT, check=True, **kw)


def main() -> None:
    t0 = time.monotonic()
    if not (DATA / "test/manifest.json").is_file():
        step(f"digits -> WebDataset shards in {DATA.relative_to(ROOT)}")
        run([sys.executable, "-m", "dataloaders.convert", "digits", "--out", str(DATA), "--format", "wds",
             "--size", "16"])
    step("local Ray cluster (head + 2 worker nodes) and MLflow server")
    run([str(ROOT / "cluster/local.sh"), "up", "2"])
    state = json.loads((ROOT / "runs/cluster/state.json").read_text())

    name = f"demo-{time.strftime('%Y%m%d-%H%M%S')}"
    done, log_path = submit(state, name)
    if done is None:
        print("".join(log_path.read_text().splitlines(keepends=True)[-40:]), file=sys.stderr)
        sys.exit(f"the job failed; full log: {log_path}")

    top1 = float(re.search(r"test top-1 ([0-9.]+)", done).group(1))
    step(f"test accuracy of {name}: {100 * top1:.1f} %  ({time.monotonic() - t0:.0f} s in all)")
    show_runs(state["mlflow"], "digits_demo")
    print("\nThe cluster and MLflow keep running for the next run; stop them with: cluster/local.sh down",
          flush=True)


def submit(state: dict, name: str, *extra: str, log_dir: Path = ROOT / "runs/demo") -> tuple[str | None, Path]:
    """`ray job submit -- python launch/cifar10.py ... --run-name NAME [EXTRA...]` on the cluster of
    `state`, printing the job's progress lines; returns its `[launch] done:` line (None when it failed) and
    the path of its full log, LOG_DIR/NAME.log."""
    log_path = log_dir / f"{name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    cmd = [str(BIN / "ray"), "job", "submit", "--", "python", "launch/cifar10.py", "--nodes", "2",
           "--recipe", "digits_demo", "--data", str(DATA.relative_to(ROOT)), "--run-name", name, *extra]
    step("ray job submit -- " + " ".join(cmd[cmd.index("--") + 1:]))
    env = dict(os.environ, **client_env(state))  # the addresses and the cluster's auth token
    done = None
    with open(log_path, "w") as log, subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                                      stderr=subprocess.STDOUT, text=True) as job:
        seen = set()
        for line in job.stdout:
            log.write(line)
            # Ray prefixes worker lines with "(RayTrainWorker pid=.., ip=..)" and may repeat them.
            text = re.sub(r"^\S*\((\w+) pid=[^)]*\)\S*\s*", "", line.rstrip())
            if PROGRESS.search(text) and text not in seen:
                seen.add(text)
                print("  " + text, flush=True)
            if text.startswith("[launch] done:"):
                done = text
    return (done if job.returncode == 0 else None), log_path


def show_runs(uri: str, experiment: str) -> None:
    """Every run of the experiment with its test accuracy and MLflow link, then the runs-table links."""
    import mlflow

    from trainer.mlflow_logger import ui_links

    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])
    print(f"MLflow experiment {experiment!r}: {len(runs)} run(s)")
    for r in runs:
        top1 = r.data.metrics.get("val/top1")
        print(f"  {r.info.run_name:28s} {r.info.status:9s} test top-1 "
              + (f"{100 * top1:5.1f} %" if top1 is not None else "  -  ")
              + f"  {ui_links(uri, exp.experiment_id, r.info.run_id)['run']}")
    links = ui_links(uri, exp.experiment_id)
    print(f"MLflow UI, runs table: {links['runs']}\nMLflow UI, runs side by side: {links['charts']}")


if __name__ == "__main__":
    main()
