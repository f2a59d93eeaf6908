"""ImageNet-1k from `src/<split>/<wnid>/*.JPEG` folders.

Train follows the authors' recipe (docs/model.md §7): RandomResizedCrop -> [flip, off by default] -> AutoAugment
(ImageNet policy) -> normalise; eval: resize the short side -> center crop -> normalise. On the FFCV path
FFCV's decoder does the crop (and flip), so only AutoAugment is left for torchvision.
"""

from __future__ import annotations

from dataloaders.datasets import Dataset

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _read(src, opts):
    from dataloaders.sources import imagenet_splits

    return imagenet_splits(src, ["train", "val"])


def _augment(cfg, train: bool, side: int, cropped_by_decoder: bool) -> list:
    from torchvision.transforms import v2

    if not train:
        return [] if cropped_by_decoder else [v2.Resize(cfg.val_resize, antialias=True), v2.CenterCrop(cfg.val_crop)]
    ops = []
    if not cropped_by_decoder:
        ops = [v2.RandomResizedCrop(cfg.image_size, antialias=True)]
        ops += [v2.RandomHorizontalFlip()] if cfg.hflip else []
    return ops + ([v2.AutoAugment(v2.AutoAugmentPolicy.IMAGENET)] if cfg.auto_augment else [])


def crop_shape(cfg, stored, train: bool) -> tuple[int, ...]:
    side = cfg.image_size if train else cfg.val_crop
    return 3, side, side


DATASET = Dataset(name="imagenet", read=_read, augment=_augment, sample_shape=crop_shape,
                  mean=MEAN, std=STD, decoder_crops=True)
