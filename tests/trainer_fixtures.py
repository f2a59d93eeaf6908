"""Shared helpers of the trainer tests: real digits shards and real multi-rank spawning.

Ranks are spawned with torch.multiprocessing ('spawn'), talk over gloo on 127.0.0.1 and each run one
thread, like `OMP_NUM_THREADS=1 torchrun --nproc_per_node N`.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from trainer.config import TrainConfig, apply_overrides
from trainer.distributed import free_port
from trainer.recipes import get_recipe


@contextlib.contextmanager
def poisoned_forward(n: int, how: str = "loss"):
    """Fault injection for tests, outside the product: the `n`-th training forward of the network in this
    process (from 1, counted over the whole run, once) gets a NaN. how="loss": its output, so the loss and
    every gradient; "grads": only the gradient flowing back into its output (the loss stays finite);
    "input": its input, so BatchNorm's running statistics too."""
    from models import SpikingResNet

    seen = {"forwards": 0, "poisoned": 0}

    def due(module) -> bool:
        return (isinstance(module, SpikingResNet) and torch.is_grad_enabled() and seen["forwards"] == n
                and not seen["poisoned"])

    def before(module, args):
        if isinstance(module, SpikingResNet) and torch.is_grad_enabled():
            seen["forwards"] += 1
            if how == "input" and due(module):
                seen["poisoned"] += 1
                return (args[0] * float("nan"), *args[1:])
        return None

    def after(module, args, output):
        if how == "input" or not due(module):
            return None
        seen["poisoned"] += 1
        if how == "loss":
            return output * float("nan")
        output.register_hook(lambda grad: grad * float("nan"))
        return None

    handles = [torch.nn.modules.module.register_module_forward_pre_hook(before),
               torch.nn.modules.module.register_module_forward_hook(after)]
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


def digits_shards(tmp_path_factory) -> Path:
    """16 px digits converted once per test session with the real converter CLI entry point."""
    out = tmp_path_factory.getbasetemp() / "trainer_digits16"
    if not (out / "test" / "manifest.json").is_file():
        from dataloaders.convert import main as convert

        convert(["digits", "--out", str(out), "--format", "wds", "--size", "16", "--workers", "1"])
    return out


def tiny_config(data: Path, run_dir: Path, *overrides: str) -> TrainConfig:
    cfg = get_recipe("digits_tiny")
    apply_overrides(cfg, [f"data.path={data}", f"run_dir={run_dir}", "mlflow.enabled=false", *overrides])
    return cfg


def _entry(rank: int, fn, world: int, port: int, args: tuple, env: dict[str, str]) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), **env)
    torch.set_num_threads(1)
    fn(rank, *args)
    sys.stdout.flush()
    sys.stderr.flush()
    if dist.is_initialized():
        dist.destroy_process_group()
    # Same exit as the trainer CLI: DeepSpeed processes sometimes abort in interpreter teardown.
    os._exit(0)


def spawn(fn, world: int, *args, env: dict[str, str] | None = None, join: bool = True):
    """Run fn(rank, *args) on `world` fresh processes forming one gloo group; raises if any rank fails.
    With join=False the torch.multiprocessing context is returned (call .join() until it is True).

    The group's store port is picked free here and bound by rank 0 later, so another process can take it
    in between: with join=True a store that fails on EADDRINUSE is started again on another port."""
    env = {"OMP_NUM_THREADS": "1", **(env or {})}
    for attempt in range(3):
        try:
            return mp.start_processes(_entry, args=(fn, world, free_port(), args, env), nprocs=world,
                                      start_method="spawn", join=join)
        except mp.ProcessRaisedException as e:
            if "EADDRINUSE" not in str(e) or attempt == 2:
                raise
            print(f"spawn: the store's port was taken before rank 0 bound it; again on another ({e})")


def start_on_free_port(start, ready, timeout: float = 120.0) -> tuple[subprocess.Popen, int]:
    """(process, port) of `start(port)` on a port picked free, once `ready(port)`. A server in another
    process cannot be handed the port held, so another process may take it between the pick and the
    server's bind (EADDRINUSE): a server that exits before it is ready is started again on another port."""
    for _ in range(3):
        port = free_port()
        proc = start(port)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ready(port):
                return proc, port
            if proc.poll() is not None:
                print(f"start_on_free_port: the server on port {port} exited ({proc.returncode}); another port")
                break
            time.sleep(0.5)
        else:
            proc.kill()
            raise TimeoutError(f"the server on port {port} was not ready within {timeout:.0f} s")
    raise RuntimeError("three servers in a row exited before they were ready")


def save_results(out: Path, rank: int, results: dict) -> None:
    """A spawned worker's findings, for the test process (see spawn_results)."""
    (out / f"results{rank}.json").write_text(json.dumps(results, default=str))


def spawn_results(fn, world: int, tmp_path_factory, name: str) -> tuple[Path, list[dict]]:
    """Run fn(rank, digits shards, out) on `world` spawned ranks, each ending with save_results(out, rank,
    ...): the expensive runs happen once per test module, the tests then read what each rank saw."""
    data = digits_shards(tmp_path_factory)
    out = tmp_path_factory.mktemp(name)
    spawn(fn, world, data, out)
    return out, [json.loads((out / f"results{r}.json").read_text()) for r in range(world)]
