"""Trainer configuration: recipes, overrides, the DeepSpeed JSON and the rules it enforces (no processes)."""

from __future__ import annotations

import json
import math

import pytest

from trainer.batch_setting import batch_setting
from trainer.config import TrainConfig, apply_overrides, load_config, save_config, to_dict
from trainer.deepspeed_config import deepspeed_config
from trainer.recipes import get_recipe, list_recipes
from trainer.wrap import lr_lambda

EXPECTED_RECIPES = {"ms_resnet18_imagenet", "ms_resnet34_imagenet", "ms_resnet104_imagenet",
                    *(f"ms_resnet{d}_{ds}" for d in (20, 32, 44, 56, 110, 482) for ds in ("cifar10", "cifar100")),
                    "ms_resnet20_cifar10dvs", "digits_tiny", "digits_demo"}


def test_all_recipes_exist_and_build_a_model_that_exists():
    from models import list_models

    assert set(list_recipes()) >= EXPECTED_RECIPES
    for name in list_recipes():
        cfg = get_recipe(name)
        assert cfg.recipe == name
        assert cfg.model.name in list_models()
        # Every recipe's global batch must split over its own micro batch at some world size.
        assert cfg.optim.global_batch % cfg.data.batch_size == 0, name


@pytest.mark.parametrize("depth,wd", [(18, 1e-5), (34, 1e-5), (104, 1e-4)])
def test_imagenet_recipes_match_the_authors_script(depth, wd):
    cfg = get_recipe(f"ms_resnet{depth}_imagenet")
    o = cfg.optim
    assert (o.lr, o.global_batch, o.momentum, o.weight_decay, o.epochs, o.schedule, o.label_smoothing) == \
        (0.1, 256, 0.9, wd, 125, "cosine", 0.1)
    assert not o.nesterov
    assert cfg.model.T == 6 and cfg.model.num_classes == 1000
    assert cfg.engine.precision == "bf16" and cfg.engine.sync_bn
    assert cfg.data.auto_augment and not cfg.data.hflip


def test_cifar100_recipes_are_the_cifar10_setup_with_a_100_class_head():
    for depth in (20, 482):
        c10, c100 = get_recipe(f"ms_resnet{depth}_cifar10"), get_recipe(f"ms_resnet{depth}_cifar100")
        assert (c100.model.num_classes, c100.data.dataset, c100.data.path) == (100, "cifar100", "data/cifar100")
        assert c100.model.name == c10.model.name == f"ms_resnet{depth}" and c100.optim == c10.optim


def test_overrides_parse_values_and_create_dict_keys():
    cfg = get_recipe("digits_tiny")
    apply_overrides(cfg, ["optim.lr=0.05", "optim.max_steps=3", "engine.sync_bn=false",
                          "model.kwargs.widths=[4, 8, 16]", "checkpoint.resume=runs/x/step_00000001",
                          "mlflow.tracking_uri=null", "run_name=abc"])
    assert cfg.optim.lr == 0.05 and cfg.optim.max_steps == 3 and cfg.engine.sync_bn is False
    assert cfg.model.kwargs["widths"] == [4, 8, 16]
    assert cfg.checkpoint.resume == "runs/x/step_00000001" and cfg.mlflow.tracking_uri is None
    apply_overrides(cfg, ["optim.lr=1"])  # an int where a float is expected is fine
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)


@pytest.mark.parametrize("bad,err", [
    ("optim.lrr=0.1", KeyError), ("optimizer.lr=0.1", KeyError), ("optim.lr", ValueError),
    ("optim.max_steps=many", TypeError), ("engine.sync_bn=[1]", TypeError), ("optim=3", KeyError),
    ("data.dataset=mnist", ValueError), ("data.batch_size=0", ValueError),
])
def test_bad_overrides_are_refused(bad, err):
    with pytest.raises(err):
        apply_overrides(get_recipe("digits_tiny"), [bad])


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_config_round_trip(tmp_path, suffix):
    cfg = get_recipe("ms_resnet104_imagenet")
    apply_overrides(cfg, ["model.kwargs.widths=[8, 16]", "data.path=/x"])
    save_config(cfg, tmp_path / f"c{suffix}")
    back = load_config(tmp_path / f"c{suffix}")
    assert isinstance(back, TrainConfig) and to_dict(back) == to_dict(cfg)
    bad = to_dict(cfg) | {"optimiser": {}}
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(KeyError, match="optimiser"):
        load_config(tmp_path / "bad.json")


def test_global_batch_is_kept_and_accumulation_absorbs_world_size():
    cfg = get_recipe("ms_resnet18_imagenet")
    assert [batch_setting(cfg.optim, 32, w).grad_accumulation for w in (8, 4, 1)] == [1, 2, 8]
    for world in (1, 2, 4, 8):
        ds = deepspeed_config(cfg, batch_setting(cfg.optim, cfg.data.batch_size, world), on_gpu=False)
        assert ds["train_batch_size"] == 256
        assert ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * world == 256


def plan2(cfg):
    return batch_setting(cfg.optim, cfg.data.batch_size, 2)


def test_precision_policy_in_the_deepspeed_json():
    cfg = get_recipe("digits_tiny")
    apply_overrides(cfg, ["engine.precision=bf16", "engine.zero_stage=2"])
    ds = deepspeed_config(cfg, plan2(cfg), on_gpu=False)
    # bf16 is autocast around an fp32 engine: DeepSpeed's bf16 block would cast params but not BN buffers.
    assert "bf16" not in ds and "fp16" not in ds
    assert ds["zero_optimization"]["stage"] == 2 and ds["zero_allow_untested_optimizer"]
    apply_overrides(cfg, ["engine.precision=fp16"])
    with pytest.raises(ValueError, match="fp16 needs a CUDA GPU"):
        deepspeed_config(cfg, plan2(cfg), on_gpu=False)
    fp16 = deepspeed_config(cfg, plan2(cfg), on_gpu=True)["fp16"]
    assert fp16["enabled"] and fp16["loss_scale"] == 0  # 0 = dynamic loss scaling
    apply_overrides(cfg, ["engine.precision=fp8"])
    with pytest.raises(ValueError, match="precision"):
        deepspeed_config(cfg, plan2(cfg), on_gpu=False)


def test_user_deepspeed_json_is_used_but_checked(tmp_path):
    cfg = get_recipe("digits_tiny")
    user = tmp_path / "ds.json"
    cfg.engine.deepspeed_config = str(user)
    user.write_text(json.dumps({"train_batch_size": 32, "gradient_clipping": 1.5, "wall_clock_breakdown": 1}))
    ds = deepspeed_config(cfg, plan2(cfg), on_gpu=False)
    assert ds["gradient_clipping"] == 1.5 and ds["wall_clock_breakdown"]
    assert ds["gradient_accumulation_steps"] == 1
    user.write_text(json.dumps({"train_batch_size": 64}))
    with pytest.raises(ValueError, match="train_batch_size=64"):
        deepspeed_config(cfg, plan2(cfg), on_gpu=False)
    user.write_text(json.dumps({"bf16": {"enabled": True}}))
    with pytest.raises(ValueError, match="BatchNorm"):
        deepspeed_config(cfg, plan2(cfg), on_gpu=False)
    # DeepSpeed's universal loader unpickles with weights_only=False: refused, on a GPU too.
    user.write_text(json.dumps({"checkpoint": {"load_universal": True, "use_node_local_storage": False}}))
    for on_gpu in (False, True):
        with pytest.raises(ValueError, match=r"checkpoint\.load_universal .*weights_only=False"):
            deepspeed_config(cfg, plan2(cfg), on_gpu=on_gpu)
    user.write_text(json.dumps({"checkpoint": {"load_universal": False}}))
    assert deepspeed_config(cfg, plan2(cfg), on_gpu=False)["checkpoint"] == {"load_universal": False}


def test_lr_schedule_warmup_then_cosine_to_zero():
    cfg = get_recipe("digits_tiny").optim
    cfg.schedule, cfg.warmup_epochs = "cosine", 1.0
    f = lr_lambda(cfg, total_steps=110, steps_per_epoch=10)
    assert [round(f(s), 6) for s in range(3)] == [0.1, 0.2, 0.3]
    assert f(9) == 1.0 and f(10) == 1.0
    assert math.isclose(f(60), 0.5, abs_tol=1e-12) and f(110) == 0.0
    cfg.schedule = "linear"
    with pytest.raises(ValueError, match="schedule"):
        lr_lambda(cfg, 10, 1)
