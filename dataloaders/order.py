"""Which samples a rank reads in an epoch, in which order, and with which augmentation seed.

Everything derives from (seed, epoch), never from process state, so every rank, every worker count
and a restarted job agree on the plan:
- train: one permutation of the whole split per epoch; rank r takes every world_size-th sample
  starting at r and keeps `num_batches` full batches, the same count on every rank. The remainder
  (fewer than world_size * batch_size samples) is dropped and differs from epoch to epoch.
- eval: no shuffle; rank r takes samples r, r + world_size, ...; every sample is read exactly once.
  Ranks that run out of data fill their last batch(es) with PAD, which loaders turn into rows with
  label -1, so every rank still yields `num_batches` batches.
- each sample's augmentation seed is `mix_seed(epoch_key, index)`: a restored loader, a different
  worker count or FFCV's threads reproduce the same crops and flips bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PAD = -1


def mix_seed(key, index):
    """splitmix64 finaliser of (key, index), as uint32. Plain numpy arithmetic so that FFCV's numba
    decoder compiles this same function; call it with uint64 arrays from Python (array arithmetic wraps
    without overflow warnings)."""
    z = np.uint64(key) ^ (np.uint64(index) * np.uint64(0x9E3779B97F4A7C15))
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return (z ^ (z >> np.uint64(31))) & np.uint64(0xFFFFFFFF)


@dataclass(frozen=True)
class SampleOrder:
    num_samples: int
    batch_size: int
    rank: int
    world_size: int
    seed: int
    train: bool

    def __post_init__(self):
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank={self.rank} is outside world_size={self.world_size}")
        if self.num_samples < 1:
            raise ValueError("the split holds no samples")
        if self.train and self.num_samples < self.world_size * self.batch_size:
            raise ValueError(f"{self.num_samples} training samples cannot fill one batch of "
                             f"{self.batch_size} on each of {self.world_size} ranks; lower data.batch_size")

    @property
    def num_batches(self) -> int:
        if self.train:
            return self.num_samples // (self.world_size * self.batch_size)
        per_rank = -(-self.num_samples // self.world_size)
        return -(-per_rank // self.batch_size)

    def epoch_key(self, epoch: int) -> int:
        return int(mix_seed(np.uint64(self.seed), np.array([epoch], dtype=np.uint64))[0])

    def rows(self, epoch: int) -> np.ndarray:
        """int64 [num_batches, batch_size]: sample positions of this rank's batches, PAD for padding."""
        n = self.num_batches * self.batch_size
        if self.train:
            order = np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)
            mine = order[self.rank :: self.world_size][:n]
        else:
            mine = np.arange(self.rank, self.num_samples, self.world_size)
            mine = np.concatenate([mine, np.full(n - len(mine), PAD)])
        return mine.astype(np.int64).reshape(self.num_batches, self.batch_size)

    def reads(self, epoch: int) -> None:
        """Random access reads by position, in any order (`StreamOrder` returns its file order)."""
        return None

    def seeds(self, epoch: int, positions: np.ndarray) -> np.ndarray | None:
        """Per-sample augmentation seeds (uint32 as int64) for training; None for evaluation."""
        if not self.train:
            return None
        key = np.uint64(self.epoch_key(epoch))
        return mix_seed(key, positions.astype(np.uint64)).astype(np.int64)
