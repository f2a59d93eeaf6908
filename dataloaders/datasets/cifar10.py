"""CIFAR-10 from the official python pickles (folder or `.tar.gz`, md5-checked). Train: random crop 32 with
padding 4 + flip."""

from __future__ import annotations

from dataloaders.datasets import Dataset, padded_crop, stored_rgb_shape

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def _read(src, opts):
    from dataloaders.sources import cifar10_splits

    return cifar10_splits(src, opts.verify_md5)


DATASET = Dataset(name="cifar10", read=_read,
                  augment=lambda cfg, train, side, cropped: padded_crop(side, flip=True) if train else [],
                  sample_shape=stored_rgb_shape, mean=MEAN, std=STD)
