"""Every collective's tensors sit on the training device, which the process group has a backend for.

An NCCL group has no backend for CPU tensors: on GPUs, a count kept on the CPU fails the first evaluation
("No backend type associated with device type cpu"). There is no GPU here, so the tests record every
torch.distributed collective of real 2-rank gloo runs (DeepSpeed's own go through the same functions):
- the whole trainer (ZeRO 2, training, logging, checkpoints, evaluation): each tensor on the trainer's
  device, and that device type in the group's backend map;
- evaluation with torch's default device moved off the training device ("meta"): a tensor made without
  naming the training device lands there, which is what an NCCL-only group refuses.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from trainer_fixtures import digits_shards, spawn, tiny_config

from trainer.distributed import GPU_BACKEND, process_group_backend

COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter", "reduce_scatter_tensor",
               "broadcast", "reduce", "all_to_all_single")


def record_collectives() -> list[tuple[str, list[str]]]:
    """Wrap this process's torch.distributed collectives; each call appends (name, its tensors' devices)."""
    calls: list[tuple[str, list[str]]] = []

    def recorded(name, fn):
        def wrapped(*args, **kwargs):
            items = [x for a in (*args, *kwargs.values()) for x in (a if isinstance(a, list | tuple) else [a])]
            calls.append((name, sorted({str(t.device.type) for t in items if isinstance(t, torch.Tensor)})))
            return fn(*args, **kwargs)

        return wrapped

    for name in COLLECTIVES:
        setattr(dist, name, recorded(name, getattr(dist, name)))
    return calls


def backend_map() -> dict[str, str]:
    """The default group's backend per device type, e.g. {'cpu': 'gloo', 'cuda': 'nccl'}."""
    return dict(item.split(":") for item in str(dist.get_backend_config()).split(","))


def _trainer_worker(rank: int, data: Path, out: Path) -> None:
    calls = record_collectives()
    from trainer.trainer import Trainer

    cfg = tiny_config(data, out / "run", "optim.max_steps=4", "log_every=2", "checkpoint.every_steps=2",
                      "engine.zero_stage=2")
    trainer = Trainer(cfg)
    result = trainer.fit()
    if rank == 0:
        (out / "trainer.json").write_text(json.dumps({"calls": calls, "backends": backend_map(),
                                                      "device": trainer.device.type, "result": result}))


def _evaluate_worker(rank: int, data: Path, out: Path) -> None:
    from dataloaders import build_loader
    from dataloaders.loader import InMemory
    from trainer.evaluate import evaluate

    dist.init_process_group("gloo")
    cfg = tiny_config(data, out / "unused")
    model = cfg.model.build()
    loader = build_loader(cfg.data, "val", rank, 2)
    batches = InMemory(list(loader)[:2])  # real batches, on the CPU
    calls = record_collectives()
    torch.set_default_device("meta")  # stands in for "not the training device"
    try:
        metrics, error = evaluate(model, batches, torch.device("cpu")), None
    except Exception as e:  # main's evaluate: gloo refuses the meta tensor after it was recorded
        metrics, error = None, f"{type(e).__name__}: {e}"
    finally:
        torch.set_default_device(None)
    if rank == 0:
        (out / "evaluate.json").write_text(json.dumps({"calls": calls, "metrics": metrics, "error": error}))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return digits_shards(tmp_path_factory)


def test_the_gpu_backend_string_serves_cpu_and_cuda_tensors():
    assert process_group_backend(on_gpu=True) == GPU_BACKEND == "cpu:gloo,cuda:nccl"
    assert process_group_backend(on_gpu=False) == "gloo"
    assert process_group_backend(on_gpu=True, configured="nccl") == "nccl"  # engine.backend wins


def test_evaluation_reduces_on_the_training_device(data, tmp_path):
    spawn(_evaluate_worker, 2, data, tmp_path)
    got = json.loads((tmp_path / "evaluate.json").read_text())
    assert got["error"] is None, got["error"]
    assert got["calls"] and all(devices == ["cpu"] for _, devices in got["calls"]), got["calls"]
    assert got["metrics"]["val/samples"] > 0


@pytest.mark.slow
def test_every_collective_of_a_training_run_is_on_the_training_device(data, tmp_path):
    spawn(_trainer_worker, 2, data, tmp_path)
    got = json.loads((tmp_path / "trainer.json").read_text())
    names = {name for name, _ in got["calls"]}
    assert {"all_reduce", "broadcast"} <= names, names  # metrics/evaluation, DeepSpeed's parameter sync
    assert got["device"] == "cpu" and got["result"]["step"] == 4 and "val/top1" in got["result"]
    off_device = [(name, devices) for name, devices in got["calls"] if devices != [got["device"]]]
    assert not off_device
    assert got["backends"]["cpu"] == "gloo"
