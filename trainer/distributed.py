"""Process-group start-up, seeding and RNG state: what every rank does the same way before training."""

from __future__ import annotations

import logging
import os
import random
import socket
from pathlib import Path
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


class DeviceError(RuntimeError):
    """A run asked for a device this process cannot use; the message is one line naming what it found."""


def cuda_found() -> str:
    """What this process finds of CUDA, in one line: the driver, torch's CUDA build, the visible GPUs."""
    try:
        driver = Path("/proc/driver/nvidia/version").read_text().splitlines()[0].split("Kernel Module")[-1]
        driver = f"NVIDIA driver {driver.split()[0]}" if driver.split() else "an NVIDIA driver"
    except (OSError, IndexError):
        driver = "no NVIDIA driver (/proc/driver/nvidia/version absent)"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return (f"{driver}, torch {torch.__version__} built for CUDA {torch.version.cuda or 'none (CPU-only build)'}, "
            f"{torch.cuda.device_count()} GPU(s) usable, CUDA_VISIBLE_DEVICES="
            f"{'unset' if visible is None else repr(visible)}")


def select_device(requested: str, local_rank: int) -> torch.device:
    """This rank's training device from `engine.device`: 'auto' (GPU `local_rank` where torch finds GPUs,
    else the CPU), 'cpu', 'cuda' (GPU `local_rank`) or 'cuda:K' (Ray Train's assignment, see
    launch.common.train_loop). A run that asked for a GPU it cannot have stops here: on a node whose driver is
    too old for torch's CUDA build, `torch.cuda.is_available()` is False and the run would otherwise train on
    the CPU over gloo without a word."""
    if requested == "cpu":
        return torch.device("cpu")
    gpus = torch.cuda.device_count()
    if requested == "auto" and gpus == 0:
        return torch.device("cpu")
    device = torch.device(requested if requested.startswith("cuda:") else f"cuda:{local_rank}")
    if device.index >= gpus:
        raise DeviceError(f"engine.device={requested} needs GPU {device.index} (local rank {local_rank}) but this "
                          f"process finds {cuda_found()}")
    accelerator = os.environ.get("DS_ACCELERATOR", "")
    if accelerator not in ("", "cuda"):
        raise DeviceError(f"DS_ACCELERATOR is {accelerator!r} on a node that trains on {device}: DeepSpeed would keep "
                          "the model on its own accelerator while the batches are CUDA tensors; unset it")
    return device


def init_distributed(backend: str, device: str = "auto", cudnn_benchmark: bool = True) -> tuple[int, int,
                                                                                                  torch.device]:
    """Pick this rank's device (`select_device`, before any collective, so a rank without its GPU stops
    alone and at once), then join the process group the launcher made (torchrun's environment, or Ray's
    group), or make a world of one; returns (rank, world size, this rank's device)."""
    import deepspeed  # not at import time: the launchers use `process_group_backend` without it

    if not dist.is_initialized() and "RANK" not in os.environ:
        # A plain `python -m trainer.train`: a world of one. Port 0: its store binds whatever port the OS
        # gives it. A port picked free beforehand can be taken before the store binds it (EADDRINUSE next to
        # a running Ray cluster, seen in CI), and no other rank needs to know it.
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="0")
    chosen = select_device(device, int(os.environ.get("LOCAL_RANK", 0)))
    on_gpu = chosen.type == "cuda"
    if on_gpu:
        torch.cuda.set_device(chosen)
        # Training shapes are fixed, so cuDNN's autotuned algorithms pay off from the second step; off for
        # runs that must repeat bit for bit (the autotuner may pick another algorithm in another process).
        torch.backends.cudnn.benchmark = cudnn_benchmark
    deepspeed.init_distributed(dist_backend=process_group_backend(on_gpu, backend))
    return dist.get_rank(), dist.get_world_size(), chosen


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
