"""Top-1 / top-5 over the full validation set, summed over all ranks.

Each rank evaluates its share; padding rows (label -1, added so every rank yields the same number of
batches) are not counted, and the counts are all-reduced, so every sample counts exactly once.

    python -m trainer.evaluate runs/NAME/model.pt                      # the run's own config.yaml
    python -m trainer.evaluate model.pt --config cfg.yaml --set data.path=data/digits16
    python -m trainer.evaluate models:/m-0123abcd                      # an MLflow logged model
    python -m trainer.evaluate runs:/RUN_ID/final --set data.path=data/digits16
"""

from __future__ import annotations

import argparse
import json
import os
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from dataloaders import build_loader
from models.stats import SpikeMonitor
from trainer.config import TrainConfig, apply_overrides, from_dict, load_config
from trainer.export import load_exported
from trainer.precision import autocast, weights_dtype


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, precision: str = "fp32",
             spikes: bool = True) -> dict[str, float]:
    """`loader`: a `dataloaders.Loader`, or batches in memory (`dataloaders.loader.InMemory`); its
    `to_model` puts each batch in the model's layout.

    The sums stay on `device`, the training device, for two reasons: a batch never waits for the GPU just
    to be counted, and the all-reduce then runs on the backend that serves that device (an NCCL group has
    none for CPU tensors)."""
    was_training = model.training
    model.eval()
    dtype = weights_dtype(model)
    counts = torch.zeros(4, dtype=torch.float64, device=device)  # top-1 hits, top-5 hits, samples, summed loss
    monitor = SpikeMonitor(model) if spikes else nullcontext()
    with monitor:
        for x, y in loader:
            x, y = loader.to_model(x, y, device, dtype)
            # Padding rows (label -1) are dropped before the model sees them, so they count neither in
            # accuracy nor in the spike and energy statistics (eval-mode BN makes this exact).
            keep = y >= 0
            if not keep.any():
                continue
            x, y = (x[:, keep] if loader.time_first else x[keep]), y[keep]
            with autocast(device, precision):
                logits = model(x).float()
            top = logits.topk(min(5, logits.shape[1]), dim=1).indices
            hits = top == y[:, None]
            loss = F.cross_entropy(logits, y, reduction="sum")
            counts += torch.stack([hits[:, 0].sum().double(), hits.any(dim=1).sum().double(),
                                   counts.new_tensor(y.numel()), loss.double()])
    model.train(was_training)
    world = dist.get_world_size() if dist.is_initialized() else 1
    spike_stats = monitor.summary() if spikes and monitor.images else {}
    if world > 1:
        dist.all_reduce(counts)
        if spikes:
            # Per-image statistics, weighted by the real images each rank evaluated.
            keys = sorted(spike_stats)
            images = float(monitor.images)
            vec = torch.tensor([spike_stats.get(k, 0.0) * images for k in keys] + [images], dtype=torch.float64,
                               device=device)
            dist.all_reduce(vec)
            spike_stats = dict(zip(keys, (vec[:-1] / vec[-1]).tolist()))
    n = counts[2].item()
    if n == 0:
        raise RuntimeError("the validation loader yielded no labelled samples")
    return {"val/top1": counts[0].item() / n, "val/top5": counts[1].item() / n,
            "val/loss": counts[3].item() / n, "val/samples": n, **spike_stats}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="a file written by python -m trainer.export, or an MLflow logged model "
                                 "(models:/MODEL_ID, runs:/RUN_ID/final, ...)")
    p.add_argument("--config", help="training config (default: config.yaml next to the model file, or the "
                                    "one logged with the model)")
    p.add_argument("--set", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                   help="config overrides (repeatable)")
    p.add_argument("--split", default="val")
    p.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI"),
                   help="MLflow server or store of a models:/ or runs:/ URI (default: $MLFLOW_TRACKING_URI)")
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.model.startswith(("models:/", "runs:/")):
        from trainer.logged_model import load_logged_model  # mlflow loads only for a URI

        model, logged_config, blob = load_logged_model(args.model, args.tracking_uri)
        cfg: TrainConfig = load_config(args.config) if args.config else from_dict(TrainConfig, logged_config)
    else:
        cfg = load_config(args.config or Path(args.model).parent / "config.yaml")
        model, blob = load_exported(args.model)
    apply_overrides(cfg, args.set)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    loader = build_loader(cfg.data, args.split, 0, 1)
    metrics = evaluate(model.to(device), loader, device, cfg.engine.precision)
    print(json.dumps({"model": str(args.model), "step": blob.get("step"), **metrics}))


if __name__ == "__main__":
    main()
