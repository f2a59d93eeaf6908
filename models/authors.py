"""Load weights saved by the authors' released ImageNet code (Ariande1/MS-ResNet, docs/model.md §6).

Their layout: `conv1.<i>` is the stem Sequential (convs, then tdBN wrapped as `conv1.<n>.bn.*`);
block j of stage s is `conv{s+2}_x.<j>` with `residual_function.{1,4}` the convs, `.{2,5}.bn` the BNs,
and `shortcut.{0,1}` (18/34: conv, BN) or `shortcut.{1,2}` (104: index 0 is the AvgPool). Checkpoints
saved from DDP carry a `module.` prefix, which is stripped.
"""

from __future__ import annotations

import torch

from models.blocks import MSBlock, Shortcut
from models.resnet import SpikingResNet

_BN_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def _key_map(model: SpikingResNet) -> dict[str, str]:
    """Our state-dict key -> the authors' key."""
    if model.family != "ms" or len(model.stem_convs) == 1 and model.stem_convs[0].kernel_size != (7, 7):
        raise ValueError("the authors' released layout exists only for MS-ResNet-18/34/104 (ImageNet)")
    m: dict[str, str] = {}
    n_stem = len(model.stem_convs)
    for i, conv in enumerate(model.stem_convs):
        for p in ("weight", "bias") if conv.bias is not None else ("weight",):
            m[f"stem_convs.{i}.{p}"] = f"conv1.{i}.{p}"
    for k in _BN_KEYS:
        m[f"stem_bn.{k}"] = f"conv1.{n_stem}.bn.{k}"
    index_in_stage: dict[int, int] = {}
    for b, (block, stage) in enumerate(zip(model.blocks, model.block_stage)):
        assert isinstance(block, MSBlock)
        j = index_in_stage[stage] = index_in_stage.get(stage, -1) + 1
        theirs = f"conv{stage + 2}_x.{j}"
        m[f"blocks.{b}.conv1.weight"] = f"{theirs}.residual_function.1.weight"
        m[f"blocks.{b}.conv2.weight"] = f"{theirs}.residual_function.4.weight"
        for k in _BN_KEYS:
            m[f"blocks.{b}.bn1.{k}"] = f"{theirs}.residual_function.2.bn.{k}"
            m[f"blocks.{b}.bn2.{k}"] = f"{theirs}.residual_function.5.bn.{k}"
        if isinstance(block.shortcut, Shortcut):
            first = 1 if block.shortcut.kind == "pool" else 0
            m[f"blocks.{b}.shortcut.conv.weight"] = f"{theirs}.shortcut.{first}.weight"
            for k in _BN_KEYS:
                m[f"blocks.{b}.shortcut.bn.{k}"] = f"{theirs}.shortcut.{first + 1}.bn.{k}"
    m["fc.weight"], m["fc.bias"] = "fc.weight", "fc.bias"
    return m


def load_authors_checkpoint(model: SpikingResNet, state_dict: dict[str, torch.Tensor]) -> SpikingResNet:
    """Load an authors'-layout state dict into our MS-ResNet-18/34/104; every key must match."""
    theirs = {k.removeprefix("module."): v for k, v in state_dict.items()}
    mapping = _key_map(model)
    missing = sorted(v for v in mapping.values() if v not in theirs)
    unexpected = sorted(set(theirs) - set(mapping.values()))
    if missing or unexpected:
        raise KeyError(f"authors' checkpoint does not match {type(model).__name__} "
                       f"({len(model.blocks)} blocks): missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                       f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
    model.load_state_dict({ours: theirs[a] for ours, a in mapping.items()}, strict=True)
    return model


def to_authors_state_dict(model: SpikingResNet) -> dict[str, torch.Tensor]:
    """Our weights in the authors' layout (e.g. to evaluate them with the authors' test.py)."""
    ours = model.state_dict()
    return {a: ours[k] for k, a in _key_map(model).items()}
