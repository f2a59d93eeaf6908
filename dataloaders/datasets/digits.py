"""scikit-learn's digits, generated at `--size` (no download). Train: random crop with padding 4 and no
flip (digits are not mirror-symmetric)."""

from __future__ import annotations

from dataloaders.datasets import Dataset, padded_crop, stored_rgb_shape
from dataloaders.digits import MEAN, STD


def _read(src, opts):
    from dataloaders.sources import digits_splits

    return digits_splits(opts.size)


DATASET = Dataset(name="digits", read=_read,
                  augment=lambda cfg, train, side, cropped: padded_crop(side, flip=False) if train else [],
                  sample_shape=stored_rgb_shape, mean=MEAN, std=STD, needs_src=False)
