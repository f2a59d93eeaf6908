"""Non-finite losses on 2 real ranks (DeepSpeed engine, gloo): engine.nonfinite = rollback | skip | stop.

The NaN is injected on rank 1 only (trainer_fixtures.poisoned_forward, a test-only hook on the network), so
rank 0 sees finite numbers and acts only because the check is collective; a rank acting alone would hang the
other in its next collective. The issue's own reproduction (a huge lr on digits_tiny) runs last. One spawned
group runs every training back to back; the tests assert on what it wrote."""

from __future__ import annotations

import contextlib
import json
import math
import re
from pathlib import Path

import pytest
import torch
from trainer_fixtures import poisoned_forward, save_results, spawn_results, tiny_config

from trainer.checkpoint import complete_checkpoints, read_meta
from trainer.export import consolidated_state_dict

pytestmark = pytest.mark.slow

# 2 ranks x micro 16 = global 32: one forward per step, 42 steps per epoch, so all of this stays in epoch 0.
# Rank 1's 11th training forward is step 11's; the newest checkpoint before it is step 8.
BASE = ["optim.max_steps=16", "checkpoint.every_steps=4", "checkpoint.keep_last=1", "log_every=1"]
POISONED_FORWARD = 11


def _worker(rank: int, data: Path, out: Path) -> None:
    from trainer.health import NonFiniteError
    from trainer.train import train

    results: dict = {}

    def run(name: str, *overrides: str, poison: str | None = "loss") -> None:
        cfg = tiny_config(data, out / name.split("#")[0], *overrides)
        hook = poisoned_forward(POISONED_FORWARD, poison) if poison and rank == 1 else contextlib.nullcontext()
        try:
            with hook:
                results[name] = {"result": train(cfg)}
        except NonFiniteError as e:
            results[name] = {"error": str(e)}

    skip = ["engine.nonfinite=skip", "optim.max_steps=11", "checkpoint.every_steps=10", "checkpoint.keep_last=5"]
    run("rollback", *BASE)
    run("rollback_resumed#1", *BASE, "stop_at_step=12", "checkpoint.keep_last=5")
    run("rollback_resumed#2", *BASE, "checkpoint.keep_last=5", poison=None)  # the NaN was in the rolled-back window
    run("skip", *BASE, *skip)
    run("skip_z2", *BASE, *skip, "engine.zero_stage=2")
    # A finite loss with non-finite gradients: at ZeRO >= 1 they are in partitions no single rank sees whole.
    run("skip_grads", *BASE, *skip, poison="grads")
    run("skip_grads_z1", *BASE, *skip, "engine.zero_stage=1", poison="grads")
    # A NaN input also reaches BatchNorm's running statistics, which the dropped step must not keep.
    run("skip_input", *BASE, *skip, poison="input")
    run("stop", *BASE, "engine.nonfinite=stop")
    # lr 1e6 diverges: non-finite weights must never be saved, nor the finite checkpoints pruned for them.
    run("huge_lr", "optim.lr=1000000.0", "checkpoint.every_steps=2", "engine.max_rollbacks=2", poison=None)
    save_results(out, rank, results)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return spawn_results(_worker, 2, tmp_path_factory, "nan_runs")


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _all_finite(run_dir: Path) -> list[str]:
    steps = complete_checkpoints(run_dir / "checkpoints")
    assert steps, f"no checkpoint in {run_dir}"
    for step_dir in steps:
        for k, v in consolidated_state_dict(step_dir).items():
            assert v.isfinite().all(), f"{step_dir.name}: {k} is not finite"
    return [d.name for d in steps]


def test_rollback_recomputes_from_the_last_checkpoint_and_finishes(runs):
    out, results = runs
    for r in range(2):  # both ranks took the same path, although only rank 1 saw the NaN
        assert results[r]["rollback"]["result"]["step"] == 16
    meta = read_meta(out / "rollback" / "checkpoints" / "step_00000016")
    # Steps 9..11 recomputed from step 8; the data moved on past position 10, so it ends 3 batches further.
    assert (meta["step"], meta["epoch_step"], meta["rollbacks"], meta["nonfinite_steps"]) == (16, 19, 1, 1)
    assert _all_finite(out / "rollback") == ["step_00000016"]
    rows = _metrics(out / "rollback")
    events = [r for r in rows if "health/detect_s" in r]
    assert [(e["step"], e["health/rollbacks"]) for e in events] == [(11, 1)]
    last = [r for r in rows if "health/rollbacks" in r][-1]
    assert (last["step"], last["health/rollbacks"], last["health/nonfinite_steps"]) == (16, 1, 1)
    assert all(math.isfinite(r["train/loss"]) for r in rows if "train/loss" in r)
    figures = {"detect_s": events[0]["health/detect_s"], "steps_recomputed": 11 - 8}
    print(f"rollback figures: {figures}")
    (out / "rollback_figures.json").write_text(json.dumps(figures))


def test_resume_after_a_rollback_continues_identically(runs):
    out, results = runs
    first, second = results[0]["rollback_resumed#1"]["result"], results[0]["rollback_resumed#2"]["result"]
    assert first["step"] == 12 and second["resumed_from"].endswith("step_00000012")
    assert read_meta(second["resumed_from"])["epoch_step"] == 15  # the skipped window is recorded
    a = consolidated_state_dict(out / "rollback" / "checkpoints" / "step_00000016")
    b = consolidated_state_dict(Path(second["checkpoint"]))
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("run", ["skip", "skip_z2", "skip_grads", "skip_grads_z1", "skip_input"])
def test_skip_drops_the_update_and_counts_it(runs, run):
    out, results = runs
    assert results[1][run].get("result", {}).get("step") == 11, results[1][run]
    root = out / run / "checkpoints"
    before = consolidated_state_dict(root / "step_00000010")
    after = consolidated_state_dict(root / "step_00000011")
    for k in before:  # step 11 (rank 1's NaN) changed no weight and no BatchNorm statistic on any rank
        assert torch.equal(before[k], after[k]), k
    meta = read_meta(root / "step_00000011")
    assert (meta["nonfinite_steps"], meta["rollbacks"], meta["epoch_step"]) == (1, 0, 11)
    _all_finite(out / run)


def test_stop_exits_at_once_with_one_message_on_every_rank(runs):
    out, results = runs
    messages = [results[r]["stop"]["error"] for r in range(2)]
    assert messages[0] == messages[1]
    assert "non-finite loss on rank(s) [1] at step 11" in messages[0] and "engine.nonfinite=stop" in messages[0]
    assert _all_finite(out / "stop") == ["step_00000008"]


def test_huge_lr_never_writes_non_finite_weights_and_stops(runs):
    out, results = runs
    for r in range(2):
        assert "error" in results[r]["huge_lr"], results[r]["huge_lr"]
        assert "engine.max_rollbacks=2" in results[r]["huge_lr"]["error"]
    names = _all_finite(out / "huge_lr")
    assert names  # the last finite checkpoint is kept
    events = [(r["step"], r["health/rollbacks"], r["health/nonfinite_steps"])
              for r in _metrics(out / "huge_lr") if "health/detect_s" in r]
    # Two rollbacks, then the stop; each event keeps its own point (steps increase though the run went back).
    assert [e[1:] for e in events] == [(1, 1), (2, 2), (2, 3)], events
    assert [e[0] for e in events] == sorted({e[0] for e in events}), events


def test_the_guard_uses_no_private_deepspeed_state():
    """Only DeepSpeed's public API (was_step_applied, safe_set_full_grad): private attributes of the engine or
    its ZeRO optimizer change between releases without notice, and patching them changes DeepSpeed for the
    whole process."""
    root = Path(__file__).resolve().parents[1] / "trainer"
    found = [f"{f.name}: {m.group(0)}" for f in (root / "health.py", root / "trainer.py")
             for m in re.finditer(r"\b(engine|optimizer|zero)\._[a-z]\w*", f.read_text())]
    assert not found, found
