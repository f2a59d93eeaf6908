"""The parts of the fp16 path that run without a GPU: the loss-scale metrics read from DeepSpeed's real fp16
optimizer, the input dtype that follows the weights, and `python -m trainer.evaluate` of an fp32 export under
an fp16 run's config (main cast the inputs to half). DeepSpeed refuses an fp16 engine on CPU, so nothing here
trains in fp16: the loss-scaled training step itself is a GPU check (README, "What has run on a GPU")."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from trainer_fixtures import digits_shards, spawn, tiny_config

from models import create_model
from trainer.config import save_config
from trainer.metrics import loss_scale_metrics
from trainer.precision import weights_dtype


def test_loss_scale_metrics_read_deepspeeds_fp16_optimizer():
    from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer

    model = torch.nn.Linear(4, 2).half()
    opt = FP16_Optimizer(torch.optim.SGD(model.parameters(), lr=0.1), dynamic_loss_scale=True,
                         initial_dynamic_scale=2**16, verbose=False)
    assert not hasattr(opt, "cur_scale")  # what main read: it logged NaN and left grad norms scaled
    assert loss_scale_metrics(opt, 0) == {"train/loss_scale": 65536.0, "train/skipped_steps": 0.0}
    opt.backward(model(torch.ones(3, 4).half()).float().sum())
    model.weight.grad.fill_(float("inf"))
    assert opt.step()  # overflow: the step is skipped and the scale halves
    assert loss_scale_metrics(opt, 1) == {"train/loss_scale": 32768.0, "train/skipped_steps": 1.0}
    with pytest.raises(TypeError, match="SGD has no loss scale"):
        loss_scale_metrics(torch.optim.SGD(model.parameters(), lr=0.1), 0)


def test_inputs_take_the_weights_dtype():
    model = create_model("ms_resnet20", num_classes=10, T=2, widths=[8, 16, 32])
    assert weights_dtype(model) == torch.float32
    assert weights_dtype(model.half()) == torch.float16  # inside a DeepSpeed fp16 engine


def _train_then_export(rank: int, data: Path, run_dir: Path) -> None:
    from trainer.export import export
    from trainer.train import train

    result = train(tiny_config(data, run_dir, "optim.max_steps=2", "checkpoint.every_steps=0"))
    export(result["checkpoint"], run_dir / "model.pt")


@pytest.mark.slow
def test_evaluate_cli_under_an_fp16_config_takes_an_fp32_export(tmp_path_factory, tmp_path, capsys):
    """The export is trained in fp32 (DeepSpeed refuses an fp16 engine on CPU) and saved beside a config
    saying engine.precision=fp16, as an fp16 run leaves it: evaluation must feed the fp32 weights fp32 inputs
    whatever the config says. The fp16 training itself is a GPU check (bench/gpu_check)."""
    from trainer.evaluate import main

    data = digits_shards(tmp_path_factory)
    run_dir = tmp_path / "run"
    spawn(_train_then_export, 1, data, run_dir)  # fp32: an fp16 run's export is fp32 weights too
    cfg = tiny_config(data, run_dir, "engine.precision=fp16")
    save_config(cfg, run_dir / "config.yaml")
    blob = torch.load(run_dir / "model.pt", weights_only=True)
    assert all(v.dtype == torch.float32 for v in blob["state_dict"].values() if v.is_floating_point())
    main([str(run_dir / "model.pt")])
    (line,) = capsys.readouterr().out.strip().splitlines()[-1:]
    out = json.loads(line)
    assert out["step"] == 2 and out["val/samples"] > 0 and 0.0 <= out["val/top1"] <= 1.0
