"""Data pipelines: convert raw data sets once (`python -m dataloaders.convert`), then stream them to every
rank with `build_loader` (WebDataset shards or FFCV files, exact epochs, resumable mid-epoch)."""

from dataloaders.config import DataConfig
from dataloaders.datasets import get_dataset, list_datasets

__all__ = ["DataConfig", "Loader", "build_loader", "get_dataset", "list_datasets"]


def __getattr__(name):
    # torch and torchvision load only when a loader is wanted, so the converter CLIs start fast
    if name in ("Loader", "build_loader"):
        from dataloaders import loader

        return getattr(loader, name)
    raise AttributeError(f"module 'dataloaders' has no attribute {name!r}")
