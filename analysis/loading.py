"""What the studies run on: a model (fresh from the registry or from a checkpoint) and real batches."""

from __future__ import annotations

from pathlib import Path

import torch

from dataloaders.digits import digits_tensors
from models import SpikingResNet, create_model
from trainer.safe_load import safe_load


def load_checkpoint_model(path: str | Path, T: int | None = None) -> tuple[str, SpikingResNet]:
    """(registry name, model with weights) from a consolidated checkpoint, either what
    `python -m trainer.export` writes ({'model': {'name', 'num_classes', 'T', 'kwargs'}, 'state_dict', ...})
    or a plain {'model': name, 'model_kwargs': create_model kwargs, 'state_dict': weights}.
    T, if given, replaces the number of time steps the static input is presented for."""
    blob = safe_load(path)
    if not isinstance(blob, dict) or not {"model", "state_dict"} <= set(blob):
        keys = sorted(blob) if isinstance(blob, dict) else type(blob).__name__
        raise ValueError(f"{path}: expected a dict with 'model' and 'state_dict' (python -m trainer.export "
                         "output, or {'model': name, 'model_kwargs': {...}, 'state_dict': ...}), "
                         f"got {keys}")
    if isinstance(blob["model"], dict):
        from trainer.export import load_exported

        name, (model, _) = blob["model"]["name"], load_exported(path)
    else:
        name, model = blob["model"], create_model(blob["model"], **blob.get("model_kwargs", {}))
        model.load_state_dict(blob["state_dict"], strict=True)
    if T is not None:
        if T < 1:
            raise ValueError(f"T must be >= 1, got {T}")
        model.T = T  # the LIF layers take whatever length the sequence has
    return name, model


def real_batches(data: str, size: int, batch: int, n_batches: int = 0, split: str = "train",
                 seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Shuffled batches of normalised images [batch, 3, size, size] and labels: `n_batches` of them,
    or with n_batches=0 the whole split (the last batch may be smaller)."""
    if data != "digits":
        raise ValueError(f"unknown data {data!r}; available: 'digits'")
    x, y = digits_tensors(size)[split]
    n = n_batches * batch or len(x)
    if n > len(x):
        raise ValueError(f"{n_batches} batches of {batch} need {n} images; digits/{split} has {len(x)}")
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    return [(x[idx], y[idx]) for idx in order[:n].split(batch)]
