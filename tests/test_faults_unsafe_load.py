"""Files carrying a malicious pickle are refused with a clear error, and the code in them does not run.

A real 1-rank run writes a checkpoint and an export; copies of them get one file replaced by a pickle
whose `__reduce__` creates a marker file when unpickled. Resuming (our per-rank state, DeepSpeed's model
file), exporting, evaluating and the analysis loader must all refuse it before anything is created.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from trainer_fixtures import save_results, spawn_results, tiny_config

from trainer.export import consolidated_state_dict, export, load_exported
from trainer.safe_load import UnsafeFileError, safe_load

pytestmark = pytest.mark.slow


class CreatesFile:
    """Unpickling this calls open(marker, 'w'): the file appearing means code from the file ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def _poison(path: Path, marker: Path) -> None:
    """Replace `path` with a file of the same kind whose payload creates `marker` when loaded."""
    blob = safe_load(path)
    blob["payload"] = CreatesFile(marker)
    torch.save(blob, path)


def _worker(rank: int, data: Path, out: Path) -> None:
    from trainer.train import train

    results = {"first": train(tiny_config(data, out / "good", "stop_at_step=2", "checkpoint.every_steps=2"))}
    step_dir = Path(results["first"]["checkpoint"])
    for name, file in (("rank_state", "trainer_rank00000.pt"), ("model_states", "mp_rank_00_model_states.pt")):
        bad = out / f"bad_{name}" / "checkpoints" / step_dir.name
        shutil.copytree(step_dir, bad)
        _poison(bad / file, out / f"pwned_{name}")
        try:
            train(tiny_config(data, out / f"bad_{name}", "stop_at_step=4", "checkpoint.every_steps=2"))
            results[name] = "resumed"
        except UnsafeFileError as e:
            results[name] = str(e)
    # The untouched checkpoint still resumes (weights-only loading reads everything we write).
    results["resumed"] = train(tiny_config(data, out / "good", "stop_at_step=4", "checkpoint.every_steps=2"))
    save_results(out, rank, results)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out, (results,) = spawn_results(_worker, 1, tmp_path_factory, "unsafe_load")
    return out, results


@pytest.mark.parametrize("name, file", [("rank_state", "trainer_rank00000.pt"),
                                        ("model_states", "mp_rank_00_model_states.pt")])
def test_resume_refuses_a_malicious_checkpoint(runs, name, file):
    out, results = runs
    assert not (out / f"pwned_{name}").exists()
    assert results[name].startswith("refusing to load") and file in results[name], results[name]
    assert "io.open" in results[name]  # torch names the refused global


def test_clean_checkpoints_still_resume(runs):
    _, results = runs
    assert results["resumed"]["step"] == 4 and results["resumed"]["resumed_from"].endswith("step_00000002")


def test_export_evaluate_and_analysis_refuse_malicious_files(runs, tmp_path):
    from analysis.loading import load_checkpoint_model
    from trainer.evaluate import main as evaluate_main

    out, results = runs
    step_dir = Path(results["first"]["checkpoint"])
    good = export(step_dir, tmp_path / "model.pt")
    load_exported(good)  # the genuine export loads

    marker = tmp_path / "pwned"
    bad_model = tmp_path / "bad" / "model.pt"
    bad_model.parent.mkdir()
    shutil.copy(good, bad_model)
    shutil.copy(out / "good" / "config.yaml", bad_model.parent / "config.yaml")
    _poison(bad_model, marker)
    for load in (lambda: load_exported(bad_model), lambda: load_checkpoint_model(bad_model),
                 lambda: evaluate_main([str(bad_model)])):
        with pytest.raises(UnsafeFileError, match="refusing to load"):
            load()
    bad_step = tmp_path / "ckpt" / step_dir.name
    shutil.copytree(step_dir, bad_step)
    _poison(bad_step / "mp_rank_00_model_states.pt", marker)
    with pytest.raises(UnsafeFileError, match="refusing to load"):
        consolidated_state_dict(bad_step)
    assert not marker.exists()
