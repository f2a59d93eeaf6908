"""A full disk during a checkpoint save, on 2 real ranks (DeepSpeed engine, gloo).

Rank 0 gets a file-size limit (RLIMIT_FSIZE, with SIGXFSZ ignored so that writes fail with EFBIG as on a
full disk) below the size of DeepSpeed's model file, after a first checkpoint was written. Its next save
must fail on every rank with one clear error (rank 1 wrote its share fine and must not hang in a barrier),
leave no step directory that looks complete, and leave the previous checkpoint resumable: the resumed run
ends bit for bit where an uninterrupted one does.
"""

from __future__ import annotations

import resource
import signal
import time
from pathlib import Path

import pytest
import torch
from trainer_fixtures import save_results, spawn_results, tiny_config

from trainer.checkpoint import complete_checkpoints
from trainer.export import consolidated_state_dict

pytestmark = pytest.mark.slow

BASE = ["optim.max_steps=12", "checkpoint.every_steps=4", "checkpoint.keep_last=3"]


def _worker(rank: int, data: Path, out: Path) -> None:
    from trainer.checkpoint import CheckpointWriteError
    from trainer.train import train

    results: dict = {"straight": train(tiny_config(data, out / "straight", *BASE))}
    run_dir = out / "full"
    first = train(tiny_config(data, run_dir, *BASE, "stop_at_step=4"))
    model_file = Path(first["checkpoint"]) / "mp_rank_00_model_states.pt"
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    if rank == 0:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (model_file.stat().st_size // 2, hard))
    t0 = time.perf_counter()
    try:
        train(tiny_config(data, run_dir, *BASE, "stop_at_step=8"))
        results["error"] = None
    except CheckpointWriteError as e:
        results["error"] = str(e)
    results["seconds"] = time.perf_counter() - t0
    if rank == 0:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    results["left"] = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    results["resumed"] = train(tiny_config(data, run_dir, *BASE))
    save_results(out, rank, results)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return spawn_results(_worker, 2, tmp_path_factory, "disk_full")


def test_full_disk_fails_the_save_on_every_rank_with_one_clear_error(runs):
    _, results = runs
    for r in range(2):
        message = results[r]["error"]
        assert message is not None, f"rank {r} saw no error"
        assert message.startswith("checkpoint of step 8 failed on rank(s) [0]"), message
        assert "step_00000004, intact and resumable" in message
    # Rank 0 names the file that hit the limit (its share of the save) and the free space.
    assert "mp_rank_00_model_states.pt: RuntimeError" in results[0]["error"], results[0]["error"]
    assert "GiB free under" in results[0]["error"]
    print(f"disk-full figures: error after {results[0]['seconds']:.1f} s of the second invocation")


def test_previous_checkpoint_is_intact_and_resumes_exactly(runs):
    out, results = runs
    # Only the complete step 4 and DeepSpeed's pointer-free layout: no .tmp- or step_00000008 directory.
    assert results[0]["left"] == ["latest", "step_00000004"]
    resumed = results[0]["resumed"]
    assert resumed["resumed_from"].endswith("step_00000004") and resumed["step"] == 12
    assert [d.name for d in complete_checkpoints(out / "full" / "checkpoints")][-1] == "step_00000012"
    a = consolidated_state_dict(Path(results[0]["straight"]["checkpoint"]))
    b = consolidated_state_dict(Path(resumed["checkpoint"]))
    for k in a:
        assert torch.equal(a[k], b[k]), k
