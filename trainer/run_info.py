"""What a run records about itself besides metrics: its code version and its headline parameters."""

from __future__ import annotations

import getpass
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from trainer.batch_plan import BatchPlan
from trainer.config import TrainConfig, to_dict


def git_commit() -> str:
    """The checkout's commit; a Ray worker runs from an uploaded copy without .git, so the launcher passes
    the submitting checkout's commit in DEEPSPIKE_GIT_COMMIT."""
    if commit := os.environ.get("DEEPSPIKE_GIT_COMMIT"):
        return commit
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def source_tags(resumed_from: Path | None) -> dict[str, str]:
    """MLflow's own tags for where a run came from (the UI shows them in the runs table). The Ray launcher
    names its command in DEEPSPIKE_ENTRY_POINT; a worker's own argv is Ray's."""
    entry = os.environ.get("DEEPSPIKE_ENTRY_POINT") or " ".join(["python -m trainer.train", *sys.argv[1:]])
    return {"mlflow.source.git.commit": git_commit(), "mlflow.source.name": entry[:500],
            "mlflow.source.type": "JOB", "mlflow.user": getpass.getuser(),
            "resumed_from": str(resumed_from) if resumed_from else ""}


def flat_params(cfg: TrainConfig, plan: BatchPlan) -> dict[str, Any]:
    """~50 headline hyper-parameters as flat MLflow params; the full config goes in as an artifact."""
    flat: dict[str, Any] = {}
    for section in ("model", "data", "optim", "engine"):
        for k, v in to_dict(getattr(cfg, section)).items():
            flat[f"{section}.{k}"] = json.dumps(v) if isinstance(v, dict | list) else v
    flat.update({"recipe": cfg.recipe, "checkpoint.every_steps": cfg.checkpoint.every_steps,
                 "derived.grad_accumulation": plan.grad_accumulation, "derived.world_size_at_start": plan.world_size,
                 **plan.params()})
    return flat
