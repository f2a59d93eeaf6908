"""The training side of deepspike: typed configs and recipes, the DeepSpeed wrap step, one readable
`Trainer` (`trainer.train` is its command line), checkpoints with exact resume, MLflow logging, export
and evaluation."""

__all__ = ["Trainer"]


def __getattr__(name):
    # DeepSpeed and torch load only when a Trainer is wanted, so the config and launcher code starts fast.
    if name == "Trainer":
        from trainer.trainer import Trainer

        return Trainer
    raise AttributeError(f"module 'trainer' has no attribute {name!r}")
