"""Training-side measurements between two log lines."""

from __future__ import annotations

import resource

import torch
import torch.distributed as dist


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class TrainWindow:
    """Training loss / accuracy / time accumulated between two log lines, summed over ranks. Sums stay
    on the device so that a step never waits for the GPU just to be logged."""

    def __init__(self, device: torch.device):
        self.sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss * n, correct, n
        self.steps, self.seconds = 0, 0.0

    def add(self, loss: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> None:
        valid = y >= 0
        n = valid.sum()
        self.sums += torch.stack([loss.double() * n, ((logits.argmax(1) == y) & valid).sum(), n]).double()

    def metrics(self, global_batch: int) -> dict[str, float]:
        sums = self.sums.clone()
        if dist.get_world_size() > 1:
            dist.all_reduce(sums)
        loss, correct, n = sums.tolist()
        step_s = self.seconds / max(self.steps, 1)
        perf = {"perf/step_s": step_s, "perf/images_per_s": global_batch / step_s if step_s else 0.0}
        if not n:  # every step of the window was dropped as non-finite: no loss to report
            return perf
        return {"train/loss": loss / n, "train/top1": correct / n, **perf}


def loss_scale_metrics(optimizer, skipped_steps: int) -> dict[str, float]:
    """fp16's dynamic loss scale and the optimizer steps it skipped on overflow, from a DeepSpeed engine's
    `optimizer` and `skipped_steps`. Its FP16_Optimizer (ZeRO 0) keeps the scale in
    `loss_scale_config.cur_scale` (it has no `cur_scale`), its ZeRO optimizers in `cur_scale`."""
    scaler = getattr(optimizer, "loss_scale_config", None)
    scale = getattr(scaler, "cur_scale", None) if scaler is not None else getattr(optimizer, "cur_scale", None)
    if scale is None:
        raise TypeError(f"{type(optimizer).__name__} has no loss scale: is this an fp16 DeepSpeed engine?")
    return {"train/loss_scale": float(scale), "train/skipped_steps": float(skipped_steps)}
