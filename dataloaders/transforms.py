"""Per-sample augmentation and normalisation (torchvision transforms v2), shared by both formats.

ImageNet train follows the authors' recipe (spec §3.1): RandomResizedCrop -> [flip, off by default] ->
AutoAugment (ImageNet policy) -> normalise; eval: resize the short side -> center crop -> normalise. On the
FFCV path FFCV's decoder does the crop (and flip), so only AutoAugment is left for torchvision.
CIFAR-10: random crop 32 with padding 4 + flip. Digits: random crop with padding 4, no flip (digits are
not mirror-symmetric). CIFAR10-DVS: event counts as they are (PLIF's pipeline has no normalisation).
"""

from __future__ import annotations

import functools

import torch
from torchvision.transforms import v2

from dataloaders.config import DataConfig
from dataloaders.digits import DIGITS_MEAN, DIGITS_STD

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
_STATS = {"imagenet": (IMAGENET_MEAN, IMAGENET_STD), "cifar10": (CIFAR10_MEAN, CIFAR10_STD),
          "digits": (DIGITS_MEAN, DIGITS_STD)}


def augment(cfg: DataConfig, train: bool, side: int, cropped_by_decoder: bool) -> v2.Compose | None:
    """uint8 [C, H, W] -> uint8: the random and geometric part; `side` is the stored size of small images."""
    ops = []
    if cfg.dataset == "imagenet":
        if not train and not cropped_by_decoder:
            ops = [v2.Resize(cfg.val_resize, antialias=True), v2.CenterCrop(cfg.val_crop)]
        elif train:
            if not cropped_by_decoder:
                ops = [v2.RandomResizedCrop(cfg.image_size, antialias=True)]
                ops += [v2.RandomHorizontalFlip()] if cfg.hflip else []
            ops += [v2.AutoAugment(v2.AutoAugmentPolicy.IMAGENET)] if cfg.auto_augment else []
    elif train and cfg.dataset in ("cifar10", "digits"):
        ops = [v2.RandomCrop(side, padding=4)]
        ops += [v2.RandomHorizontalFlip()] if cfg.dataset == "cifar10" else []
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


def normalize(cfg: DataConfig):
    """Batch uint8 [N, 3, H, W] (uint16 counts [N, T, 2, H, W] for DVS) -> float32 ready for the model."""
    if cfg.dataset == "cifar10dvs":
        return functools.partial(torch.Tensor.to, dtype=torch.float32)
    return _Normalize(*_STATS[cfg.dataset])


class _Normalize:
    """v2.ToDtype(scale=True) + v2.Normalize in one pass over the batch (they take three)."""

    def __init__(self, mean, std):
        self.shift = torch.tensor(mean).view(3, 1, 1) * 255
        self.scale = 1 / (torch.tensor(std).view(3, 1, 1) * 255)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(torch.float32).sub_(self.shift).mul_(self.scale)


def output_shape(cfg: DataConfig, stored: list[int] | None, train: bool) -> tuple[int, ...]:
    """Shape of one loaded sample (for padding rows and undecodable samples)."""
    if cfg.dataset == "cifar10dvs":
        return tuple(stored)
    if cfg.dataset == "imagenet":
        side = cfg.image_size if train else cfg.val_crop
        return 3, side, side
    return 3, stored[0], stored[1]
