"""CIFAR10-DVS recordings (class folders of `.aedat` files or the distributed class zips) as event-count
frames [T, 2, 128, 128]. Counts go to the model as they are (PLIF's pipeline has no normalisation or
augmentation)."""

from __future__ import annotations

from dataloaders.datasets import Dataset


def _read(src, opts):
    from dataloaders.sources import dvs_splits

    return dvs_splits(src, opts.frames, opts.train_fraction)


DATASET = Dataset(name="cifar10dvs",
                  read=_read,
                  augment=lambda cfg, train, side, cropped: [],
                  sample_shape=lambda cfg, stored, train: tuple(stored), time_first=True)
