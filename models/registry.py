"""Model registry: `create_model("ms_resnet104", T=6)`, `list_models("ms_*")`.

Each factory is a one-liner naming what the paper's model is (depth, widths, strides, stem, shortcut);
everything else (T, neuron constants, classes, dropout) is a constructor argument.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable

from models.resnet import SpikingResNet

_REGISTRY: dict[str, Callable[..., SpikingResNet]] = {}

IMAGENET_LAYERS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 104: (3, 8, 32, 8)}
CIFAR_DEPTHS = (20, 32, 44, 56, 110, 482)  # 6n + 2


def register_model(name: str, factory: Callable[..., SpikingResNet]) -> None:
    if name in _REGISTRY:
        raise ValueError(f"model {name!r} registered twice")
    _REGISTRY[name] = factory


def list_models(pattern: str = "*") -> list[str]:
    return sorted(n for n in _REGISTRY if fnmatch.fnmatch(n, pattern))


def create_model(name: str, **kwargs) -> SpikingResNet:
    """Build a registered model. kwargs: num_classes, T, decay, v_th, lens, dropout, in_channels,
    last_bn_gamma0, and for the CIFAR family widths=(16, 32, 64)."""
    if name not in _REGISTRY:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(list_models())}")
    return _REGISTRY[name](**kwargs)


FAMILIES = {"ms": "ms_resnet", "spiking": "spiking_resnet", "sew": "sew_resnet"}
"""Block family -> model-name prefix (`ms_resnet104`, `sew_resnet20_dvs`, ...)."""


def _imagenet(family: str, depth: int, **kw) -> SpikingResNet:
    # Stage 1 is strided because the stem's max-pool is never applied in the authors' code (docs/model.md §5).
    kw.setdefault("num_classes", 1000)
    if depth == 104:
        kw.setdefault("dropout", 0.2)
        stem, shortcut = "3conv", "pool"
    else:
        stem, shortcut = "7x7", "conv"
    return SpikingResNet(family, IMAGENET_LAYERS[depth], (64, 128, 256, 512), (2, 2, 2, 2), stem, shortcut, **kw)


def _cifar(family: str, depth: int, widths=(16, 32, 64), strides=(1, 2, 2), **kw) -> SpikingResNet:
    n = (depth - 2) // 6
    kw.setdefault("num_classes", 10)
    return SpikingResNet(family, (n, n, n), widths, strides, "3x3", "pool", **kw)


def _cifar_dvs(family: str, depth: int, **kw) -> SpikingResNet:
    # CIFAR10-DVS: 2 polarity channels, 128x128 frames, stride 2 added to the first stage (docs/model.md §5).
    kw.setdefault("in_channels", 2)
    return _cifar(family, depth, strides=(2, 2, 2), **kw)


def _register_all() -> None:
    def bind(builder, family, depth):
        return lambda **kw: builder(family, depth, **kw)

    for family, prefix in FAMILIES.items():
        for depth in IMAGENET_LAYERS:
            if family == "ms" or depth != 104:
                register_model(f"{prefix}{depth}", bind(_imagenet, family, depth))
        for depth in CIFAR_DEPTHS:
            register_model(f"{prefix}{depth}", bind(_cifar, family, depth))
        register_model(f"{prefix}20_dvs", bind(_cifar_dvs, family, 20))


_register_all()
