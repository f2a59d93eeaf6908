"""The training side of deepspike: typed configs and recipes, the DeepSpeed wrap step, one readable
`Trainer` (`trainer.train` is its command line), checkpoints with exact resume, MLflow logging, export
and evaluation."""

import os

__all__ = ["Trainer"]


def choose_ds_accelerator() -> None:
    """DeepSpeed picks its accelerator once, when it is first imported, from DS_ACCELERATOR or else from what it
    detects (with a warning when it settles for the CPU). Every import of DeepSpeed in this project comes
    after this package's __init__, and child processes inherit the variable: this is the one place it is set,
    and only where torch finds no GPU. A value set by hand is kept (select_device refuses 'cpu' on a GPU rank)."""
    if "DS_ACCELERATOR" not in os.environ:
        import torch

        if not torch.cuda.is_available():
            os.environ["DS_ACCELERATOR"] = "cpu"


choose_ds_accelerator()


def __getattr__(name):
    # DeepSpeed loads only when a Trainer is wanted, so the config and launcher code starts fast.
    if name == "Trainer":
        from trainer.trainer import Trainer

        return Trainer
    raise AttributeError(f"module 'trainer' has no attribute {name!r}")
