"""data.access=stream through the trainer: the loader's stream position travels in each rank's checkpoint,
so a run stopped mid-epoch and resumed ends with the weights of the uninterrupted run, bit for bit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from trainer_fixtures import digits_shards, spawn, tiny_config

from trainer.export import consolidated_state_dict
from trainer.safe_load import safe_load

STREAM = ["data.access=stream", "data.shuffle_buffer=64", "optim.max_steps=12", "optim.global_batch=128",
          "checkpoint.every_steps=3", "checkpoint.keep_last=10", "log_every=1"]


def _worker(rank: int, data: Path, out: Path) -> None:
    from trainer.train import train

    results = {}
    for name, extra in (("full", []), ("resumed#1", ["stop_at_step=6"]), ("resumed#2", [])):
        history: list[dict] = []
        cfg = tiny_config(data, out / name.split("#")[0], *STREAM, *extra)
        result = train(cfg, report=lambda metrics, ckpt, h=history: h.append(metrics))
        results[name] = {"result": result, "history": history}
    if rank == 0:
        (out / "stream.json").write_text(json.dumps(results, default=str))


@pytest.mark.slow
def test_stream_mode_resumes_mid_epoch_bit_identically(tmp_path, tmp_path_factory):
    spawn(_worker, 2, digits_shards(tmp_path_factory), tmp_path)
    runs = json.loads((tmp_path / "stream.json").read_text())
    first, second, full = runs["resumed#1"], runs["resumed#2"], runs["full"]
    assert first["result"]["step"] == 6 and second["result"]["resumed_from"].endswith("step_00000006")
    state = safe_load(Path(second["result"]["resumed_from"]) / "trainer_rank00001.pt")
    assert state["loader"]["access"] == "stream" and state["loader"]["batches_yielded"] > 0  # mid-epoch
    after = {h["step"]: h["train/loss"] for h in full["history"] if h["step"] > 6}
    assert after == {h["step"]: h["train/loss"] for h in second["history"]}
    a, b = consolidated_state_dict(Path(full["result"]["checkpoint"])), \
        consolidated_state_dict(Path(second["result"]["checkpoint"]))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
