"""Per-sample augmentation and normalisation (torchvision transforms v2), shared by both formats; what
each data set does is declared in its `dataloaders.datasets` module.
"""

from __future__ import annotations

import torch
from torchvision.transforms import v2

from dataloaders.config import DataConfig
from dataloaders.datasets import get_dataset


def augment(cfg: DataConfig, train: bool, side: int, cropped_by_decoder: bool) -> v2.Compose | None:
    """uint8 [C, H, W] -> uint8: the random and geometric part; `side` is the stored size of small images."""
    ops = get_dataset(cfg.dataset).augment(cfg, train, side, cropped_by_decoder)
    return v2.Compose(ops) if ops else None


def seeded(augment, x: torch.Tensor, seed: int | None) -> torch.Tensor:
    """`augment(x)` drawing from torch's CPU RNG seeded with `seed` (None: the RNG as it is); the caller's
    RNG state is restored. Seeds the CPU generator only: in a process that never initialises CUDA,
    torch.manual_seed also formats the call stack to queue a CUDA re-seed, on every sample."""
    if seed is None:
        return augment(x)
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        return augment(x)


def normalize(cfg: DataConfig, manifest: dict) -> Normalize:
    """The loader's `normalize`: batch uint8 [N, 3, H, W] (uint16 counts [N, T, 2, H, W] for DVS) -> float32
    ready for the model."""
    spec = get_dataset(cfg.dataset)
    if spec.measured_stats:
        return Normalize(manifest["stats"]["mean"], manifest["stats"]["std"])
    return Normalize(spec.mean, spec.std)


class Normalize:
    """v2.ToDtype(scale=True) + v2.Normalize in one pass over the batch (they take three), on the device the
    batch is on: the trainer runs it after the copy to the training device, so the loader's processes never
    touch float pixels (a fresh float batch costs the CPU more than the cast itself, in page faults) and the
    copy moves a quarter of the bytes (from the DataLoader's pinned uint8 batch, asynchronously on CUDA).
    Rows whose label is -1 (padding, undecodable samples) come out zero. mean None: event counts, only cast."""

    def __init__(self, mean=None, std=None):
        self.mean, self.std = mean, std
        self._constants: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        x = x.to(torch.float32, copy=True)  # the steps below work in place
        if self.mean is None:  # a padding row of counts is already zeros
            return x
        if x.device not in self._constants:  # built once per device: no host-to-device copy per batch
            mean, std = torch.tensor(self.mean).view(3, 1, 1), torch.tensor(self.std).view(3, 1, 1)
            self._constants[x.device] = (mean * 255).to(x.device), (1 / (std * 255)).to(x.device)
        shift, scale = self._constants[x.device]
        if labels is not None:  # folded into the scale: no extra pass over the pixels, no device sync
            scale = scale * (labels >= 0).to(x.device, torch.float32).view(-1, 1, 1, 1)
        return x.sub_(shift).mul_(scale)


def output_shape(cfg: DataConfig, stored: list[int] | None, train: bool) -> tuple[int, ...]:
    """Shape of one loaded sample (for padding rows and undecodable samples)."""
    return get_dataset(cfg.dataset).sample_shape(cfg, stored, train)
