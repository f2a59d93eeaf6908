"""What the two hook-based monitors (`stats.SpikeMonitor`, `grad_norms.BlockGradNorms`) share: a `with`
block that owns the hooks it registers and removes every one of them on exit, so a model leaves the block
as it entered it."""

from __future__ import annotations


class HookContext:
    def __init__(self):
        self._handles: list = []  # module hooks, and tensor hooks registered during the block

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
