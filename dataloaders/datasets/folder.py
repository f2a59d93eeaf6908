"""Any ImageNet-layout tree `src/{train,val}/<class>/<image>` (any number of classes, any format PIL reads).

Its per-channel mean/std and the median short side of its train images are measured at conversion and read
from the manifest. Augmentation follows the image size (`data.folder_augment`, 'auto' by default):
- 'pad_crop' (small images, median short side <= `data.small_side`): train resizes the short side to
  `data.image_size`, center crops it, then random crop with padding 4; eval resizes to `data.val_crop` and
  center crops. Set image_size = val_crop to the images' size (32 for CIFAR-like folders).
- 'resized_crop' (large images): train RandomResizedCrop(`data.image_size`); eval resize to
  `data.val_resize`, center crop `data.val_crop`, as ImageNet. On FFCV its decoder does this crop.
Either mode flips horizontally when `data.hflip` is set. The model's head takes `model.num_classes` from
the manifest when the recipe leaves it 0 (recipe `ms_resnet18_folder`).
"""

from __future__ import annotations

from dataloaders.datasets import Dataset
from dataloaders.datasets.imagenet import crop_shape


def _read(src, opts):
    from dataloaders.sources import imagenet_splits

    classes, splits = imagenet_splits(src, ["train", "val"])
    if "train" not in splits:
        raise FileNotFoundError(f"{src} has no train/ folder: the normalisation statistics come from it")
    return classes, splits


def mode(cfg, median_short_side: int) -> str:
    if cfg.folder_augment != "auto":
        return cfg.folder_augment
    return "pad_crop" if median_short_side <= cfg.small_side else "resized_crop"


def _augment(cfg, train: bool, side: int, cropped_by_decoder: bool) -> list:
    from torchvision.transforms import v2

    chosen = mode(cfg, side)
    if cropped_by_decoder:
        if chosen == "pad_crop":
            raise ValueError(f"data.folder_augment resolves to pad_crop (median short side {side} px), which "
                             "FFCV's cropping decoder cannot do: use data.format=wds, or "
                             "data.folder_augment=resized_crop")
        return []
    if not train:
        resize = cfg.val_crop if chosen == "pad_crop" else cfg.val_resize
        return [v2.Resize(resize, antialias=True), v2.CenterCrop(cfg.val_crop)]
    if chosen == "pad_crop":
        ops = [v2.Resize(cfg.image_size, antialias=True), v2.CenterCrop(cfg.image_size),
               v2.RandomCrop(cfg.image_size, padding=4)]
    else:
        ops = [v2.RandomResizedCrop(cfg.image_size, antialias=True)]
    return ops + ([v2.RandomHorizontalFlip()] if cfg.hflip else [])


DATASET = Dataset(name="folder", read=_read, augment=_augment, sample_shape=crop_shape,
                  measured_stats=True, decoder_crops=True,
                  resized_crop=lambda cfg, side: mode(cfg, side) == "resized_crop")
