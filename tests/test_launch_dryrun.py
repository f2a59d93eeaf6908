"""The batch plan (trainer/batch_setting.py) and the launchers' --dry-run, for every recipe and cluster shape.

No cluster is started: --dry-run resolves the recipe, overrides, data path and plan from the flags alone.
The data path is a URL, which the launchers take without looking (a cluster's storage is not here).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import ray

from launch import cifar10, cifar10dvs, imagenet
from launch.common import ROOT, check_batch
from trainer.batch_setting import batch_setting
from trainer.config import apply_overrides
from trainer.deepspeed_config import deepspeed_config
from trainer.recipes import get_recipe, list_recipes

LAUNCHERS = (imagenet, cifar10, cifar10dvs)
WORLDS = (1, 2, 8, 16, 32, 64, 128)
DATA = "https://data.example/shards"  # remote: the launcher does not read it


def shape(world: int) -> tuple[int, int]:
    """--nodes, --gpus-per-node of 8-GPU nodes (fewer GPUs on one node for small worlds)."""
    return max(world // 8, 1), min(world, 8)


def launcher_of(recipe: str):
    dataset = get_recipe(recipe).data.dataset
    return next(m for m in LAUNCHERS if dataset in m.DATASETS)


def dry_run(capsys, launcher, *argv: str) -> tuple[int, dict | str]:
    try:
        launcher.main(["--dry-run", "--data", DATA, "--storage", "/tmp/deepspike-dryrun-never-made", *argv])
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    if code:
        return code, err
    (line,) = out.splitlines()
    assert line.startswith("plan ")
    return code, json.loads(line[len("plan "):])


@pytest.mark.parametrize("recipe", list_recipes())
def test_every_recipe_plans_every_world_size(recipe, capsys):
    ref = get_recipe(recipe)
    for world in WORLDS:
        nodes, gpus = shape(world)
        code, plan = dry_run(capsys, launcher_of(recipe), "--recipe", recipe, "--nodes", str(nodes),
                             "--gpus-per-node", str(gpus))
        assert code == 0, plan
        assert plan["world_size"] == world and plan["recipe"] == recipe and plan["policy"] == "scale"
        assert plan["micro_batch"] == ref.data.batch_size  # the recipe's per-GPU batch at every size
        assert plan["global_batch"] == plan["micro_batch"] * plan["grad_accumulation"] * world
        assert plan["global_batch"] >= min(ref.optim.global_batch, plan["micro_batch"] * world)
        assert plan["lr"] == pytest.approx(ref.optim.lr * plan["global_batch"] / ref.optim.global_batch)
        grown = plan["global_batch"] > ref.optim.global_batch
        assert plan["warmup_epochs"] == (max(ref.optim.warmup_epochs, 5.0) if grown else ref.optim.warmup_epochs)
        assert plan["data"] == DATA
    assert not ray.is_initialized()


def test_authors_setting_on_8_gpus_and_the_shipped_cluster():
    cfg = get_recipe("ms_resnet104_imagenet")
    authors = check_batch(cfg, 8)
    assert (authors.micro_batch, authors.grad_accumulation, authors.global_batch, authors.lr) == (32, 1, 256, 0.1)
    assert authors.warmup_epochs == 0.0
    one = check_batch(cfg, 1)  # one GPU accumulates to the same step
    assert (one.micro_batch, one.grad_accumulation, one.global_batch, one.lr) == (32, 8, 256, 0.1)
    # cluster/aws.yaml and kuberay: 4 nodes x 8 GPUs. On main this raised "not a multiple of ... 1024".
    big = check_batch(cfg, 32)
    assert (big.micro_batch, big.grad_accumulation, big.global_batch) == (32, 1, 1024)
    assert big.lr == pytest.approx(0.4) and big.warmup_epochs == 5.0
    ds = deepspeed_config(cfg, big, on_gpu=True)
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == \
        (1024, 32, 1)


def test_fixed_policy_pins_the_global_batch_and_lr():
    cfg = get_recipe("ms_resnet18_imagenet")
    apply_overrides(cfg, ["optim.batch_policy=fixed"])
    for world, micro, accum in ((1, 32, 8), (8, 32, 1), (32, 8, 1), (128, 2, 1)):
        plan = batch_setting(cfg.optim, cfg.data.batch_size, world)
        assert (plan.micro_batch, plan.grad_accumulation, plan.global_batch, plan.lr) == (micro, accum, 256, 0.1)
    with pytest.raises(ValueError, match="cannot be split over 3 ranks"):
        batch_setting(cfg.optim, 32, 3)
    with pytest.raises(ValueError, match="batch_policy must be one of scale, fixed"):
        apply_overrides(cfg, ["optim.batch_policy=grow"])
        batch_setting(cfg.optim, 32, 8)


def test_a_resumed_run_keeps_its_global_batch():
    cfg = get_recipe("ms_resnet18_imagenet")
    started = batch_setting(cfg.optim, 32, 32)  # 1024 at lr 0.4
    fewer = batch_setting(cfg.optim, 32, 8, started_at=started.global_batch)  # after losing 3 nodes: same step
    assert (fewer.micro_batch, fewer.grad_accumulation, fewer.global_batch, fewer.lr, fewer.warmup_epochs) == \
        (32, 4, 1024, pytest.approx(0.4), 5.0)
    assert fewer.policy == "scale" and batch_setting(cfg.optim, 32, 32, started_at=1024) == started
    # 4 x 8 GPUs less one node: 1024 cannot be split over 24 ranks; "scale" goes on with whole rounds.
    shrunk = batch_setting(cfg.optim, 32, 24, started_at=1024)
    assert (shrunk.micro_batch, shrunk.grad_accumulation, shrunk.global_batch, shrunk.lr) == \
        (32, 1, 768, pytest.approx(0.3))
    apply_overrides(cfg, ["optim.batch_policy=fixed"])
    assert batch_setting(cfg.optim, 32, 64, started_at=256) == batch_setting(cfg.optim, 32, 64)
    with pytest.raises(ValueError, match="global batch of 256 cannot be split over 3 ranks"):
        batch_setting(cfg.optim, 32, 3, started_at=256)


def test_dry_run_errors_are_one_line_and_exit_2(capsys):
    code, err = dry_run(capsys, imagenet, "--nodes", "4")
    assert code == 2 and err == ("error: --dry-run needs --gpus-per-node (0 = one CPU worker per node): without "
                                 "a cluster the number of ranks is not known\n")
    code, err = dry_run(capsys, imagenet, "--nodes", "3", "--gpus-per-node", "1", "--set", "optim.batch_policy=fixed")
    assert code == 2 and err == ("error: optim.global_batch=256 cannot be split over 3 ranks (batch policy "
                                 "'fixed'); use a world size that divides it, or optim.batch_policy=scale. "
                                 "--nodes and --gpus-per-node set the number of ranks.\n")
    code, err = dry_run(capsys, imagenet, "--gpus-per-node", "0", "--set", "engine.precision=fp16")
    assert code == 2 and err.startswith("error: engine.precision=fp16 needs a CUDA GPU")
    code, plan = dry_run(capsys, imagenet, "--gpus-per-node", "8", "--set", "engine.precision=fp16")
    assert code == 0 and plan["precision"] == "fp16"
    code, err = dry_run(capsys, cifar10dvs, "--recipe", "ms_resnet18_imagenet", "--gpus-per-node", "1")
    assert code == 2 and "this launcher runs cifar10dvs recipes" in err
    assert not ray.is_initialized()


def test_dry_run_as_a_process_on_the_shipped_cluster_shape():
    r = subprocess.run([sys.executable, "launch/imagenet.py", "--nodes", "4", "--gpus-per-node", "8", "--dry-run",
                        "--data", DATA], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    (line,) = [x for x in r.stdout.splitlines() if x.startswith("plan ")]
    plan = json.loads(line[len("plan "):])
    assert {k: plan[k] for k in ("recipe", "world_size", "micro_batch", "grad_accumulation", "global_batch",
                                 "policy", "warmup_epochs")} == \
        {"recipe": "ms_resnet104_imagenet", "world_size": 32, "micro_batch": 32, "grad_accumulation": 1,
         "global_batch": 1024, "policy": "scale", "warmup_epochs": 5.0}
    assert plan["lr"] == pytest.approx(0.4)
