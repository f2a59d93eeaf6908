"""Non-finite losses, gradients and weights: found collectively, so that every rank acts the same way.

Each rank keeps a device flag per step (a NaN or inf loss in any micro-batch; at ZeRO 0, non-finite gradients)
and the flags of all ranks are combined by one all-reduce per optimizer step, before DeepSpeed applies the
update. At ZeRO >= 1 the gradients live in partitions, each rank holding a slice of the reduced ones: there
DeepSpeed's own check, the global gradient norm it computes over every partition before each update (a
non-finite norm drops the step), finds them, and the guard reads its outcome (`engine.was_step_applied()`).
Weights are checked (once, collectively) before every checkpoint save, so a checkpoint on disk is always
finite. `NonFiniteGuard` makes both checks and returns a `Verdict` from `engine.nonfinite`: go on, skip the
step, stop, or roll back to a checkpoint; the trainer acts on it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from deepspeed.utils import safe_set_full_grad

POLICIES = ("rollback", "skip", "stop")
GO, SKIP, STOP, ROLLBACK = "go", "skip", "stop", "rollback"


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


@dataclass(frozen=True)
class Verdict:
    action: str
    """GO, SKIP (the step was made without an update), STOP (raise NonFiniteError(message)) or ROLLBACK
    (to `target`)."""
    what: str = ""
    """What was found, for people: 'non-finite loss on rank(s) [1] at step 11'."""
    message: str = ""
    target: Path | None = None
    logged: bool = True
    """Whether the finding is logged as a health event before acting on it."""


class NonFiniteGuard:
    """Collective checks of each optimizer step and of the weights before a save, and what `engine.nonfinite`
    makes of a finding. `state`: the loop state, whose `nonfinite_steps` it counts and whose `rollbacks` it
    reads; `newest`: the newest finite checkpoint (the rollback target), or None."""

    def __init__(self, engine_cfg, engine, device: torch.device, state, newest: Callable[[], Path | None]):
        self.cfg, self.engine, self.device, self.state, self.newest = engine_cfg, engine, device, state, newest
        self._buffers: list[torch.Tensor] = []

    def begin_step(self) -> None:
        """Before a step's first forward: under engine.nonfinite=skip, keep the module's buffers (BatchNorm's
        running statistics), which the forward passes update before anything is known, so that a dropped
        step leaves no trace in them (a NaN input would make them NaN and fail the next save)."""
        if self.cfg.nonfinite == SKIP:
            self._buffers = [b.detach().clone() for b in self.engine.module.buffers()]

    def step(self, bad_loss: torch.Tensor) -> Verdict:
        """The accumulation boundary: find (collectively) whether this step is finite, then let DeepSpeed
        apply it, or make it a step without update and return what engine.nonfinite says."""
        engine, zero = self.engine, self.cfg.zero_stage
        # fp16's loss scaler expects and handles overflowing gradients itself; only its loss counts here.
        check_grads = self.cfg.precision != "fp16" and zero == 0
        grads_ok = grads_finite(engine.module.parameters(), self.device) if check_grads else bad_loss == 0
        loss_ranks, grad_ranks = ranks_flagged(torch.stack([bad_loss, (~grads_ok).float()]))
        bad = bool(loss_ranks or grad_ranks)
        if not bad:
            engine.step()
            if zero > 0 and self.cfg.precision != "fp16" and not engine.was_step_applied():
                # DeepSpeed's norm over every partition was not finite: gradients no single rank saw whole.
                bad, grad_ranks = True, list(range(dist.get_world_size()))
        elif zero == 0:
            # SGD leaves parameters without a gradient untouched (no momentum or weight decay either), and
            # DeepSpeed steps the lr schedule as usual.
            for param in engine.module.parameters():
                param.grad = None
            engine.step()
        else:
            self._drop_zero_step()
        if not bad:
            return Verdict(GO)
        if not engine.was_step_applied() and engine.lr_scheduler is not None:
            engine.lr_scheduler.step()  # a dropped step still counts in the schedule, as at ZeRO-0
        if self._buffers:
            with torch.no_grad():
                for buffer, kept in zip(engine.module.buffers(), self._buffers):
                    buffer.copy_(kept)
        what = "loss" if loss_ranks else "gradients"
        return self._verdict(f"non-finite {what} on rank(s) {loss_ranks or grad_ranks} at step {self.state.step + 1}")

    def weights(self, module) -> Verdict:
        """Collective, before a save: a step with finite loss and gradients can still overflow the weights.
        Non-finite weights are never written, so the checkpoints on disk (and the ones pruning keeps) are
        all finite."""
        if weights_finite(module):
            return Verdict(GO)
        what = f"non-finite weights after step {self.state.step}"
        if self.cfg.nonfinite == SKIP:
            self.state.nonfinite_steps += 1
            return Verdict(STOP, what, f"{what} (finite loss and gradients overflowed them); "
                                       "engine.nonfinite=skip cannot undo an applied update", logged=False)
        return self._verdict(what)

    def _verdict(self, what: str) -> Verdict:
        self.state.nonfinite_steps += 1
        policy, newest = self.cfg.nonfinite, self.newest()
        if policy == SKIP:
            return Verdict(SKIP, what)
        if policy == STOP:
            return Verdict(STOP, what, f"{what}; engine.nonfinite=stop. The newest checkpoint "
                                       f"({newest or 'none yet'}) is finite.")
        if newest is None or self.state.rollbacks >= self.cfg.max_rollbacks:
            why = ("no checkpoint to roll back to yet" if newest is None else
                   f"{self.state.rollbacks} rollback(s) done, engine.max_rollbacks={self.cfg.max_rollbacks}")
            return Verdict(STOP, what, f"{what}; {why}. Lower optim.lr or raise optim.grad_clip; the newest "
                                       f"checkpoint ({newest or 'none'}) is finite.")
        return Verdict(ROLLBACK, what, target=newest)

    def _drop_zero_step(self) -> None:
        """ZeRO >= 1 holds the gradients in its partitions: the step goes through DeepSpeed's own path for a
        non-finite gradient norm (no update, gradients freed, counters and boundaries kept). The partitions
        are marked non-finite through DeepSpeed's public gradient API, each rank writing the slices it holds;
        every rank gets here together (the decision was collective)."""
        for param in self.engine.module.parameters():
            if param.requires_grad:
                safe_set_full_grad(param, torch.full_like(param, float("nan"), dtype=torch.float32))
        self.engine.step()
        if self.engine.was_step_applied():
            raise RuntimeError("DeepSpeed applied an optimizer step that was found non-finite")
