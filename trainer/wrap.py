"""The one step that turns a single-device model into a training engine, in a fixed order:

SyncBN conversion -> activation checkpointing (residual blocks or segments of them) -> optional compile ->
deepspeed.initialize with SGD and the learning-rate schedule -> optional channels_last layout.

Model code never knows about any of this.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
from contextlib import contextmanager
from typing import Any

import deepspeed
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed import _functional_collectives as funcol
from torch.utils.checkpoint import checkpoint

from models.layout import use_channels_last
from models.protocol import SpikingNetwork
from trainer.batch_setting import BatchSetting
from trainer.config import OptimConfig, TrainConfig


class CpuSyncBatchNorm(nn.BatchNorm2d):
    """tdBN statistics over all ranks on CPU (torch's SyncBatchNorm only accepts accelerator tensors).

    Sums and sums of squares are all-reduced with torch's differentiable functional collective, so the
    backward pass also sums the statistics' gradients over ranks, as torch's SyncBatchNorm does.
    Statistics are computed in fp32 whatever the autocast dtype of the input.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        xf = x.float()
        c = x.shape[1]
        local = torch.cat([xf.sum((0, 2, 3)), (xf * xf).sum((0, 2, 3)), xf.new_full((1,), x.numel() // c)])
        total = funcol.all_reduce(local, "sum", dist.group.WORLD)
        n = total[-1]
        mean = total[:c] / n
        var = (total[c:2 * c] / n - mean * mean).clamp_min(0.0)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.lerp_(mean.detach(), m)
                self.running_var.lerp_(var.detach() * n / (n - 1), m)
        scale = torch.rsqrt(var + self.eps) * self.weight
        y = (xf - mean.view(1, c, 1, 1)) * scale.view(1, c, 1, 1) + self.bias.view(1, c, 1, 1)
        return y.to(x.dtype)


def convert_sync_batchnorm(model: nn.Module, on_gpu: bool) -> nn.Module:
    """SyncBN for every BatchNorm2d (tdBN), as the authors trained. Done before deepspeed.initialize."""
    if on_gpu:
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)

    def convert(module: nn.Module) -> nn.Module:
        if type(module) is nn.BatchNorm2d:
            new = CpuSyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                                   module.track_running_stats)
            new.load_state_dict(module.state_dict())
            new.train(module.training)
            return new
        for name, child in module.named_children():
            module.add_module(name, convert(child))
        return module

    return convert(model)


@contextmanager
def _frozen_bn_stats(module: nn.Module):
    """BN in training mode that normalises with batch statistics but leaves its buffers unchanged.

    BN must still receive its running-stat buffers (autograd checks that the recomputation saves the
    same tensors as the forward did), so the update is made a no-op instead: momentum 0 keeps
    running_mean/var bit-identical, and the batch counter is put back afterwards.
    """
    bns = [m for m in module.modules()
           if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    saved = [(bn.momentum, bn.num_batches_tracked.clone()) for bn in bns]
    for bn in bns:
        bn.momentum = 0.0
    try:
        yield
    finally:
        for bn, (momentum, count) in zip(bns, saved):
            bn.momentum = momentum
            bn.num_batches_tracked.copy_(count)


def _checkpoint_segment(blocks: list[nn.Module], x: torch.Tensor) -> torch.Tensor:
    """Run consecutive residual blocks under one checkpoint over the whole [T, N, C, H, W] sequence.

    The LIF neurons keep their membrane as a local variable, so the recomputation in backward starts
    from the same zero state and reproduces the forward exactly. BatchNorm is the one module with
    state: the recomputation must normalise with the same batch statistics but must not move the
    running statistics a second time, so every call after the first runs BN with its buffers frozen.
    """
    calls = 0

    def run(h: torch.Tensor) -> torch.Tensor:
        nonlocal calls
        calls += 1
        for block in blocks:
            if calls == 1:
                h = block(h)
            else:
                with _frozen_bn_stats(block):
                    h = block(h)
        return h

    return checkpoint(run, x, use_reentrant=False)


def _forward_with_checkpoints(model: SpikingNetwork, x: torch.Tensor, segments: tuple) -> torch.Tensor:
    """`segments`: (first block, block after the last, checkpointed?) of each run of consecutive blocks."""
    h = model.stem_forward(x)
    recompute = model.training and torch.is_grad_enabled()
    for start, stop, checkpointed in segments:
        blocks = [model.blocks[i] for i in range(start, stop)]
        if checkpointed and recompute:
            h = _checkpoint_segment(blocks, h)
        else:
            for block in blocks:
                h = block(h)
    return model.head_forward(h)


def apply_activation_checkpointing(model: SpikingNetwork, every: int, segment: int = 1) -> int:
    """Checkpoint residual blocks over their whole time sequence; returns how many blocks are covered.

    `model.blocks` is cut into segments of `segment` consecutive blocks, and every `every`-th segment
    (the first included) is checkpointed as one unit: only its input is kept, and backward recomputes
    the whole segment. segment=1, every=1 checkpoints each block; every=k alone checkpoints one block in
    k (less recomputation, more memory); longer segments keep fewer inputs but recompute more at once.
    The model's modules and parameter names are untouched (only its forward is replaced), so
    checkpoints written with and without activation checkpointing are interchangeable.
    """
    if every <= 0:
        return 0
    if segment < 1:
        raise ValueError(f"engine.activation_checkpointing_segment must be >= 1, got {segment}")
    n = len(model.blocks)
    segments = tuple((i, min(i + segment, n), (i // segment) % every == 0) for i in range(0, n, segment))
    # A method bound to the model, so that copy.deepcopy(model) rebinds it to the copy.
    model.forward = types.MethodType(functools.partial(_forward_with_checkpoints, segments=segments), model)
    return sum(stop - start for start, stop, checkpointed in segments if checkpointed)


def lr_lambda(optim: OptimConfig, total_steps: int, steps_per_epoch: int):
    """Multiplier of optim.lr at optimizer step `step`: linear warm-up, then cosine to 0 (or constant).

    The authors step the cosine once per epoch; stepping it every optimizer step follows the same
    curve without the staircase and stays correct when an epoch's step count changes.
    """
    if optim.schedule not in ("cosine", "constant"):
        raise ValueError(f"optim.schedule must be 'cosine' or 'constant', got {optim.schedule!r}")
    warmup = int(round(optim.warmup_epochs * steps_per_epoch))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if optim.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def wrap(model: nn.Module, cfg: TrainConfig, ds_config: dict[str, Any], batch: BatchSetting, total_steps: int,
         steps_per_epoch: int, on_gpu: bool) -> deepspeed.DeepSpeedEngine:
    world = dist.get_world_size() if dist.is_initialized() else 1
    if cfg.engine.sync_bn and world > 1:
        model = convert_sync_batchnorm(model, on_gpu)
    apply_activation_checkpointing(model, cfg.engine.activation_checkpointing,
                                   cfg.engine.activation_checkpointing_segment)
    if on_gpu:
        model = model.cuda()
    if cfg.engine.compile:
        model.compile()  # in place: parameter names stay those of the plain model
    o = dataclasses.replace(cfg.optim, lr=batch.lr, warmup_epochs=batch.warmup_epochs)
    optimizer = torch.optim.SGD(model.parameters(), lr=o.lr, momentum=o.momentum, nesterov=o.nesterov,
                                weight_decay=o.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(o, total_steps, steps_per_epoch))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=ds_config)
    if cfg.engine.channels_last:
        # After initialize: its start-up broadcast views every parameter as bytes, which an NHWC weight refuses.
        # From ZeRO stage 1 on the parameters are views into DeepSpeed's flat (NCHW) buffers and stay so; the NHWC
        # input alone then sets the conv layout (oneDNN and cuDNN run NHWC when the input or the weight is).
        # A compiled model traces on its first call, after this.
        use_channels_last(model, weights=cfg.engine.zero_stage == 0)
    return engine
