"""The checkpoint schema: meta.json as the trainer writes it (format 1) reads into `CheckpointMeta` and back;
a file that lacks a key, has an unknown one or another format is refused; `CheckpointManager` decides which
steps are saved and where a run resumes."""

from __future__ import annotations

import json

import pytest

from trainer.checkpoint import CheckpointManager, CheckpointMeta
from trainer.config import CheckpointConfig
from trainer.loop_state import LoopState

FORMAT_1 = {"format": 1, "step": 40, "epoch": 0, "epoch_step": 40, "best_top1": 0.17, "best_metric_here": 0.17,
            "mlflow_run_id": "c243b42c11da4ef4bf1253fceeaa4b83", "nonfinite_steps": 1, "rollbacks": 1,
            "world_size": 2, "zero_stage": 0, "precision": "fp32", "grad_accumulation": 1, "global_batch": 32,
            "metrics": {"train/loss": 2.3, "val/top1": 0.17},
            "config": {"recipe": "digits_tiny", "model": {"name": "ms_resnet20"}}, "saved_at": 1796168995.68}


def test_format_1_meta_reads_and_writes_back_unchanged(tmp_path):
    (tmp_path / "meta.json").write_text(json.dumps(FORMAT_1))
    meta = CheckpointMeta.read(tmp_path)
    assert meta.progress == LoopState(step=40, epoch=0, epoch_step=40, best_top1=0.17,
                                      mlflow_run_id="c243b42c11da4ef4bf1253fceeaa4b83", nonfinite_steps=1,
                                      rollbacks=1)
    assert (meta.world_size, meta.grad_accumulation, meta.global_batch, meta.best_metric_here) == (2, 1, 32, 0.17)
    assert meta.to_dict() == FORMAT_1


def test_unknown_formats_and_keys_are_refused():
    with pytest.raises(ValueError, match="checkpoint format 2"):
        CheckpointMeta.from_dict({**FORMAT_1, "format": 2})
    with pytest.raises(TypeError):
        CheckpointMeta.from_dict({**FORMAT_1, "surprise": 1})
    with pytest.raises(ValueError, match=r"lacks the loop state's \['rollbacks'\]"):
        CheckpointMeta.from_dict({k: v for k, v in FORMAT_1.items() if k != "rollbacks"})
    with pytest.raises(TypeError, match="global_batch"):
        CheckpointMeta.from_dict({k: v for k, v in FORMAT_1.items() if k != "global_batch"})


def test_the_manager_decides_which_steps_are_saved(tmp_path):
    every4 = CheckpointManager(CheckpointConfig(every_steps=4), tmp_path / "a", zero_stage=0)
    assert every4.resume_point is None and every4.started_global_batch() is None
    assert [s for s in range(1, 13) if every4.due(s)] == [4, 8, 12]
    assert every4.due(5, epoch_end=True)
    every4.saved_step = 12  # the last step of an invocation is saved unless it just was
    assert not every4.due(12, last_step=True) and every4.due(13, last_step=True)
    epochs_only = CheckpointManager(CheckpointConfig(every_steps=0), tmp_path / "b", zero_stage=0)
    assert not any(epochs_only.due(s) for s in range(1, 100)) and epochs_only.due(7, epoch_end=True)


def test_the_resume_point_is_the_newest_complete_checkpoint_or_the_one_asked_for(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (4, 8):
        (root / f"step_{step:08d}").mkdir(parents=True)
        (root / f"step_{step:08d}" / "meta.json").write_text(json.dumps({**FORMAT_1, "global_batch": 8 * step}))
    (root / "step_00000012").mkdir()  # no meta.json: incomplete
    manager = CheckpointManager(CheckpointConfig(), root, zero_stage=0)
    assert manager.resume_point == root / "step_00000008" and manager.started_global_batch() == 64
    asked = CheckpointManager(CheckpointConfig(resume=str(root / "step_00000004")), root, zero_stage=0)
    assert asked.started_global_batch() == 32
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        CheckpointManager(CheckpointConfig(resume=str(root / "step_00000012")), root, zero_stage=0)
