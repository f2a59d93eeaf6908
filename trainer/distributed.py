"""Process-group start-up, seeding and RNG state: what every rank does the same way before training."""

from __future__ import annotations

import os
import random
import socket
from typing import Any

import deepspeed
import numpy as np
import torch
import torch.distributed as dist


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(backend: str) -> tuple[int, int, torch.device]:
    """Join the process group the launcher made (torchrun's environment, or Ray's group), or make a world
    of one; returns (rank, world size, this rank's device)."""
    if not dist.is_initialized() and "RANK" not in os.environ:
        # A plain `python -m trainer.train`: a world of one.
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))
    on_gpu = torch.cuda.is_available()
    deepspeed.init_distributed(dist_backend=backend or ("nccl" if on_gpu else "gloo"))
    device = torch.device("cpu")
    if on_gpu:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    return dist.get_rank(), dist.get_world_size(), device


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rank_seed(seed: int, rank: int, step: int = 0) -> int:
    """This rank's stream (dropout): distinct per rank, and per resume step when the streams of another
    world size cannot be continued."""
    return seed + 1 + rank + 7919 * step


def rng_state() -> dict[str, Any]:
    """Every RNG stream of this process as tensors and plain values, so checkpoints load weights-only."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    numpy_state = {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                   "has_gauss": int(has_gauss), "gauss": float(gauss)}
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
