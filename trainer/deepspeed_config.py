"""The DeepSpeed JSON, generated from our config (or a user's file, checked against it)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from trainer.batch_setting import BatchSetting
from trainer.config import TrainConfig


def deepspeed_config(cfg: TrainConfig, batch: BatchSetting, on_gpu: bool) -> dict[str, Any]:
    """DeepSpeed config for this run; the batch sizes are `batch`'s (trainer/batch_setting.py). Precision policy:

    - bf16: the engine stays fp32 (master weights, BN buffers, optimizer) and the trainer autocasts the
      forward pass to bf16. DeepSpeed's own "bf16" block casts the parameters but not the BatchNorm
      buffers, which makes every BatchNorm fail on CPU (docs/stack.md §2).
    - fp16: DeepSpeed's fp16 block with dynamic loss scaling; its CPU accelerator has no fp16 support.
    - The LIF neurons accumulate the membrane and the surrogate gradient in fp32 in every mode.
    """
    precision = cfg.engine.precision
    if precision not in ("bf16", "fp16", "fp32"):
        raise ValueError(f"engine.precision must be bf16, fp16 or fp32, got {precision!r}")
    if precision == "fp16" and not on_gpu:
        raise ValueError("engine.precision=fp16 needs a CUDA GPU (DeepSpeed's CPU accelerator has no fp16 "
                         "loss scaler); use engine.precision=bf16 or fp32 on CPU")
    if cfg.engine.zero_stage not in (0, 1, 2):
        raise ValueError(f"engine.zero_stage must be 0, 1 or 2, got {cfg.engine.zero_stage}")

    ds: dict[str, Any] = {
        "train_batch_size": batch.global_batch,
        "train_micro_batch_size_per_gpu": batch.micro_batch,
        "gradient_accumulation_steps": batch.grad_accumulation,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": {"stage": cfg.engine.zero_stage},
        # Our optimizer is torch's SGD, which DeepSpeed has not whitelisted for ZeRO.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    if precision == "fp16":
        ds["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000,
                      "hysteresis": 2, "min_loss_scale": 1}
    if cfg.engine.deepspeed_config:
        ds = _merge_user_config(ds, Path(cfg.engine.deepspeed_config), on_gpu)
    return ds


def _merge_user_config(generated: dict[str, Any], path: Path, on_gpu: bool) -> dict[str, Any]:
    """The user's JSON wins, except that it must describe the same batch and a precision we support."""
    user = json.loads(path.read_text())
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
        if key in user and user[key] != generated[key]:
            raise ValueError(f"{path}: {key}={user[key]} but the run needs {generated[key]} "
                             "(optim.global_batch, optim.batch_policy, data.batch_size and the world size "
                             "decide it; change those instead)")
    if user.get("bf16", {}).get("enabled") and not on_gpu:
        raise ValueError(f"{path}: DeepSpeed's bf16 block breaks BatchNorm on CPU; remove it and use "
                         "engine.precision=bf16 (fp32 engine + bf16 autocast)")
    if user.get("fp16", {}).get("enabled") and not on_gpu:
        raise ValueError(f"{path}: fp16 needs a CUDA GPU")
    checkpoint = user.get("checkpoint", {})
    if isinstance(checkpoint, dict) and checkpoint.get("load_universal"):
        # DeepSpeed's universal-checkpoint loader calls torch.load(weights_only=False) itself, past the
        # weights-only checkpoint engine every other load of ours goes through.
        raise ValueError(f"{path}: checkpoint.load_universal loads files with torch.load(weights_only=False), "
                         "which runs whatever a tampered file holds; remove it: this trainer resumes its own "
                         "checkpoints at any world size (trainer/checkpoint.py), weights-only")
    return {**generated, **user}
