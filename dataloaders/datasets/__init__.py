"""The dataset registry: one module per dataset in this package, each defining `DATASET`.

A dataset module says everything the pipeline needs to know about its data set: its one name (in configs and
manifests, `data.dataset`, and on every command line), the reader that conversion uses, the normalisation
statistics, the train/eval augmentation and the shape of one loaded sample. Adding a data
set means adding one module here (and its tests); nothing else names data sets. Modules import torch and
torchvision only inside their functions, so configs and the converter CLIs start fast.
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Dataset:
    name: str
    """`data.dataset`, the manifests' "dataset" and `python -m dataloaders.convert <name>`."""
    read: Callable[[Path | None, Any], tuple[list[str], dict[str, Any]]]
    """(raw source folder, converter options) -> (class names, {split: indexable split})."""
    augment: Callable[[Any, bool, int, bool], list]
    """(DataConfig, train, stored side, the FFCV decoder already cropped) -> torchvision v2 ops on uint8."""
    sample_shape: Callable[[Any, list[int] | None, bool], tuple[int, ...]]
    """(DataConfig, stored sample shape, train) -> shape of one loaded sample."""
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    """Per-channel statistics of 0..1 pixels; None: samples are event counts, only cast to float."""
    measured_stats: bool = False
    """The statistics are measured on the train split at conversion and read from the manifest (`stats`);
    the stored side passed to `augment` is then the train images' median short side."""
    needs_src: bool = True
    """False for data sets generated on the fly (no raw download to point --src at)."""
    decoder_crops: bool = False
    """FFCV decodes stored images of varying size with a cropping decoder (ImageNet)."""
    resized_crop: Callable[[Any, int], bool] | None = None
    """decoder_crops sets whose train augmentation depends on the images: (DataConfig, stored side) -> whether
    it starts with RandomResizedCrop(image_size); None: always."""
    time_first: bool = False
    """A loaded sample is a sequence [T, C, H, W] (event frames): batches [N, T, ...] go to the model time
    first, [T, N, ...]. Static images are [C, H, W] and the model repeats them over T itself."""


def crops_in_decoder(spec: Dataset, cfg, side: int) -> bool:
    """The train augmentation starts with RandomResizedCrop(image_size), which a cropping decoder can do
    (FFCV's; data.window_decode's on wds)."""
    return spec.decoder_crops and (spec.resized_crop is None or spec.resized_crop(cfg, side))


@functools.cache
def _registry() -> dict[str, Dataset]:
    found = {}
    for info in pkgutil.iter_modules(__path__):
        spec: Dataset = importlib.import_module(f"{__name__}.{info.name}").DATASET
        found[spec.name] = spec
    return found


def list_datasets() -> list[str]:
    return sorted(_registry())


def get_dataset(name: str) -> Dataset:
    registry = _registry()
    if name not in registry:
        raise KeyError(f"unknown dataset {name!r}; expected one of {list_datasets()}")
    return registry[name]


def padded_crop(side: int, flip: bool) -> list:
    """The small-image train augmentation: random crop with padding 4, optionally a horizontal flip."""
    from torchvision.transforms import v2

    return [v2.RandomCrop(side, padding=4)] + ([v2.RandomHorizontalFlip()] if flip else [])


def stored_rgb_shape(cfg, stored: list[int] | None, train: bool) -> tuple[int, ...]:
    """Small RGB images load at their stored size."""
    return 3, stored[0], stored[1]
