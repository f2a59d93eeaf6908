"""The SpikingJelly rows of bench.models and bench.memory at toy size: each runs and reports its figures, and
the memopt peer is SpikingJelly's model with the same gradients, holding less for backward."""

import pytest
import torch

from bench import memory, models, peers
from bench.models import Config, run_row

TOY = Config("toy", "ms_resnet20", 10, 32, T=2, batch=4, warmup=1, steps=1)


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    yield 1
    torch.set_num_threads(before)


def test_memopt_peer_checkpoints_every_block_with_spikingjellys_gradients():
    from spikingjelly.activation_based import functional

    torch.manual_seed(0)
    plain = peers.build_spikingjelly_model("ms_resnet20", T=2)
    torch.manual_seed(0)
    lean = peers.build_spikingjelly_memopt_model("ms_resnet20", T=2, size=16)
    assert peers.spikingjelly_memopt_plan(lean) == "9 modules checkpointed, 0 with a compressed input"
    x = torch.randn(3, 3, 16, 16) * 2
    grads = []
    for model in (plain, lean):
        functional.reset_net(model)
        out = model(x)
        out.square().sum().backward()
        grads.append([p.grad for p in model.parameters()])
    assert len(grads[0]) == len(grads[1])
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)


def test_models_rows_report_their_figures_and_memopt_holds_less(threads):
    rows = {row: run_row(TOY, row, threads) for row in ("ds_default", "sj_eager", "sj_memopt")}
    for r in rows.values():
        assert r["images_per_s"] > 0 and r["saved_bytes"] > 0 and r["held_bytes"] > 0 and r["peak_rss_mib"] > 0
    eager, lean = rows["sj_eager"], rows["sj_memopt"]
    # Checkpointing keeps one input per block instead of every activation; autograd's hooks miss those inputs.
    assert lean["held_bytes"] < 0.5 * eager["held_bytes"]
    assert lean["saved_bytes"] < lean["held_bytes"]
    lines = models.report(TOY, list(rows.values()), models.fp32_min_bytes(TOY), "check", "lif")
    text = "\n".join(lines)
    assert "SpikingJelly 2.0 memopt: 9 modules checkpointed" in text
    assert text.count("target deepspike default (bf16): img/s >= 2.5x the fastest SJ") == 1
    assert "held <= 0.5x the leanest SJ (SpikingJelly 2.0 memopt)" in text


def test_memory_rows_include_spikingjellys_memopt(threads):
    rows = [memory.run_row("ms_resnet20", 32, row, 2, 2, 1, "cpu", threads) for row in ("none", "sj", "sj_memopt")]
    assert all(r["act_bytes"] > 0 and r["step_s"] > 0 for r in rows)
    assert rows[2]["act_bytes"] < rows[1]["act_bytes"]
    lines = memory.report("toy", rows)
    assert [line.split()[0] for line in lines[2:]] == ["none", "sj", "sj_memopt"]
    assert "target" not in "".join(lines)  # marked on deepspike's checkpointed rows only


@pytest.mark.slow
def test_compiled_row_reports_its_compile_time(threads):
    r = run_row(TOY, "sj_compiled", threads)
    assert r["images_per_s"] > 0 and r["compile_s"] > 0
    assert r["inductor_cache_hits"] + r["inductor_cache_misses"] > 0
