"""Spikes and energy of a trained model, layer by layer (docs/model.md §8.3).

    python -m analysis.spikes runs/NAME/model.pt --dataset digits --size 16 --out docs

CKPT is what `python -m trainer.export` writes (the trainer also leaves it as <run_dir>/model.pt), or a
plain torch.save'd {'model': registry name, 'model_kwargs': {...}, 'state_dict': ...}. The model runs in
eval mode (BN running statistics) over the whole test split, as the trainer's evaluation does, under
`models.stats.SpikeMonitor`, so the totals are the `spikes/*` and `energy/*` metrics every evaluation
logs to MLflow (give --precision bf16 for a bf16 run: spikes are thresholded, so the conv precision
moves them slightly). Per LIF layer: firing rate (mean spike over T, N, C, H, W) and spikes per neuron per
sample (rate * T). Per conv/linear layer: dense MACs for real-valued input (stem, MS-ResNet's 1x1
downsampling convs, the classifier), synaptic operations (SOPs = MACs * mean input) for spike input,
and the 45 nm energy (4.6 pJ per MAC, 0.9 pJ per SOP).

Writes spikes.csv (one row per layer), spikes.md (totals and the table) and spikes.png.
"""

from __future__ import annotations

import argparse
import csv
import shlex
import sys
from pathlib import Path

import torch

from analysis.loading import load_checkpoint_model, real_batches
from models.stats import E_AC_PJ, E_MAC_PJ, SpikeMonitor

FIELDS = ("layer", "kind", "rate", "spikes_per_neuron", "neurons", "macs", "sops", "mj")


@torch.no_grad()
def measure(model: torch.nn.Module, batches, precision: str = "fp32") -> tuple[list[dict], dict[str, float]]:
    """(per-layer rows in module order, SpikeMonitor.summary())."""
    from trainer.precision import autocast

    model.eval()
    with SpikeMonitor(model) as mon, autocast(torch.device("cpu"), precision):
        for x, _ in batches:
            model(x)
    spikes, ops = mon.layer_spikes(), mon.layer_ops()
    rows = []
    for name, _ in model.named_modules():
        if name in spikes:
            rows.append({"layer": name, "kind": "lif", **spikes[name]})
        elif name in ops:
            rows.append({"layer": name, "kind": "synapse", **ops[name]})
    return rows, mon.summary()


def _fmt(v) -> str:
    return "" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)


def write_outputs(rows: list[dict], summary: dict[str, float], title: str, command: str, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "spikes.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        w.writerows({k: _fmt(r.get(k)) for k in FIELDS} for r in rows)
    lines = [f"# Spikes and energy: {title}", "", f"Produced by `{command}`.", "", "| metric | value |",
             "|---|---|"]
    lines += [f"| `{k}` | {v:.4g} |" for k, v in summary.items()]
    lines += ["", "| layer | firing rate | spikes / neuron / sample | MACs / image | SOPs / image "
              "| mJ / image |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['layer']} | {_fmt(r.get('rate'))} | {_fmt(r.get('spikes_per_neuron'))} | "
              f"{_fmt(r.get('macs'))} | {_fmt(r.get('sops'))} | {_fmt(r.get('mj'))} |" for r in rows]
    (out / "spikes.md").write_text("\n".join(lines) + "\n")
    _plot(rows, summary, title, out / "spikes.png")


def _plot(rows: list[dict], summary: dict[str, float], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lif = [r for r in rows if r["kind"] == "lif"]
    syn = [r for r in rows if r["kind"] == "synapse"]
    fig, (ax_r, ax_e) = plt.subplots(2, 1, figsize=(max(8, 0.12 * len(lif)), 8))
    ax_r.bar(range(len(lif)), [r["spikes_per_neuron"] for r in lif], color="tab:blue")
    ax_r.axhline(summary["spikes/per_neuron_per_sample"], color="k", ls="--", lw=0.8,
                 label=f"all neurons: {summary['spikes/per_neuron_per_sample']:.3g}")
    ax_r.set(ylabel="spikes / neuron / sample", xlabel="LIF layer (forward order)",
             title=f"{title}: firing (rate x T)")
    ax_r.legend()
    ac_nj = [r["sops"] * E_AC_PJ * 1e-3 for r in syn]
    ax_e.bar(range(len(syn)), ac_nj, color="tab:green", label=f"SOPs on spikes ({E_AC_PJ} pJ)")
    ax_e.bar(range(len(syn)), [r["macs"] * E_MAC_PJ * 1e-3 for r in syn], bottom=ac_nj, color="tab:orange",
             label=f"MACs on real values ({E_MAC_PJ} pJ)")
    ax_e.set(ylabel="energy / image (nJ)", xlabel="conv / linear layer (forward order)",
             title=f"45 nm energy: {summary['energy/mj_per_image']:.3g} mJ / image")
    ax_e.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m analysis.spikes", description=__doc__.split("\n\n")[0])
    p.add_argument("ckpt", help="consolidated checkpoint (python -m trainer.export)")
    p.add_argument("--dataset", default="digits", choices=["digits"], help="the test images' data set")
    p.add_argument("--size", type=int, default=32, help="image side the model was trained at")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--T", type=int, help="time steps (default: the checkpoint's)")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="bf16: convolutions under bf16 autocast, as a bf16 run's evaluation does")
    p.add_argument("--out", required=True, help="folder for spikes.csv, spikes.md and spikes.png")
    return p


def main(argv: list[str] | None = None) -> tuple[list[dict], dict[str, float]]:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    name, model = load_checkpoint_model(args.ckpt, T=args.T)
    batches = real_batches(args.dataset, args.size, args.batch_size, split="test")
    rows, summary = measure(model, batches, args.precision)
    title = (f"{name} (T={model.T}, {args.precision}) on {args.dataset} test "
             f"({sum(len(y) for _, y in batches)} images)")
    write_outputs(rows, summary, title, "python -m analysis.spikes " + shlex.join(argv), Path(args.out))
    for k, v in summary.items():
        print(f"{k:>32}: {v:.4g}")
    print(f"wrote {args.out}/spikes.csv, spikes.md and spikes.png")
    return rows, summary


if __name__ == "__main__":
    main()
