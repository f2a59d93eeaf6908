"""DeepSpeed's torch checkpoint engine as the trainer uses it.

- Loads are weights-only (`trainer.safe_load`): a checkpoint file cannot run code.
- A failed write (a full disk, a file-size limit, an I/O error) is recorded instead of raised. DeepSpeed's
  `save_checkpoint` has barriers after its writes; a rank that raised out of it would leave the others
  waiting there. Recorded, every rank reaches those barriers, and `trainer.checkpoint.save_checkpoint`
  then reports the failure on every rank at once.
"""

from __future__ import annotations

from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

from trainer.safe_load import safe_load


class TrainerCheckpointEngine(TorchCheckpointEngine):
    failure: str | None = None
    """The first write that failed since `take_failure`, as 'path: error'."""

    def save(self, state_dict, path: str):
        try:
            super().save(state_dict, path)
        except (OSError, RuntimeError) as e:  # torch.save reports a failed write as RuntimeError
            self.failure = self.failure or f"{path}: {type(e).__name__}: {e}"

    def load(self, path: str, map_location=None):
        return safe_load(path, map_location)

    def take_failure(self) -> str | None:
        failure, self.failure = self.failure, None
        return failure


def trainer_checkpoint_engine(engine) -> TrainerCheckpointEngine:
    """`engine`'s checkpoint engine, replaced by a `TrainerCheckpointEngine` with the same settings on first
    use. Other engines (Nebula, decoupled or fast writers) are chosen explicitly and have loaders of their
    own; they are refused rather than trusted."""
    current = engine.checkpoint_engine
    if isinstance(current, TrainerCheckpointEngine):
        return current
    if type(current) is not TorchCheckpointEngine:
        raise ValueError(f"DeepSpeed checkpoint engine {type(current).__name__} loads files with pickle; "
                         "the trainer supports the default torch engine only")
    ours = TrainerCheckpointEngine.__new__(TrainerCheckpointEngine)
    ours.__dict__.update(current.__dict__)  # same settings (serialisation format, name); no re-init log
    engine.checkpoint_engine = ours
    return ours
