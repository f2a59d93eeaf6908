"""The checkpoint schema: meta.json as main wrote it (format 1) reads into `CheckpointMeta` and back."""

from __future__ import annotations

import json

import pytest

from trainer.checkpoint import CheckpointMeta, Progress

# The 14 keys of a meta.json written before CheckpointMeta existed, by the hand-built dict in train().
FORMAT_1 = {"format": 1, "step": 40, "epoch": 0, "epoch_step": 40, "best_top1": 0.17, "best_metric_here": 0.17,
            "mlflow_run_id": "c243b42c11da4ef4bf1253fceeaa4b83", "world_size": 2, "zero_stage": 0,
            "precision": "fp32", "grad_accumulation": 1, "metrics": {"train/loss": 2.3, "val/top1": 0.17},
            "config": {"recipe": "digits_tiny", "model": {"name": "ms_resnet20"}}, "saved_at": 1796168995.68}


def test_format_1_meta_reads_and_writes_back_unchanged(tmp_path):
    (tmp_path / "meta.json").write_text(json.dumps(FORMAT_1))
    meta = CheckpointMeta.read(tmp_path)
    assert meta.progress == Progress(step=40, epoch=0, epoch_step=40, best_top1=0.17,
                                     mlflow_run_id="c243b42c11da4ef4bf1253fceeaa4b83")
    assert (meta.world_size, meta.grad_accumulation, meta.best_metric_here) == (2, 1, 0.17)
    # Counters added since (health) are written at their defaults; everything else comes back unchanged.
    assert meta.to_dict() == {**FORMAT_1, "nonfinite_steps": 0, "rollbacks": 0}


def test_unknown_formats_and_keys_are_refused():
    with pytest.raises(ValueError, match="checkpoint format 2"):
        CheckpointMeta.from_dict({**FORMAT_1, "format": 2})
    with pytest.raises(TypeError):
        CheckpointMeta.from_dict({**FORMAT_1, "surprise": 1})
