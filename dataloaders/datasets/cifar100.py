"""CIFAR-100 from the official python pickles (folder or `.tar.gz`, md5-checked), 100 fine labels. Train:
random crop 32 with padding 4 + flip, as CIFAR-10."""

from __future__ import annotations

from dataloaders.datasets import Dataset, padded_crop, stored_rgb_shape

MEAN, STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)


def _read(src, opts):
    from dataloaders.sources import cifar100_splits

    return cifar100_splits(src, opts.verify_md5)


DATASET = Dataset(name="cifar100", read=_read,
                  augment=lambda cfg, train, side, cropped: padded_crop(side, flip=True) if train else [],
                  sample_shape=stored_rgb_shape, mean=MEAN, std=STD)
