"""Process-group start-up, seeding and RNG state: what every rank does the same way before training."""

from __future__ import annotations

import logging
import os
import random
import socket
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


GPU_BACKEND = "cpu:gloo,cuda:nccl"
"""With GPUs, CUDA tensors reduce over NCCL and CPU tensors over gloo: an NCCL-only group fails on the first
CPU tensor ("No backend type associated with device type cpu")."""


def process_group_backend(on_gpu: bool, configured: str = "") -> str:
    """The torch.distributed backend string of a run (`engine.backend`, else per device); the trainer's
    own group and the one Ray Train makes for it use the same."""
    return configured or (GPU_BACKEND if on_gpu else "gloo")


def init_distributed(backend: str) -> tuple[int, int, torch.device]:
    """Join the process group the launcher made (torchrun's environment, or Ray's group), or make a world
    of one; returns (rank, world size, this rank's device)."""
    import deepspeed  # not at import time: the launchers use `process_group_backend` without it

    if not dist.is_initialized() and "RANK" not in os.environ:
        # A plain `python -m trainer.train`: a world of one. Port 0: its store binds whatever port the OS
        # gives it. A port picked free beforehand can be taken before the store binds it (EADDRINUSE next to
        # a running Ray cluster, seen in CI), and no other rank needs to know it.
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="0")
    on_gpu = torch.cuda.is_available()
    deepspeed.init_distributed(dist_backend=process_group_backend(on_gpu, backend))
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
    """This rank's streams, as tensors and plain values so checkpoints load weights-only. CUDA: only this
    rank's device's generator (`torch.cuda.current_device()`, which init_distributed sets), not every visible
    GPU's: under torchrun each rank sees all of a node's GPUs, under Ray one, so a list indexed by device would
    restore the wrong stream on a resume where the rank lands on another device index."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    numpy_state = {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                   "has_gauss": int(has_gauss), "gauss": float(gauss)}
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available():
        cuda = state.get("cuda")
        if cuda is None:  # written without a GPU: the CUDA stream keeps the seed `seed_all` gave it
            log.warning("the checkpoint holds no CUDA RNG state for device %d; CUDA random streams (dropout) "
                        "restart from the run's seed", torch.cuda.current_device())
        else:
            torch.cuda.set_rng_state(cuda)
