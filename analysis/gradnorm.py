"""Gradient norm and block dynamical isometry (BDI) of every residual block (docs/model.md §8.4).

    python -m analysis.gradnorm --models ms_resnet20,ms_resnet110,spiking_resnet110 --T 6 --out docs
    python -m analysis.gradnorm --ckpt model.pt --out runs/probe      # a trained model (trainer.export)

On real batches (scikit-learn digits upsampled to the CIFAR shape 3x32x32 by default), in train mode
(tdBN normalises with batch statistics, as in training), for every block b with input x_b and output y_b:

- grad_norm: ||dL/dx_b|| for the mean cross-entropy L of the batch, the quantity `models.grad_norms`
  logs during training. x_b is the membrane sum (MS), spikes (vanilla) or spike counts (SEW).
- phi: phi(J J^T) = tr(J J^T) / d for the block Jacobian J = dy_b/dx_b, d = numel(y_b) (the whole
  [T, N, C, H, W] tensor: tdBN couples samples and time steps). Hutchinson: E||J^T v||^2 / d over
  Rademacher v, one vector-Jacobian product per probe.
- phi_spread: phi((J J^T)^2) - phi(J J^T)^2, with phi((J J^T)^2) = E||J J^T v||^2 / d. J u is the
  derivative of the VJP with respect to its vector (a double backward), so it applies exactly the
  transpose of the map the VJP applies. phi^2 is estimated from products over distinct probes, which
  makes the spread estimate unbiased (an identity block gives exactly 0).

The spike function has zero derivative almost everywhere, so J is the *surrogate* Jacobian autograd
builds (rectangular window of the LIF around v_th): the linear map whose transpose carries gradients in
training, which is what decides trainability. Gradient norm equality means phi ~ 1 with a small spread
in every block; an MS block with zero-initialised last BN is the identity at init (phi = 1, spread 0),
while the LIF after the addition of a vanilla block masks the shortcut's gradient (phi < 1).
Projection (downsampling) blocks change the shape and are not identities in any family.

Writes gradnorm.csv (one row per model and block, averaged over batches) and gradnorm.png.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from analysis.loading import load_checkpoint_model, real_batches
from models import create_model
from models.grad_norms import BlockGradNorms

FIELDS = ("model", "source", "T", "block", "stage", "grad_norm", "phi", "phi_spread")


def _rademacher(like: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    bits = torch.randint(0, 2, like.shape, generator=gen, device=gen.device)
    return (bits * 2 - 1).to(like.dtype)


def bdi_stats(y: torch.Tensor, x: torch.Tensor, probes: int, gen: torch.Generator) -> tuple[float, float]:
    """(phi(J J^T), phi((J J^T)^2) - phi(J J^T)^2) of J = dy/dx, from `probes` Rademacher vectors.

    The graph from x to y must be alive; it is kept (retain_graph) for the caller.
    """
    if probes < 2:
        raise ValueError(f"probes must be >= 2 (the spread needs pairs of probes), got {probes}")
    d = y.numel()
    w = torch.zeros_like(y, requires_grad=True)
    (jt_w,) = torch.autograd.grad(y, x, w, create_graph=True)  # J^T w, linear in w
    a, b = [], []
    for _ in range(probes):
        v = _rademacher(y, gen)
        (jt_v,) = torch.autograd.grad(y, x, v, retain_graph=True)
        (j_jt_v,) = torch.autograd.grad(jt_w, w, jt_v, retain_graph=True)
        a.append(jt_v.double().square().sum() / d)
        b.append(j_jt_v.double().square().sum() / d)
    a_t, b_t = torch.stack(a), torch.stack(b)
    phi_sq = (a_t.sum() ** 2 - a_t.square().sum()) / (probes * (probes - 1))
    return float(a_t.mean()), float(b_t.mean() - phi_sq)


def probe_model(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], probes: int,
                seed: int = 0) -> list[dict[str, float]]:
    """Per block: grad_norm, phi, phi_spread (means over batches) and stage (from 1)."""
    model.train()
    gen = torch.Generator(device=batches[0][0].device).manual_seed(seed)
    io: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    hooks = [blk.register_forward_hook(lambda m, args, out, b=b: io.__setitem__(b, (args[0], out)))
             for b, blk in enumerate(model.blocks)]
    n = len(model.blocks)
    sums = {k: [0.0] * n for k in ("grad_norm", "phi", "phi_spread")}
    try:
        for x, y in batches:
            with BlockGradNorms(model) as norms:
                F.cross_entropy(model(x), y).backward(retain_graph=True)
            for b, g in enumerate(norms.block_norms()):
                sums["grad_norm"][b] += g / len(batches)
                phi, spread = bdi_stats(io[b][1], io[b][0], probes, gen)
                sums["phi"][b] += phi / len(batches)
                sums["phi_spread"][b] += spread / len(batches)
            io.clear()
    finally:
        for h in hooks:
            h.remove()
    return [{"block": b, "stage": model.block_stage[b] + 1, **{k: v[b] for k, v in sums.items()}}
            for b in range(n)]


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 1, figsize=(8, 10), sharex=True)
    labels = dict.fromkeys(f"{r['model']} ({r['source']})" for r in rows)
    for label in labels:
        rs = [r for r in rows if f"{r['model']} ({r['source']})" == label]
        blocks = [r["block"] for r in rs]
        for ax, key in zip(axes, ("grad_norm", "phi", "phi_spread")):
            ax.plot(blocks, [r[key] for r in rs], marker=".", label=label)
    axes[0].set(yscale="log", ylabel="||dL/dx_b|| at block input")
    axes[1].set(yscale="log", ylabel="phi(J J^T)")
    axes[1].axhline(1.0, color="grey", lw=0.8, ls="--")
    axes[2].set_yscale("symlog", linthresh=1e-3)
    axes[2].set_ylabel("phi((JJ^T)^2) - phi(JJ^T)^2")
    axes[2].set_xlabel("residual block index")
    axes[0].legend(fontsize=7)
    ts = "/".join(sorted({str(r["T"]) for r in rows}))
    axes[0].set_title(f"Gradient norm and block dynamical isometry, T={ts} (surrogate Jacobian)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m analysis.gradnorm", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="", help="comma-separated registry names, probed at initialisation")
    p.add_argument("--ckpt", action="append", default=[], help="consolidated checkpoint (repeatable)")
    p.add_argument("--T", type=int, help="time steps (default: 6 for --models, the checkpoint's for --ckpt)")
    p.add_argument("--dataset", default="digits", choices=["digits"], help="the batches' data set")
    p.add_argument("--size", type=int, default=32, help="image side (32 = CIFAR shape)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--batches", type=int, default=2)
    p.add_argument("--probes", type=int, default=4, help="Hutchinson vectors per block and batch (>= 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", required=True, help="folder for gradnorm.csv and gradnorm.png")
    return p


def main(argv: list[str] | None = None) -> list[dict]:
    p = build_parser()
    args = p.parse_args(argv)
    names = [m for m in args.models.split(",") if m]
    if not names and not args.ckpt:
        p.error("give --models and/or --ckpt")
    batches = [(x.to(args.device), y.to(args.device))
               for x, y in real_batches(args.dataset, args.size, args.batch_size, args.batches, seed=args.seed)]

    rows: list[dict] = []
    todo = [(name, "init", None) for name in names] + [(None, Path(c).name, c) for c in args.ckpt]
    for name, source, ckpt in todo:
        torch.manual_seed(args.seed)
        if ckpt is None:
            model = create_model(name, T=args.T or 6)
        else:
            name, model = load_checkpoint_model(ckpt, T=args.T)
        per_block = probe_model(model.to(args.device), batches, args.probes, args.seed)
        rows += [{"model": name, "source": source, "T": model.T, **r} for r in per_block]
        g = [r["grad_norm"] for r in per_block]
        phis = [r["phi"] for r in per_block]
        print(f"{name:>20} ({source}): {len(g)} blocks, grad norm first/last = {g[0] / g[-1]:.3g}, "
              f"phi median {sorted(phis)[len(phis) // 2]:.3g} [{min(phis):.3g}, {max(phis):.3g}]", flush=True)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "gradnorm.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows({k: r[k] for k in FIELDS} for r in rows)
    plot(rows, out / "gradnorm.png")
    print(f"wrote {out / 'gradnorm.csv'} and {out / 'gradnorm.png'}")
    return rows


if __name__ == "__main__":
    main()
