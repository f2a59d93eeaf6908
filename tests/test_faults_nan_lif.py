"""A NaN that enters the network in front of a LIF reaches the loss, and the trainer's non-finite guard stops
the run (a real Trainer: DeepSpeed engine on gloo, digits shards).

The NaN is put into one element of one LIF's input in the third training forward, by a global forward
pre-hook: the LIF's argument is replaced, the membrane shortcut around it stays finite, so only the neuron
can carry the NaN on (models.neuron: a NaN membrane emits NaN spikes, where the comparison u > v_th alone
would emit silence and the step would train on as if nothing happened).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from trainer_fixtures import save_results, spawn_results, tiny_config

pytestmark = pytest.mark.slow

POISONED_FORWARD = 3  # 1 rank x micro 16, global 32: forwards 3 and 4 are optimizer step 2


def _worker(rank: int, data: Path, out: Path) -> None:
    import torch

    from models import LIF, SpikingResNet
    from trainer.health import NonFiniteError
    from trainer.train import train

    seen = {"forwards": 0, "poisoned": 0}

    def poison(module, args):
        if isinstance(module, SpikingResNet) and torch.is_grad_enabled():
            seen["forwards"] += 1
        elif isinstance(module, LIF) and seen["forwards"] == POISONED_FORWARD and not seen["poisoned"]:
            seen["poisoned"] += 1
            x = args[0].clone()
            x.view(-1)[x.numel() // 2] = float("nan")
            return (x,)
        return None

    handle = torch.nn.modules.module.register_module_forward_pre_hook(poison)
    cfg = tiny_config(data, out / "run", "engine.nonfinite=stop", "optim.max_steps=4", "log_every=1",
                      "checkpoint.every_steps=100")
    try:
        result = {"result": train(cfg)}
    except NonFiniteError as e:
        result = {"error": str(e)}
    finally:
        handle.remove()
    save_results(out, rank, {**result, **seen})


def test_nan_in_front_of_a_lif_stops_the_run(tmp_path_factory):
    _, (seen,) = spawn_results(_worker, 1, tmp_path_factory, "nan_lif")
    assert seen["poisoned"] == 1, seen
    assert "error" in seen, f"the NaN never reached the loss: the run finished {seen}"
    assert "non-finite loss on rank(s) [0] at step 2" in seen["error"], seen["error"]
    assert "engine.nonfinite=stop" in seen["error"]
