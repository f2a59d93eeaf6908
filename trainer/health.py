"""Non-finite losses, gradients and weights: found collectively, so that every rank acts the same way.

Each rank keeps a device flag per step (a NaN or inf loss in any micro-batch; non-finite gradients where
the rank holds them) and the flags of all ranks are combined by one all-reduce per optimizer step, before
DeepSpeed applies the update. Weights are checked (once, collectively) before every checkpoint save, so a
checkpoint on disk is always finite. What the trainer then does is `engine.nonfinite` (trainer.trainer).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

POLICIES = ("rollback", "skip", "stop")


class NonFiniteError(RuntimeError):
    """Training stopped on non-finite values (engine.nonfinite=stop, or rollbacks exhausted)."""


def grads_finite(params, device: torch.device) -> torch.Tensor:
    """0-dim bool on `device`: every gradient this rank holds is finite (one fused norm, no host sync)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.ones((), dtype=torch.bool, device=device)
    return torch.nn.utils.get_total_norm(grads, error_if_nonfinite=False).isfinite()


def ranks_flagged(local_bad: torch.Tensor) -> list[list[int]]:
    """Collective. `local_bad`: float [k] of this rank's k flags (non-zero = bad), on the training device.
    Returns, per flag, the ranks that raised it (the same lists on every rank)."""
    world, rank = dist.get_world_size(), dist.get_rank()
    table = torch.zeros(world, local_bad.numel(), dtype=torch.float32, device=local_bad.device)
    table[rank] = (local_bad != 0).float()
    if world > 1:
        dist.all_reduce(table)
    bad = table.t().cpu()  # the one host sync of the check
    return [[r for r in range(world) if row[r] > 0] for row in bad]


def weights_finite(module) -> bool:
    """Collective: every rank's parameters and buffers are finite."""
    tensors = [t for t in list(module.parameters()) + list(module.buffers()) if t.is_floating_point()]
    bad = torch.stack([(~t.isfinite()).any() for t in tensors]).any().float().reshape(1)
    return not ranks_flagged(bad)[0]
