"""Shared helpers of the trainer tests: real digits shards and real multi-rank spawning.

Ranks are spawned with torch.multiprocessing ('spawn'), talk over gloo on 127.0.0.1 and each run one
thread, like `OMP_NUM_THREADS=1 torchrun --nproc_per_node N`.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from trainer.config import TrainConfig, apply_overrides
from trainer.distributed import free_port
from trainer.recipes import get_recipe


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
    With join=False the torch.multiprocessing context is returned (call .join() until it is True)."""
    env = {"OMP_NUM_THREADS": "1", **(env or {})}
    return mp.start_processes(_entry, args=(fn, world, free_port(), args, env), nprocs=world,
                              start_method="spawn", join=join)


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
