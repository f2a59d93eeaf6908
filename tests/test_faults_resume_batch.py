"""Resuming with another data.batch_size: the position maps to the same sample, in both directions, or the
resume stops with a clear error (another optim.global_batch). Real DeepSpeed engine on 1 gloo rank."""

from __future__ import annotations

from pathlib import Path

import pytest
from trainer_fixtures import save_results, spawn_results, tiny_config

pytestmark = pytest.mark.slow

# Global batch 32 on 1 rank: micro 16 x accumulation 2 as saved; the checkpoint is step 4's (128 samples in).
BASE = ["optim.max_steps=12", "checkpoint.every_steps=4", "log_every=2"]


def _next_samples(trainer, n: int) -> list[int]:
    """The sample positions the restored loader will read next (its plan rows from its position on)."""
    loader = trainer.train_loader
    return loader.plan.rows(loader.epoch)[loader.batches_yielded:].ravel()[:n].tolist()


def _worker(rank: int, data: Path, out: Path) -> None:
    from trainer.train import train
    from trainer.trainer import Trainer

    results: dict = {}
    first = train(tiny_config(data, out / "saved", *BASE, "stop_at_step=4"))
    step_dir = first["checkpoint"]
    # What the run with the saved micro-batch reads next: the reference for every other micro-batch.
    same = Trainer(tiny_config(data, out / "same", *BASE, f"checkpoint.resume={step_dir}"))
    results["expected"] = _next_samples(same, 64)
    for micro in (8, 32):  # smaller and larger than the saved 16
        cfg = tiny_config(data, out / f"micro{micro}", *BASE, f"data.batch_size={micro}",
                          f"checkpoint.resume={step_dir}", "stop_at_step=6")
        trainer = Trainer(cfg)
        results[f"micro{micro}"] = {"next": _next_samples(trainer, 64), "accum": trainer.accum,
                                    "step": trainer.state.step, "result": trainer.fit()}
    try:
        Trainer(tiny_config(data, out / "global64", *BASE, "optim.global_batch=64", f"checkpoint.resume={step_dir}"))
    except ValueError as e:
        results["global64"] = str(e)
    save_results(out, rank, results)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return spawn_results(_worker, 1, tmp_path_factory, "resume_batch")[1][0]


@pytest.mark.parametrize("micro, accum", [(8, 4), (32, 1)])
def test_another_micro_batch_continues_at_the_same_sample(results, micro, accum):
    run = results[f"micro{micro}"]
    assert (run["accum"], run["step"]) == (accum, 4)
    assert len(results["expected"]) == 64 and run["next"] == results["expected"]
    assert run["result"]["step"] == 6  # and it trains on from there


def test_another_global_batch_is_refused_with_a_clear_error(results):
    message = results["global64"]
    assert "optim.global_batch=32" in message and "this run has 64" in message
