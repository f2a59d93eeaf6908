"""What a loader reads and how: one typed section of the training config (`TrainConfig.data`)."""

from __future__ import annotations

from dataclasses import dataclass

from dataloaders.datasets import list_datasets

FORMATS = ("wds", "ffcv")
FOLDER_AUGMENTS = ("auto", "pad_crop", "resized_crop")


@dataclass
class DataConfig:
    dataset: str = "digits"
    """A `dataloaders.datasets` module's name: `list_datasets()`."""
    format: str = "wds"
    """'wds' (WebDataset tar shards) or 'ffcv' (.beton files)."""
    path: str = ""
    """The `--out` folder of `python -m dataloaders.convert`. For wds it may be a URL (`https://...`,
    `s3://...` through fsspec) or a `pipe:` command with `{}` standing for the file name."""
    batch_size: int = 32
    """Per-rank micro batch."""
    num_workers: int = 2
    """DataLoader worker processes (wds) or FFCV threads (ffcv), per rank."""
    image_size: int = 224
    """ImageNet train crop; the small data sets keep their stored size."""
    seed: int = 0
    """Seeds the per-epoch sample order and every sample's augmentation."""
    val_resize: int = 256
    val_crop: int = 224
    """ImageNet evaluation: resize the short side, then center crop (320/288 for the paper's 76.02 %)."""
    auto_augment: bool = True
    """ImageNet train: AutoAugment with the ImageNet policy after the crop, as the authors' recipe."""
    hflip: bool = False
    """ImageNet train: random horizontal flip (the authors' recipe has none). CIFAR always flips."""
    folder_augment: str = "auto"
    """folder: 'pad_crop', 'resized_crop' or 'auto' (by the images' size); see dataloaders.datasets.folder."""
    small_side: int = 64
    """folder, 'auto': images whose median short side is at most this many pixels get 'pad_crop'."""
    cache_dir: str = ""
    """Node-local folder for shards fetched from URLs; default ~/.cache/deepspike/shards."""

    def __post_init__(self):
        self.validate()

    def validate(self):
        """Raise a clear error for a bad value; also run by `build_loader` after command-line overrides."""
        if self.dataset not in list_datasets():
            raise ValueError(f"data.dataset={self.dataset!r}; expected one of {list_datasets()}")
        if self.format not in FORMATS:
            raise ValueError(f"data.format={self.format!r}; expected one of {FORMATS}")
        if self.folder_augment not in FOLDER_AUGMENTS:
            raise ValueError(f"data.folder_augment={self.folder_augment!r}; expected one of {FOLDER_AUGMENTS}")
        if self.batch_size < 1 or self.num_workers < 0:
            raise ValueError(f"data.batch_size={self.batch_size} must be >= 1 and "
                             f"data.num_workers={self.num_workers} >= 0")
