"""The checkpoint schema: meta.json as the trainer writes it (format 1) reads into `CheckpointMeta` and back;
a file that lacks a key, has an unknown one or another format is refused."""

from __future__ import annotations

import json

import pytest

from trainer.checkpoint import CheckpointMeta
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
