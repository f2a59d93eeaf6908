"""engine.channels_last (models/layout.py, docs/model.md §12): a [T, N, C, H, W] sequence folds and unfolds as
views; every activation and gradient of a channels_last network stays channels_last, with no activation copied
but the batch on its way in and the one gradient the head hands back; a training step gives the contiguous step's
loss and gradients; and the trainer runs the layout on the engine it wraps."""

from __future__ import annotations

import copy
import json
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from trainer_fixtures import digits_shards, save_results, spawn, tiny_config

from models import SpikingResNet
from models.blocks import fold
from models.layout import is_channels_last, to_channels_last, use_channels_last
from models.neuron import LIF, spikes_of

# (family, stem, shortcut, strides): the projection shortcuts of both kinds, the static stem broadcast over T into a
# strided first stage (MS-ResNet-18/34 and 104 start that way), and the three block families.
NETS = [("ms", "7x7", "conv", (2, 2)), ("ms", "3x3", "pool", (1, 2)), ("sew", "7x7", "conv", (2, 2)),
        ("spiking", "3x3", "pool", (1, 2))]


def _net(family: str, stem: str, shortcut: str, strides: tuple[int, int]) -> nn.Module:
    torch.manual_seed(0)
    model = SpikingResNet(family, (2, 2), (8, 16), strides, stem, shortcut, num_classes=5, T=3).train()
    g = torch.Generator().manual_seed(1)
    for m in model.modules():  # every branch passes gradient (MS zero-initialises its last BNs)
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data = torch.rand(m.weight.shape, generator=g) * 0.8 + 0.2
            m.bias.data = torch.randn(m.bias.shape, generator=g) * 0.1
    return model


def _in_layout(t: torch.Tensor) -> bool:
    """channels_last, or a channels_last stem output broadcast over T (stride 0: nothing materialised)."""
    return is_channels_last(t) or (t.dim() == 5 and t.stride(0) == 0 and is_channels_last(t[0]))


def test_a_channels_last_sequence_folds_and_unfolds_as_views():
    x = torch.randn(3, 2, 4, 5, 6)
    cl = to_channels_last(x)
    assert torch.equal(cl, x) and cl.stride() == (2 * 5 * 6 * 4, 5 * 6 * 4, 1, 6 * 4, 4) and is_channels_last(cl)
    assert to_channels_last(cl) is cl and not is_channels_last(x)
    flat = fold(cl)  # what models.blocks.folded hands a conv or tdBN
    assert flat.data_ptr() == cl.data_ptr() and flat.is_contiguous(memory_format=torch.channels_last)
    back = flat.unflatten(0, (3, 2))
    assert back.data_ptr() == cl.data_ptr() and is_channels_last(back)
    # A broadcast stem output cannot be viewed folded: the copy keeps the layout (reshape's would be NCHW).
    stem = to_channels_last(torch.randn(2, 4, 5, 6))
    broadcast = fold(stem.unsqueeze(0).expand(3, -1, -1, -1, -1))
    assert broadcast.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(broadcast, stem.repeat(3, 1, 1, 1))
    batch = torch.randn(2, 3, 8, 8)
    assert torch.equal(to_channels_last(batch), batch) and is_channels_last(to_channels_last(batch))
    with pytest.raises(ValueError, match=r"got shape \(2, 3\)"):
        to_channels_last(torch.randn(2, 3))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("net", NETS, ids=lambda n: "-".join(map(str, n)))
def test_every_activation_and_gradient_stays_channels_last(net, precision, device, one_thread):
    """Forward hooks see every module's inputs and outputs; tensor hooks every conv's and tdBN's output gradient."""
    model = use_channels_last(_net(*net).to(device))
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in model.parameters() if p.dim() == 4)
    wrong, checked = [], {"forward": 0, "grad": 0}

    def check(name, t, kind="forward"):
        checked[kind] += 1
        if not _in_layout(t):
            wrong.append((name, tuple(t.shape), t.stride()))

    def forward(module, args, out):
        name = type(module).__name__
        for t in (*args, spikes_of(out) if isinstance(module, LIF) else out):
            if isinstance(t, torch.Tensor) and t.dim() in (4, 5):
                check(name, t)
        if isinstance(module, nn.Conv2d | nn.BatchNorm2d):
            out.register_hook(lambda g: check(f"grad of {name}", g, "grad"))

    for m in model.modules():
        if m is not model:
            m.register_forward_hook(forward)
    x = torch.randn(2, 3, 16, 16, device=device)  # contiguous: the model lays it out
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        logits = model(x)
    F.cross_entropy(logits.float(), torch.arange(2, device=device)).backward()
    assert not wrong, wrong
    leaves = [m for m in model.modules() if next(m.children(), None) is None and not isinstance(m, nn.Linear)]
    assert checked["grad"] == sum(isinstance(m, nn.Conv2d | nn.BatchNorm2d) for m in leaves)
    assert checked["forward"] >= 2 * len(leaves)


def _copies(model: nn.Module, x: torch.Tensor) -> Counter:
    """Shapes of every aten::copy_ of a forward + backward as the profiler records them, those inside the conv and
    LIF kernels included, but for parameter-sized ones (oneDNN hands a weight gradient back in its weight's
    layout)."""
    params = {tuple(p.shape) for p in model.parameters()}
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        F.cross_entropy(model(x), torch.arange(len(x))).backward()
    return Counter(shape for e in prof.events() if e.name == "aten::copy_"
                   and (shape := tuple(e.input_shapes[0])) not in params)


@pytest.mark.parametrize("net", NETS, ids=lambda n: "-".join(map(str, n)))
def test_no_copy_the_contiguous_network_does_not_make_but_the_batch_and_the_heads_gradient(net, one_thread):
    """The two extra copies: the batch laid out NHWC as it enters, and the gradient of the head's mean over H, W,
    which autograd makes NCHW and each LIF it reaches through the residual additions reads in its own layout
    (the last stage's, the smallest activation). Nothing inside a block."""
    plain = _net(*net)
    model = use_channels_last(copy.deepcopy(plain))
    x = torch.randn(2, 3, 16, 16)
    extra = _copies(model, x) - _copies(plain, x)
    with torch.no_grad():
        last = model.stem_forward(x)
        for block in model.blocks:
            last = block(last)
    assert extra.keys() == {tuple(x.shape), tuple(last.shape)} and extra[tuple(x.shape)] == 1, extra


@pytest.mark.parametrize("net", NETS, ids=lambda n: "-".join(map(str, n)))
def test_a_channels_last_step_gives_the_contiguous_loss_and_gradients(net, device, one_thread):
    """fp32: the convs sum in another order in NHWC (oneDNN and cuDNN pick other kernels), a few ulp per conv,
    grown through the layers and BN's normalisation to ~1e-5 of a gradient's largest entry (measured: at most
    1.2e-5). 1e-4 is that with margin; one spike flipped by the rounding, or any value misplaced by a layout
    error, moves gradients by percents. bf16 is not compared: one bf16 ulp (0.4 %) of difference flips spikes."""
    plain = _net(*net).to(device)
    cl = use_channels_last(copy.deepcopy(plain))
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(2)).to(device)
    y = torch.arange(4, device=device)
    losses = [F.cross_entropy(m(x), y) for m in (plain, cl)]
    for loss in losses:
        loss.backward()
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=0)
    for (name, p), q in zip(plain.named_parameters(), cl.parameters()):
        scale = float(p.grad.abs().max())
        assert scale > 0, name
        torch.testing.assert_close(q.grad, p.grad, rtol=0, atol=1e-4 * scale, msg=name)


RUNS = {"contiguous": ["engine.channels_last=false"], "channels_last": ["engine.channels_last=true"],
        "channels_last_zero2": ["engine.channels_last=true", "engine.zero_stage=2"]}


def _trainer_worker(rank: int, data: Path, out: Path) -> None:
    """One-step runs from the same seed on one gloo rank: the layout of every conv's weight and of every input a
    conv saw in training and evaluation, and the step's loss."""
    from trainer.trainer import Trainer

    seen: list[bool] = []

    def conv_input(module, args):
        if isinstance(module, nn.Conv2d):
            seen.append(is_channels_last(args[0]))

    torch.nn.modules.module.register_module_forward_pre_hook(conv_input)
    results = {}
    for name, overrides in RUNS.items():
        seen.clear()
        cfg = tiny_config(data, out / name, "optim.max_steps=1", "log_every=1", "checkpoint.every_steps=0",
                          *overrides)
        trainer = Trainer(cfg)
        model = trainer.engine.module
        # 1x1 kernels are contiguous and channels_last at once: only the larger ones tell the layouts apart.
        conv_weights = [p.is_contiguous(memory_format=torch.channels_last) for p in model.parameters()
                        if p.dim() == 4 and p.shape[-1] > 1]
        result = trainer.fit()
        results[name] = {"loss": result["train/loss"], "convs": len(seen), "convs_nhwc": sum(seen),
                         "weights_nhwc": [all(conv_weights), any(conv_weights)]}
    save_results(out, rank, results)


@pytest.mark.slow
def test_the_trainer_runs_the_engine_channels_last(tmp_path_factory):
    """engine.channels_last=true: every conv of the training step and of the evaluation reads an NHWC input, the
    conv weights are NHWC (ZeRO 0; from ZeRO 1 on they stay views of DeepSpeed's flat buffers), and the step's
    loss is the contiguous run's (fp32; the step test's tolerance). Weights after the step are not compared: on
    these digits one neuron of the second micro-batch sits within an ulp of its surrogate window's edge (u = 0),
    the NHWC rounding moves it across, and that alone changes some gradients by percents (measured: 6.7 %)."""
    data, out = digits_shards(tmp_path_factory), tmp_path_factory.mktemp("channels_last")
    spawn(_trainer_worker, 1, data, out)
    r = json.loads((out / "results0.json").read_text())
    off = r["contiguous"]
    assert off["weights_nhwc"] == [False, False] and off["convs"] > 0 and off["convs_nhwc"] == 0
    assert r["channels_last"]["weights_nhwc"] == [True, True] and r["channels_last_zero2"]["weights_nhwc"][1] is False
    for name in ("channels_last", "channels_last_zero2"):
        on = r[name]
        assert on["convs"] == on["convs_nhwc"] == off["convs"], name
        assert on["loss"] == pytest.approx(off["loss"], rel=1e-5), name
