"""Degradation study (docs/model.md §8.1): test accuracy against depth for each family, every model trained
by the trainer and every number read back from MLflow.

    # the reduced sweep in docs/ (real handwritten digits at 16 px, 2 CPU cores)
    python -m analysis.depth_sweep --dataset digits --depths 20,32,56,110 --families ms,spiking,sew \\
        --epochs 6 --T 2 --jobs 2 --set data.batch_size=32 optim.global_batch=32 optim.lr=0.1 log_every=5 \\
        --out docs
    # the paper's sweep, each run through the Ray launcher on a GPU cluster
    python -m analysis.depth_sweep --dataset cifar10 --data /mnt/shared/cifar10-wds \\
        --depths 20,32,44,56,110,482 --families ms,spiking --epochs 200 \\
        --launcher "python launch/cifar10.py --nodes 2" --tracking-uri http://mlflow:5000 --out docs

Every (family, depth) is one trainer run: the dataset's recipe (`digits_demo`, or
`ms_resnet<depth>_cifar10` with its activation checkpointing for deep nets) with the overrides
model.name, model.T, optim.epochs, model.kwargs={} and the MLflow location, started as
`<launcher> --recipe R --set ... --run-name NAME` (the default launcher is the trainer's single-process
mode, world size 1; any launcher taking those flags works). Resetting model.kwargs keeps each family's
own init, as in the paper: MS-ResNet's zero-initialised last BN, the baselines' gamma = V_th. Run names
are stable, so re-running the command skips runs MLflow already has as FINISHED and resumes
interrupted ones from their checkpoints.

Writes depth_sweep.csv (one row per run: final and best test accuracy, final training loss, spikes,
energy), depth_sweep.md (the command, settings and accuracy table) and depth_sweep.png (test accuracy
against depth per family, and the training-loss curves).
"""

from __future__ import annotations

import argparse
import csv
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from models.registry import FAMILIES
from trainer.run_record import local_store_uri

FIELDS = ("family", "depth", "status", "val_top1", "val_best_top1", "train_loss", "spikes_per_neuron",
          "mj_per_image", "grad_first_over_last", "run_name", "run_id")


@dataclass
class Run:
    family: str
    depth: int
    name: str
    recipe: str
    overrides: list[str]
    result: dict = field(default_factory=dict)


def recipe_for(dataset: str, depth: int) -> str:
    return "digits_demo" if dataset == "digits" else f"ms_resnet{depth}_cifar10"


def sweep_runs(args: argparse.Namespace) -> list[Run]:
    """The runs, deepest first (so parallel jobs finish together); overrides validated here, not later."""
    from trainer.config import apply_overrides
    from trainer.recipes import get_recipe

    runs = []
    for depth in sorted(args.depths, reverse=True):
        for family in args.families:
            recipe = recipe_for(args.dataset, depth)
            cfg = get_recipe(recipe)
            T = args.T or cfg.model.T
            name = f"{args.dataset}-{family}{depth}-T{T}-e{args.epochs}"
            # The digits demo recipe starts every block non-identity (for speed): undo it, see above.
            overrides = [f"model.name={FAMILIES[family]}{depth}", "model.kwargs={}", f"model.T={T}",
                         f"optim.epochs={args.epochs}", "optim.max_steps=0", f"data.path={args.data}",
                         f"mlflow.experiment={args.experiment}", f"mlflow.tracking_uri={args.tracking_uri}",
                         f"run_dir={Path(args.runs_dir) / name}", "mlflow.system_metrics=false", *args.set]
            apply_overrides(cfg, overrides)
            runs.append(Run(family, depth, name, recipe, overrides))
    return runs


def finished_runs(tracking_uri: str, experiment: str) -> dict[str, object]:
    """run name -> the newest FINISHED MLflow run of that name that has a test accuracy."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    found = {}
    for r in mlflow.search_runs(experiment_names=[experiment], filter_string="attributes.status = 'FINISHED'",
                                order_by=["attributes.start_time ASC"], output_format="list"):
        if "val/top1" in r.data.metrics:
            found[r.info.run_name] = r
    return found


def train_all(runs: list[Run], launcher: str, jobs: int, log_dir: Path) -> dict[str, int]:
    """Start the runs, `jobs` at a time; returns each run's exit code. Output goes to <log_dir>/<name>.log."""
    env = dict(os.environ)
    if jobs > 1 and "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // jobs))
    log_dir.mkdir(parents=True, exist_ok=True)
    pending, active, codes = list(runs), {}, {}
    while pending or active:
        while pending and len(active) < jobs:
            run = pending.pop(0)
            cmd = [*shlex.split(launcher), "--recipe", run.recipe, "--set", *run.overrides,
                   "--run-name", run.name]
            log = open(log_dir / f"{run.name}.log", "w")  # noqa: SIM115 -- closed when the process ends
            print(f"[sweep] start {run.name}: {shlex.join(cmd)}", flush=True)
            active[run.name] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), log,
                                time.time())
        time.sleep(1.0)
        for name, (proc, log, t0) in list(active.items()):
            if proc.poll() is not None:
                log.close()
                codes[name] = proc.returncode
                del active[name]
                print(f"[sweep] {'done' if proc.returncode == 0 else f'FAILED ({proc.returncode})'} {name} "
                      f"in {time.time() - t0:.0f} s (log {log_dir / name}.log)", flush=True)
    return codes


def collect(runs: list[Run], tracking_uri: str, experiment: str, codes: dict[str, int]) -> None:
    """Fill run.result from MLflow: final metrics and the training-loss history."""
    from mlflow.tracking import MlflowClient

    done = finished_runs(tracking_uri, experiment)
    client = MlflowClient(tracking_uri)
    for run in runs:
        r = done.get(run.name)
        if r is None:
            code = codes.get(run.name)
            run.result = {"status": "failed" if code else "missing", "loss_curve": []}
            continue
        m = r.data.metrics
        history = client.get_metric_history(r.info.run_id, "train/loss")
        run.result = {"status": "ok", "run_id": r.info.run_id, "val_top1": m["val/top1"],
                      "val_best_top1": m.get("val/best_top1"), "train_loss": m.get("train/loss"),
                      "spikes_per_neuron": m.get("spikes/per_neuron_per_sample"),
                      "mj_per_image": m.get("energy/mj_per_image"),
                      "grad_first_over_last": m.get("grad/norm_first_over_last"),
                      "loss_curve": sorted((h.step, h.value) for h in history)}


def _fmt(v) -> str:
    return "" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)


def write_outputs(runs: list[Run], out: Path, command: str, settings: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    rows = [{"family": r.family, "depth": r.depth, "run_name": r.name, **r.result} for r in runs]
    rows.sort(key=lambda r: (list(FAMILIES).index(r["family"]), r["depth"]))
    with open(out / "depth_sweep.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
        w.writeheader()
        w.writerows({k: _fmt(row.get(k)) for k in FIELDS} for row in rows)

    families = [f for f in FAMILIES if any(r["family"] == f for r in rows)]
    depths = sorted({r["depth"] for r in rows})
    acc = {(r["family"], r["depth"]): r for r in rows}

    def cell(fam, d):
        r = acc.get((fam, d))
        if r is None or r["status"] != "ok":
            return r["status"] if r else ""
        return f"{100 * r['val_top1']:.1f} (best {100 * r['val_best_top1']:.1f})"

    lines = ["# Depth sweep: test accuracy (%) against depth", "", "Produced by", "", "```", command, "```",
             "", settings, "", "| depth | " + " | ".join(families) + " |", "|---" * (len(families) + 1) + "|"]
    lines += [f"| {d} | " + " | ".join(cell(f, d) for f in families) + " |" for d in depths]
    lines += ["", "Final test accuracy after the last epoch (best over the evaluated epochs in brackets). "
              "Per-run final training loss, spikes per neuron per sample and energy: `depth_sweep.csv`; "
              "accuracy against depth and the training-loss curves: `depth_sweep.png`.", ""]
    (out / "depth_sweep.md").write_text("\n".join(lines))
    _plot(rows, families, out / "depth_sweep.png")


def _plot(rows: list[dict], families: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = dict(zip(FAMILIES, ("tab:blue", "tab:red", "tab:green")))
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(12, 4.5))
    depths = sorted({r["depth"] for r in rows})
    for fam in families:
        ok = [r for r in rows if r["family"] == fam and r["status"] == "ok"]
        ax_acc.plot([r["depth"] for r in ok], [100 * r["val_top1"] for r in ok], marker="o",
                    color=colors[fam], label=FAMILIES[fam])
        for r in ok:
            steps, losses = zip(*r["loss_curve"]) if r["loss_curve"] else ((), ())
            alpha = 0.35 + 0.65 * depths.index(r["depth"]) / max(len(depths) - 1, 1)
            ax_loss.plot(steps, losses, color=colors[fam], alpha=alpha, label=f"{FAMILIES[fam]}{r['depth']}")
    ax_acc.set(xscale="log", xlabel="depth (layers)", ylabel="final test accuracy (%)",
               title="Accuracy against depth")
    ax_acc.set_xticks(depths, [str(d) for d in depths])
    ax_acc.minorticks_off()
    ax_acc.legend()
    ax_loss.set(xlabel="optimizer step", ylabel="training loss", yscale="log",
                title="Training loss (darker = deeper)")
    ax_loss.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _ensure_digits(path: Path, size: int) -> None:
    """Digits need no download: convert them with the data pipeline's own converter when missing."""
    if (path / "train" / "manifest.json").is_file():
        return
    cmd = [sys.executable, "-m", "dataloaders.convert", "digits", "--out", str(path), "--format", "wds",
           "--size", str(size)]
    print(f"[sweep] {shlex.join(cmd)}", flush=True)
    subprocess.run(cmd, check=True)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m analysis.depth_sweep", description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", choices=("digits", "cifar10"), required=True)
    p.add_argument("--depths", default="20,32,56,110", help="comma-separated CIFAR depths (6n+2)")
    p.add_argument("--families", default="ms,spiking,sew", help=f"comma-separated, of {','.join(FAMILIES)}")
    p.add_argument("--epochs", type=int, required=True)
    p.add_argument("--T", type=int, default=0, help="time steps (default: the recipe's)")
    p.add_argument("--data", help="converted data set folder (digits: converted here if missing)")
    p.add_argument("--size", type=int, default=16, help="digits: image side when converting them")
    p.add_argument("--launcher", default=f"{sys.executable} -m trainer.train",
                   help="command taking --recipe/--set/--run-name (e.g. 'torchrun --nproc_per_node 8 -m "
                        "trainer.train' or 'python launch/cifar10.py --nodes 2')")
    p.add_argument("--jobs", type=int, default=1, help="runs trained at the same time")
    p.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI"),
                   help="MLflow tracking URI (default $MLFLOW_TRACKING_URI, else sqlite in --runs-dir)")
    p.add_argument("--experiment", help="MLflow experiment (default depth_sweep_<dataset>)")
    p.add_argument("--runs-dir", default="runs/depth_sweep", help="trainer run directories and logs")
    p.add_argument("--set", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                   help="extra trainer overrides (repeatable)")
    p.add_argument("--collect-only", action="store_true", help="only read MLflow and write the outputs")
    p.add_argument("--out", required=True, help="folder for depth_sweep.{csv,md,png}")
    return p


def main(argv: list[str] | None = None) -> list[Run]:
    argv = sys.argv[1:] if argv is None else argv
    p = build_parser()
    args = p.parse_args(argv)

    from models.registry import CIFAR_DEPTHS

    try:
        args.depths = [int(d) for d in args.depths.split(",")]
        args.families = args.families.split(",")
    except ValueError:
        p.error(f"--depths must be comma-separated integers, got {args.depths!r}")
    if bad := [d for d in args.depths if d not in CIFAR_DEPTHS]:
        p.error(f"depths {bad} are not CIFAR ResNet depths; choose from {CIFAR_DEPTHS}")
    if bad := [f for f in args.families if f not in FAMILIES]:
        p.error(f"unknown families {bad}; choose from {list(FAMILIES)}")
    if args.jobs < 1 or args.epochs < 1:
        p.error("--jobs and --epochs must be >= 1")
    runs_dir = Path(args.runs_dir)
    args.experiment = args.experiment or f"depth_sweep_{args.dataset}"
    args.tracking_uri = args.tracking_uri or local_store_uri(runs_dir)
    if args.data is None:
        if args.dataset != "digits":
            p.error("--data is required for cifar10 (python -m dataloaders.convert cifar10 ...)")
        args.data = str(runs_dir / f"digits{args.size}")
    runs = sweep_runs(args)

    import mlflow

    runs_dir.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(args.tracking_uri)
    if mlflow.get_experiment_by_name(args.experiment) is None:
        # Created here, once, so that parallel runs do not race to initialise the store.
        mlflow.create_experiment(args.experiment)
    codes: dict[str, int] = {}
    if not args.collect_only:
        done = finished_runs(args.tracking_uri, args.experiment)
        todo = [r for r in runs if r.name not in done]
        print(f"[sweep] {len(runs)} runs, {len(runs) - len(todo)} already finished in MLflow "
              f"({args.tracking_uri}, experiment {args.experiment})", flush=True)
        if args.dataset == "digits" and todo:
            _ensure_digits(Path(args.data), args.size)
        codes = train_all(todo, args.launcher, args.jobs, runs_dir / "logs")
    collect(runs, args.tracking_uri, args.experiment, codes)
    recipes = sorted({r.recipe for r in runs})
    settings = (f"Dataset `{args.dataset}` ({args.data}), recipe {', '.join(f'`{r}`' for r in recipes)} "
                f"with `{' '.join(runs[0].overrides[1:5])}`"
                + (f" and `{' '.join(args.set)}`" if args.set else "")
                + f"; MLflow experiment `{args.experiment}`.")
    write_outputs(runs, Path(args.out), "python -m analysis.depth_sweep " + shlex.join(argv), settings)
    for r in sorted(runs, key=lambda r: (r.family, r.depth)):
        acc = r.result.get("val_top1")
        print(f"{r.name:>28}: {r.result['status']}"
              + (f", test top-1 {100 * acc:.1f} %" if acc is not None else ""))
    return runs


if __name__ == "__main__":
    main()
