"""A run whose "scale" plan grew the global batch resumes exactly on fewer ranks: it keeps its global batch
(and the lr that goes with it) and accumulates more, instead of re-planning from the recipe."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from trainer_fixtures import digits_shards, spawn, tiny_config

from trainer.export import consolidated_state_dict

pytestmark = pytest.mark.slow

# digits_tiny with a reference of 16 images at lr 0.5: 2 ranks x 16 make 32 at lr 1.0.
SCALED = ["optim.global_batch=16", "optim.max_steps=4", "checkpoint.every_steps=2", "checkpoint.keep_last=5"]


def _two_ranks(rank: int, data: Path, out: Path) -> None:
    from trainer.train import train

    train(tiny_config(data, out / "full", *SCALED))


def _one_rank(rank: int, data: Path, out: Path) -> None:
    from trainer.train import train

    saved = out / "full" / "checkpoints" / "step_00000002"
    # micro 32 on one rank: BatchNorm sees the 32 images SyncBN saw over the two ranks' 16 + 16.
    train(tiny_config(data, out / "resumed", *SCALED, "data.batch_size=32", f"checkpoint.resume={saved}"))


def test_scaled_run_resumed_on_one_rank_keeps_its_global_batch(tmp_path_factory, tmp_path):
    data = digits_shards(tmp_path_factory)
    spawn(_two_ranks, 2, data, tmp_path)
    spawn(_one_rank, 1, data, tmp_path)
    full = json.loads((tmp_path / "full" / "batch_plan.json").read_text())
    resumed = json.loads((tmp_path / "resumed" / "batch_plan.json").read_text())
    assert (full["world_size"], full["micro_batch"], full["grad_accumulation"], full["global_batch"]) == (2, 16, 1, 32)
    assert full["lr"] == pytest.approx(1.0) and full["warmup_epochs"] == 5.0
    # Re-planned from the recipe (16 at lr 0.5) the step would change; the resumed run keeps 32 at 1.0.
    assert (resumed["world_size"], resumed["micro_batch"], resumed["grad_accumulation"], resumed["global_batch"],
            resumed["policy"]) == (1, 32, 1, 32, "scale")
    assert resumed["lr"] == pytest.approx(1.0) and resumed["warmup_epochs"] == 5.0
    before = consolidated_state_dict(tmp_path / "full" / "checkpoints" / "step_00000002")
    after = consolidated_state_dict(tmp_path / "full" / "checkpoints" / "step_00000004")
    mine = consolidated_state_dict(tmp_path / "resumed" / "checkpoints" / "step_00000004")
    # Up to float summation order; other samples or another lr would differ by the order of the update.
    floats = [k for k in after if after[k].is_floating_point()]
    num = sum(((mine[k] - after[k]).double() ** 2).sum() for k in floats)
    den = sum(((after[k] - before[k]).double() ** 2).sum() for k in floats)
    assert (num / den).sqrt() < 1e-4, float((num / den).sqrt())
