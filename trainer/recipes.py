"""Named training setups. Each recipe is a function returning a complete `TrainConfig`.

The ImageNet recipes reproduce the authors' released script (docs/model.md §7): SGD momentum 0.9, lr 0.1 for a
global batch of 256, cosine to 0 over 125 epochs, label smoothing 0.1, T = 6, SyncBN, mixed precision,
RandomResizedCrop + AutoAugment without flip, weight decay 1e-5 for 18/34 (README erratum) and 1e-4 for
104. The CIFAR-10 and CIFAR-100 recipes (the depth family 20..482) follow the author's TNNLS answer
(docs/model.md §7: batch 200 / lr 0.2, crop + flip, wd 1e-4); their epoch count and T are not published, the
values below are our choice (docs/model.md §9). CIFAR10-DVS keeps the PLIF data pipeline (T = 20 frames,
128 px); the paper's optimiser settings for it are not published either, so an SGD analogue is used.
"""

from __future__ import annotations

from collections.abc import Callable

from dataloaders.config import DataConfig
from trainer.config import (
    CheckpointConfig,
    EngineConfig,
    ModelConfig,
    OptimConfig,
    TrainConfig,
)

_RECIPES: dict[str, Callable[[], TrainConfig]] = {}


def recipe(fn: Callable[[], TrainConfig]) -> Callable[[], TrainConfig]:
    _RECIPES[fn.__name__] = fn
    return fn


def get_recipe(name: str) -> TrainConfig:
    if name not in _RECIPES:
        raise KeyError(f"unknown recipe {name!r}; known: {', '.join(list_recipes())}")
    cfg = _RECIPES[name]()
    cfg.recipe = name
    return cfg


def list_recipes() -> list[str]:
    return sorted(_RECIPES)


def _imagenet(depth: int, weight_decay: float) -> TrainConfig:
    return TrainConfig(
        model=ModelConfig(name=f"ms_resnet{depth}", num_classes=1000, T=6),
        # 32 per rank = the authors' 256 on 8 GPUs; other world sizes change gradient accumulation.
        data=DataConfig(dataset="imagenet", format="wds", path="data/imagenet", batch_size=32,
                        num_workers=8, image_size=224, val_resize=256, val_crop=224, auto_augment=True,
                        hflip=False, seed=445),
        optim=OptimConfig(global_batch=256, lr=0.1, momentum=0.9, weight_decay=weight_decay, epochs=125,
                          schedule="cosine", label_smoothing=0.1),
        engine=EngineConfig(precision="bf16", zero_stage=0, sync_bn=True, seed=445),
        checkpoint=CheckpointConfig(every_steps=1000, keep_last=3),
        log_every=50,
    )


@recipe
def ms_resnet18_imagenet() -> TrainConfig:
    return _imagenet(18, 1e-5)


@recipe
def ms_resnet34_imagenet() -> TrainConfig:
    return _imagenet(34, 1e-5)


@recipe
def ms_resnet104_imagenet() -> TrainConfig:
    # No activation checkpointing: bench.max_batch (calibrated on CPU) predicts ~219 images x T=6 at 224 px
    # per 80 GB GPU without it, far above the 32 per GPU here; enable it for bigger batches or T.
    return _imagenet(104, 1e-4)


def _cifar(depth: int, dataset: str = "cifar10") -> TrainConfig:
    return TrainConfig(
        model=ModelConfig(name=f"ms_resnet{depth}", num_classes=100 if dataset == "cifar100" else 10, T=6),
        data=DataConfig(dataset=dataset, format="wds", path=f"data/{dataset}", batch_size=50, num_workers=4,
                        image_size=32),
        optim=OptimConfig(global_batch=200, lr=0.2, momentum=0.9, weight_decay=1e-4, epochs=200,
                          schedule="cosine"),
        # Even MS-ResNet-482 needs ~0.14 GiB per 32 px image at T=6 without activation checkpointing
        # (bench.memory), so 50 per GPU fit without it; bench.max_batch says when to turn it on.
        engine=EngineConfig(precision="bf16", zero_stage=0, sync_bn=True),
        checkpoint=CheckpointConfig(every_steps=1000, keep_last=3),
        log_every=50,
    )


@recipe
def ms_resnet20_cifar10() -> TrainConfig:
    return _cifar(20)


@recipe
def ms_resnet32_cifar10() -> TrainConfig:
    return _cifar(32)


@recipe
def ms_resnet44_cifar10() -> TrainConfig:
    return _cifar(44)


@recipe
def ms_resnet56_cifar10() -> TrainConfig:
    return _cifar(56)


@recipe
def ms_resnet110_cifar10() -> TrainConfig:
    return _cifar(110)


@recipe
def ms_resnet482_cifar10() -> TrainConfig:
    return _cifar(482)


# docs/model.md §7 gives one CIFAR setup for both data sets; only the head differs.
for _depth in (20, 32, 44, 56, 110, 482):
    _RECIPES[f"ms_resnet{_depth}_cifar100"] = lambda depth=_depth: _cifar(depth, "cifar100")


@recipe
def ms_resnet18_folder() -> TrainConfig:
    """Any converted image folder (`python -m dataloaders.convert folder`): the ImageNet-18 setup with the
    head sized from the manifest's classes, the normalisation measured at conversion, augmentation by image
    size and a flip. Run it with `python launch/imagenet.py --recipe ms_resnet18_folder --data DIR`; for
    small images add `--set data.image_size=32 data.val_crop=32`."""
    cfg = _imagenet(18, 1e-5)
    cfg.model.num_classes = 0
    cfg.data.dataset, cfg.data.path, cfg.data.auto_augment, cfg.data.hflip = "folder", "data/folder", False, True
    return cfg


@recipe
def ms_resnet20_cifar10dvs() -> TrainConfig:
    return TrainConfig(
        model=ModelConfig(name="ms_resnet20_dvs", num_classes=10, T=20),
        data=DataConfig(dataset="cifar10dvs", format="wds", path="data/cifar10dvs", batch_size=8,
                        num_workers=4, image_size=128),
        optim=OptimConfig(global_batch=32, lr=0.05, momentum=0.9, weight_decay=1e-4, epochs=200,
                          schedule="cosine"),
        engine=EngineConfig(precision="bf16", zero_stage=0, sync_bn=True),
        checkpoint=CheckpointConfig(every_steps=500, keep_last=3),
        log_every=20,
    )


@recipe
def digits_tiny() -> TrainConfig:
    """Seconds per run on CPU: the tests' recipe (point data.path at 16 px digits shards). Blocks start
    non-identity (last BN gamma 0.5) and the lr is high so that the loss falls within a few dozen steps."""
    return TrainConfig(
        model=ModelConfig(name="ms_resnet20", num_classes=10, T=2,
                          kwargs={"widths": [8, 16, 32], "last_bn_gamma0": 0.5}),
        data=DataConfig(dataset="digits", format="wds", path="data/digits16", batch_size=16, num_workers=0,
                        image_size=16),
        optim=OptimConfig(global_batch=32, lr=0.5, momentum=0.9, weight_decay=1e-4, max_steps=24,
                          schedule="constant"),
        engine=EngineConfig(precision="fp32", zero_stage=0, sync_bn=True),
        checkpoint=CheckpointConfig(every_steps=8, keep_last=2),
        log_every=4,
    )


@recipe
def digits_demo() -> TrainConfig:
    """The demo: MS-ResNet-20 (widths 16-32-64) on the real handwritten digits at 16 px, T = 2, bf16,
    2 ranks x 16 images. Blocks start non-identity (last BN gamma 0.5), which learns these few steps
    much faster than the zero init. Reaches >= 95 % test accuracy (the models issue's digits figure)
    in 6 epochs on 2 CPU ranks.

    Where a CPU lacks AVX-512, PyTorch has no oneDNN bf16 convolution (torch.ops.mkldnn.
    _is_mkldnn_bf16_supported() is False) and runs bf16 on its reference kernels: on an AMD EPYC with AVX2,
    one rank trained this recipe at 37 img/s in bf16 and 242 img/s with engine.precision=fp32. It stays bf16,
    the GPU recipes' precision: one fp32 run of it reached 93.3 %, under the 95 % it is tested for."""
    return TrainConfig(
        model=ModelConfig(name="ms_resnet20", num_classes=10, T=2, kwargs={"last_bn_gamma0": 0.5}),
        data=DataConfig(dataset="digits", format="wds", path="data/digits16", batch_size=16, num_workers=1,
                        image_size=16),
        optim=OptimConfig(global_batch=32, lr=0.2, momentum=0.9, weight_decay=1e-4, epochs=6,
                          schedule="cosine"),
        engine=EngineConfig(precision="bf16", zero_stage=0, sync_bn=True),
        checkpoint=CheckpointConfig(every_steps=0, keep_last=2),
        log_every=42,
    )
