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


def normalize(cfg: DataConfig, manifest: dict):
    """Batch uint8 [N, 3, H, W] (uint16 counts [N, T, 2, H, W] for DVS) -> float32 ready for the model."""
    spec = get_dataset(cfg.dataset)
    if spec.measured_stats:
        return _Normalize(manifest["stats"]["mean"], manifest["stats"]["std"])
    if spec.mean is None:
        return _float32
    return _Normalize(spec.mean, spec.std)


def _float32(x: torch.Tensor) -> torch.Tensor:
    """A float32 copy, in pinned memory with CUDA so the trainer's non_blocking copy to the GPU is
    asynchronous (the DataLoader's pinned uint8 batch is not what reaches the GPU: this copy is)."""
    return torch.empty(x.shape, dtype=torch.float32, pin_memory=torch.cuda.is_available()).copy_(x)


class _Normalize:
    """v2.ToDtype(scale=True) + v2.Normalize in one pass over the batch (they take three)."""

    def __init__(self, mean, std):
        self.shift = torch.tensor(mean).view(3, 1, 1) * 255
        self.scale = 1 / (torch.tensor(std).view(3, 1, 1) * 255)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return _float32(x).sub_(self.shift).mul_(self.scale)


def output_shape(cfg: DataConfig, stored: list[int] | None, train: bool) -> tuple[int, ...]:
    """Shape of one loaded sample (for padding rows and undecodable samples)."""
    return get_dataset(cfg.dataset).sample_shape(cfg, stored, train)
