"""`LoopState`: where the training loop stands, saved in every checkpoint and restored by a resume."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class LoopState:
    """What the loop needs to continue exactly where it stopped."""

    step: int = 0
    epoch: int = 0
    epoch_step: int = 0
    best_top1: float | None = None
    mlflow_run_id: str | None = None
    nonfinite_steps: int = 0
    """Optimizer steps found non-finite so far (each skipped, rolled back or fatal)."""
    rollbacks: int = 0
    """Rollbacks so far. After one, `epoch`/`epoch_step` (the data position) run ahead of `step`: the
    batches of the diverged window are not read again, so a resume continues after them as well."""
