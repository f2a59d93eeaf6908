"""Loading checkpoint and model files without running code from them.

`torch.load(weights_only=False)` unpickles arbitrary objects, and an object's `__reduce__` can run any
command: a checkpoint or model file from a shared folder or an (unauthenticated) MLflow artifact store
would run with the trainer's rights. Every file we read goes through `safe_load`: tensors, plain values
and the few DeepSpeed data classes its checkpoints hold, nothing else. DeepSpeed's own loads go through
its checkpoint engine, which the trainer replaces by one that calls `safe_load` (trainer.checkpoint_engine).

MLflow logged models (`mlflow.pytorch`) are pickles of the module itself and stay code-running; only
`trainer.logged_model.load_logged_model` reads them, for a models:/ or runs:/ URI given explicitly.
"""

from __future__ import annotations

import os
import pickle
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum
from deepspeed.utils.tensor_fragment import fragment_address

# What DeepSpeed's ZeRO optimizer shards (and fp16 engines' states) hold besides tensors: plain data records.
DEEPSPEED_GLOBALS = [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


class UnsafeFileError(ValueError):
    """A file holds objects outside the allowlist; it was not loaded."""


def safe_load(path: str | Path, map_location: Any = "cpu") -> Any:
    try:
        with torch.serialization.safe_globals(DEEPSPEED_GLOBALS):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        # Keep the line of torch's message that names the refused global; the rest advises weights_only=False.
        lines = [ln.strip() for ln in str(e).splitlines() if "WeightsUnpickler error" in ln]
        detail = lines[0].split(" was not an allowed global")[0] if lines else type(e).__name__
        raise UnsafeFileError(f"refusing to load {path}: it holds objects other than tensors and plain values, "
                              f"which unpickling would execute ({detail}). Files written by this trainer never do; "
                              "this one is corrupt, from an older format, or was tampered with.") from None


@contextmanager
def weights_only_loads():
    """Within it, library code that calls `torch.load(weights_only=False)` itself (DeepSpeed's zero_to_fp32)
    loads weights-only too. Process-wide while active (torch reads the variable on every load)."""
    old = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        with torch.serialization.safe_globals(DEEPSPEED_GLOBALS):
            yield
    finally:
        if old is None:
            os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = old
