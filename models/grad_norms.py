"""Gradient norm at every residual block input, recorded during the normal backward (docs/model.md §8.4).

    grad_norms = BlockGradNorms(model)              # once; model may be DDP- or DeepSpeed-wrapped
    with grad_norms:                                # only on logging steps; nothing is hooked outside
        loss = criterion(model(x), y)
        loss.backward()                             # or engine.backward(loss)
    mlflow.log_metrics(grad_norms.metrics(), step=step)

x_b is what flows into block b: the membrane sum for MS-ResNet, spikes for the vanilla family, spike
counts for SEW. A forward pre-hook puts a tensor hook on x_b; autograd calls it with the full dL/dx_b
during the backward that happens anyway, and the hook only takes its norm (kept on the device, read
in `metrics()` with one sync). With spiking blocks dL/dx_b is the surrogate gradient, which is what
training sees. Several backward passes inside one `with` (gradient accumulation) are averaged.
Each rank sees the gradient of its own micro-batch loss, before any all-reduce, and any factor the
caller puts on the loss (accumulation 1/k, an fp16 loss scale) is in the norm: pass it to `metrics`.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import nn

from models.hooks import HookContext
from models.protocol import SpikingNetwork


def unwrap(model: nn.Module) -> SpikingNetwork:
    """The spiking network inside DDP / DeepSpeed engines / torch.compile wrappers."""
    inner = model
    while not isinstance(inner, SpikingNetwork):
        nxt = next((getattr(inner, a) for a in ("module", "_orig_mod") if hasattr(inner, a)), None)
        if not isinstance(nxt, nn.Module):
            raise TypeError(f"{type(model).__name__} is no SpikingNetwork (expected a SpikingResNet, "
                            "possibly wrapped in DDP / DeepSpeed / torch.compile)")
        inner = nxt
    return inner


class BlockGradNorms(HookContext):
    def __init__(self, model: nn.Module):
        net = unwrap(model)
        self.blocks: nn.ModuleList = net.blocks
        self.block_stage: list[int] = list(net.block_stage)
        super().__init__()
        self._norms: dict[int, list[torch.Tensor]] = defaultdict(list)

    def __enter__(self) -> BlockGradNorms:
        self._norms.clear()
        for b, block in enumerate(self.blocks):
            self._handles.append(block.register_forward_pre_hook(self._hook_input(b)))
        return self

    def _hook_input(self, b: int):
        def record(grad: torch.Tensor) -> None:
            self._norms[b].append(torch.linalg.vector_norm(grad.detach(), dtype=torch.float32))

        def pre_hook(module, args) -> None:
            x = args[0]
            if torch.is_grad_enabled() and x.requires_grad:
                self._handles.append(x.register_hook(record))
        return pre_hook

    def block_norms(self, loss_scale: float = 1.0) -> list[float]:
        """||dL/dx_b|| per block (mean over the backward passes seen), divided by loss_scale."""
        if loss_scale <= 0:
            raise ValueError(f"loss_scale must be > 0, got {loss_scale}")
        missing = [b for b in range(len(self.blocks)) if not self._norms.get(b)]
        if missing:
            raise RuntimeError(f"no gradient reached the input of blocks {missing[:5]}: run forward and "
                               "backward inside `with BlockGradNorms(model):`")
        means = torch.stack([torch.stack(self._norms[b]).mean() for b in range(len(self.blocks))])
        return [v / loss_scale for v in means.tolist()]

    def metrics(self, loss_scale: float = 1.0) -> dict[str, float]:
        """MLflow metrics: grad/norm_block_{b} (b = index in model.blocks, from 0), grad/norm_stage_{k}
        (mean over the blocks of stage k, from 1 like spikes/rate_stage{k}), grad/norm_first_over_last."""
        norms = self.block_norms(loss_scale)
        out = {f"grad/norm_block_{b}": v for b, v in enumerate(norms)}
        per_stage: dict[int, list[float]] = defaultdict(list)
        for v, stage in zip(norms, self.block_stage):
            per_stage[stage].append(v)
        for stage, vs in sorted(per_stage.items()):
            out[f"grad/norm_stage_{stage + 1}"] = sum(vs) / len(vs)
        out["grad/norm_first_over_last"] = norms[0] / norms[-1] if norms[-1] > 0 else float("inf")
        return out
