"""`BatchSetting`: how the micro batch, gradient accumulation, global batch and learning rate follow from the
world size.

The one place that decides it: the trainer, the DeepSpeed config and the launchers (and their --dry-run)
all call `batch_setting`. (`bench/max_batch.py` is the memory planner, a different question.) Runs record it
as `batch_plan.json` and `plan.*` MLflow params, the launchers' --dry-run print it as `plan {json}`.

A recipe states a reference setting: `optim.global_batch` images per optimizer step at peak learning rate
`optim.lr`, and `data.batch_size` images per rank per micro-step. `optim.batch_policy` turns it into a plan
for `world` ranks:

- "scale" (default): the micro batch stays the recipe's. Gradient accumulation is the number of whole
  `micro x world` rounds that fit in the reference global batch, at least 1, so the reference is met
  exactly wherever the ranks can reach it (ImageNet: 32 x 8 GPUs = 256 at lr 0.1, the authors' setting;
  1 GPU accumulates 8). On more ranks the global batch grows to `micro x world` and the learning rate
  follows it linearly, `lr x global / reference`, with at least `optim.scale_warmup_epochs` of linear
  warm-up (Goyal et al. 2017, "Accurate, Large Minibatch SGD": 5 epochs).
- "fixed": the global batch is `optim.global_batch` at any world size, and so is the learning rate.
  Each rank takes `global / world` images per optimizer step, as `data.batch_size`-sized micro batches
  accumulated when that divides, else as the largest micro batch below it that does; a world size that
  does not divide the global batch is an error.

Resume: a run keeps the global batch it started with (`started_at`, saved in every checkpoint's
meta.json), so a resume at another world size continues the same optimisation exactly: the
saved global batch is split over the new ranks as under "fixed", and the "scale" policy's lr and warm-up
follow from it as before. A scaled run resumed on fewer ranks (a lost node) therefore accumulates more
instead of shrinking its batch mid-schedule. On a world size the saved global batch cannot be split over
(4 x 8 GPUs = 1024 resumed on 3 x 8), "fixed" fails with a clear error, while "scale" goes on with the
largest batch of whole `micro x world` rounds within it (768 at lr x 0.75) and the trainer warns that the
resume is not exact. Only a new run (new --run-name) re-plans from the recipe. Bit for bit (up to
summation order) also needs BatchNorm to see the same images: with SyncBN, the same micro x world
(e.g. data.batch_size=32 on 1 rank for 16 on 2); otherwise the step differs by BN's batch statistics only.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

POLICIES = ("scale", "fixed")


@dataclass(frozen=True)
class BatchSetting:
    world_size: int
    micro_batch: int
    """Images per rank per forward/backward (the loaders' batch size)."""
    grad_accumulation: int
    global_batch: int
    """Images per optimizer step over all ranks: micro_batch x grad_accumulation x world_size."""
    lr: float
    """Peak learning rate of the schedule."""
    warmup_epochs: float
    policy: str
    reference_batch: int
    """The recipe's `optim.global_batch`, at which its `optim.lr` is given."""
    reference_lr: float

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def params(self) -> dict[str, Any]:
        """Flat MLflow params (`plan.*`, as runs have always logged them)."""
        return {f"plan.{k}": v for k, v in self.to_dict().items()}


def batch_setting(optim, micro_batch: int, world: int, started_at: int | None = None) -> BatchSetting:
    """The setting for `world` ranks from an `OptimConfig` and the recipe's per-rank `data.batch_size`;
    `started_at`: the global batch of the run being resumed, which the setting then keeps."""
    ref, lr, policy = optim.global_batch, optim.lr, optim.batch_policy
    if world < 1:
        raise ValueError(f"the world size must be >= 1, got {world}")
    if ref <= 0 or micro_batch <= 0:
        raise ValueError(f"optim.global_batch ({ref}) and data.batch_size ({micro_batch}) must be > 0")
    if policy not in POLICIES:
        raise ValueError(f"optim.batch_policy must be one of {', '.join(POLICIES)}, got {policy!r}")
    if started_at is None and policy == "fixed":
        return _split(ref, micro_batch, world, optim, policy)
    if started_at is None:
        accum = max(1, ref // (micro_batch * world))
        global_batch = micro_batch * world * accum
        return _scaled(BatchSetting(world, micro_batch, accum, global_batch, 0.0, 0.0, policy, ref, lr), optim)
    try:
        setting = _split(started_at, micro_batch, world, optim, policy)
    except ValueError:
        if policy == "fixed":
            raise ValueError(f"this run's global batch of {started_at} cannot be split over {world} ranks, so "
                             "it cannot resume exactly here (batch policy 'fixed'); resume on a world size that "
                             "divides it, or start a new run") from None
        # An elastic run that lost a node: going on beats stopping. The largest whole number of rounds that
        # stays within the run's batch, the lr following it; the trainer reports the changed setting.
        accum = max(1, started_at // (micro_batch * world))
        setting = BatchSetting(world, micro_batch, accum, micro_batch * world * accum, 0.0, 0.0, policy,
                         optim.global_batch, optim.lr)
    return _scaled(setting, optim) if policy == "scale" else setting


def _split(global_batch: int, micro_batch: int, world: int, optim, policy: str) -> BatchSetting:
    """`global_batch` over `world` ranks: the largest micro batch up to `micro_batch` that divides each
    rank's share, accumulated."""
    if global_batch % world:
        raise ValueError(
            f"optim.global_batch={global_batch} cannot be split over {world} ranks (batch policy 'fixed'); "
            f"use a world size that divides it, or optim.batch_policy=scale")
    per_rank = global_batch // world
    micro = max(d for d in range(1, min(micro_batch, per_rank) + 1) if per_rank % d == 0)
    return BatchSetting(world, micro, per_rank // micro, global_batch, optim.lr, optim.warmup_epochs, policy,
                     optim.global_batch, optim.lr)


def _scaled(setting: BatchSetting, optim) -> BatchSetting:
    """Linear lr scaling with the global batch, and the large-batch warm-up once it exceeds the recipe's."""
    warmup = optim.warmup_epochs
    if setting.global_batch > optim.global_batch:
        warmup = max(warmup, optim.scale_warmup_epochs)
    return dataclasses.replace(setting, lr=optim.lr * setting.global_batch / optim.global_batch,
                               warmup_epochs=warmup)
