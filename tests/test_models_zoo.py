"""Registry, parameter counts, authors' checkpoint layout, spike statistics, depth and real-data accuracy."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dataloaders.digits import digits_tensors
from models import create_model, list_models, load_authors_checkpoint, to_authors_state_dict
from models.neuron import spikes_of
from models.stats import SpikeMonitor

SPEC_PARAMS = {  # docs/model.md §6
    "ms_resnet18": 11_693_736, "ms_resnet34": 21_801_896, "ms_resnet104": 77_350_504,
    "ms_resnet20": 272_474, "ms_resnet32": 466_906, "ms_resnet44": 661_338, "ms_resnet56": 855_770,
    "ms_resnet110": 1_730_714, "ms_resnet482": 7_758_106,
}


@pytest.mark.parametrize("name", sorted(SPEC_PARAMS))
def test_parameter_counts_equal_spec(name):
    model = create_model(name, num_classes=1000 if name in ("ms_resnet18", "ms_resnet34", "ms_resnet104") else 10)
    assert sum(p.numel() for p in model.parameters()) == SPEC_PARAMS[name]


def test_registry_lists_every_family_and_rejects_unknown_names():
    names = list_models()
    for depth in (20, 32, 44, 56, 110, 482, 18, 34):
        assert f"spiking_resnet{depth}" in names and f"sew_resnet{depth}" in names and f"ms_resnet{depth}" in names
    assert {"ms_resnet104", "ms_resnet20_dvs"} <= set(names)
    assert list_models("ms_resnet2*") == ["ms_resnet20", "ms_resnet20_dvs"]
    with pytest.raises(KeyError, match="unknown model"):
        create_model("ms_resnet19")


def test_init_follows_tdbn_spec():
    model = create_model("ms_resnet20")
    assert torch.all(model.stem_bn.weight == 0.5)
    for blk in model.blocks:
        assert torch.all(blk.bn1.weight == 0.5) and torch.all(blk.bn2.weight == 0.0)
        assert torch.all(blk.bn1.bias == 0) and torch.all(blk.bn2.bias == 0)
        if hasattr(blk.shortcut, "bn"):
            assert torch.all(blk.shortcut.bn.weight == 0.5)
    assert isinstance(create_model("ms_resnet104").dropout, torch.nn.Dropout)


def test_input_shapes_and_errors():
    model = create_model("ms_resnet20", T=3, widths=(4, 8, 8)).eval()
    assert model(torch.randn(2, 3, 8, 8)).shape == (2, 10)
    assert model(torch.randn(5, 2, 3, 8, 8)).shape == (2, 10)  # sequence with its own T
    with pytest.raises(ValueError, match=r"\[N,C,H,W\] or \[T,N,C,H,W\]"):
        model(torch.randn(3, 8, 8))
    dvs = create_model("ms_resnet20_dvs", T=2, widths=(4, 8, 8)).eval()
    assert dvs(torch.randn(2, 2, 2, 32, 32)).shape == (2, 10)


def _authors_keys(layers, stem_convs: int, pool_shortcut: bool) -> set[str]:
    """The authors' key layout written out from docs/model.md §6, independent of our mapping."""
    bn = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    keys = {f"conv1.{i}.weight" for i in range(stem_convs)}
    if stem_convs == 3:
        keys |= {f"conv1.{i}.bias" for i in range(3)}
    keys |= {f"conv1.{stem_convs}.bn.{k}" for k in bn}
    for s, n in enumerate(layers):
        for j in range(n):
            p = f"conv{s + 2}_x.{j}"
            keys |= {f"{p}.residual_function.1.weight", f"{p}.residual_function.4.weight"}
            keys |= {f"{p}.residual_function.{i}.bn.{k}" for i in (2, 5) for k in bn}
            if j == 0:  # every stage starts with stride 2 -> projection shortcut
                c, b = (1, 2) if pool_shortcut else (0, 1)
                keys |= {f"{p}.shortcut.{c}.weight"} | {f"{p}.shortcut.{b}.bn.{k}" for k in bn}
    return keys | {"fc.weight", "fc.bias"}


def _randomise_all(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.is_floating_point():
                t.copy_(torch.rand(t.shape, generator=g) * (1.0 if "running_var" in name else 0.2))


@pytest.mark.parametrize("name,layers,stem,pool", [
    ("ms_resnet18", (2, 2, 2, 2), 1, False), ("ms_resnet34", (3, 4, 6, 3), 1, False),
    ("ms_resnet104", (3, 8, 32, 8), 3, True)])
def test_authors_checkpoint_round_trip(name, layers, stem, pool):
    src = create_model(name, T=1).eval()
    _randomise_all(src, 0)
    theirs = {f"module.{k}": v.clone() for k, v in to_authors_state_dict(src).items()}  # saved from DDP
    assert {k.removeprefix("module.") for k in theirs} == _authors_keys(layers, stem, pool)
    dst = load_authors_checkpoint(create_model(name, T=1).eval(), theirs)
    assert torch.equal(dst.stem_convs[0].weight, theirs["module.conv1.0.weight"])
    assert torch.equal(dst.blocks[1].bn2.running_var, theirs["module.conv2_x.1.residual_function.5.bn.running_var"])
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(src(x), dst(x))
    del theirs["module.fc.bias"]
    theirs["module.extra.weight"] = torch.zeros(1)
    with pytest.raises(KeyError, match=r"missing \['fc.bias'\].*unexpected \['extra.weight'\]"):
        load_authors_checkpoint(create_model(name, T=1), theirs)


def test_spike_monitor_counts_rates_macs_and_energy():
    model = create_model("ms_resnet20", T=4).train()
    x = torch.randn(3, 3, 32, 32)
    rates = {}
    hooks = [m.register_forward_hook(lambda mod, a, o, n=n: rates.__setitem__(n, float(spikes_of(o).mean())))
             for n, m in model.named_modules() if type(m).__name__ == "LIF"]
    torch.manual_seed(0)
    with SpikeMonitor(model) as mon:
        model(x)
    for h in hooks:
        h.remove()
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    for n, r in mon.layer_rates().items():
        assert r == pytest.approx(rates[n], rel=1e-6)
    s = mon.summary()
    assert 0 < s["spikes/rate"] < 1
    assert s["spikes/per_neuron_per_sample"] == pytest.approx(4 * s["spikes/rate"])
    # docs/model.md §6: 40.8 M dense MACs per step at 32 px; the static stem (3*16*9*32*32 MACs) runs once.
    stem = 3 * 16 * 9 * 32 * 32
    assert s["energy/gmacs_per_image"] * 1e9 >= stem
    expected_mj = (s["energy/gmacs_per_image"] * 4.6 + s["energy/gsops_per_image"] * 0.9) * 1e-9 * 1e9
    assert s["energy/mj_per_image"] == pytest.approx(expected_mj, rel=1e-9)
    assert {"spikes/rate_stage1", "spikes/rate_stage2", "spikes/rate_stage3"} <= set(s)
    assert mon.dense_macs_per_image() == pytest.approx(stem + 4 * (40.8e6 - stem), rel=0.01)


def test_torch_compile_matches_eager():
    """One MS block (both LIFs, spike convs, BN, pooled shortcut) compiles without graph breaks."""
    torch.manual_seed(0)
    block = create_model("ms_resnet20", T=2, widths=(4, 8, 8)).blocks[3].train()
    x = torch.randn(2, 2, 4, 8, 8, requires_grad=True)
    eager = block(x)
    eager.sum().backward()
    g_eager = (x.grad.clone(), block.conv1.weight.grad.clone())
    block.zero_grad()
    x.grad = None
    out = torch.compile(block, fullgraph=True)(x)
    out.sum().backward()
    torch.testing.assert_close(out, eager, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x.grad, g_eager[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(block.conv1.weight.grad, g_eager[1], atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_ms_resnet482_forward_backward_batch2():
    model = create_model("ms_resnet482", T=6).train()
    out = model(torch.randn(2, 3, 32, 32))
    F.cross_entropy(out, torch.tensor([1, 2])).backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.stem_convs[0].weight.grad.abs().sum() > 0  # gradient reached the first layer through 480 layers


@pytest.mark.slow
def test_small_ms_resnet_learns_real_digits():
    """MS-ResNet-20, T=4, on scikit-learn's digits upsampled to 16x16: >= 95% test accuracy. In fp32: on a CPU
    without AVX-512, bf16 convolutions run on PyTorch's reference kernels, 12x slower than fp32 here (an AMD
    EPYC with AVX2); bf16 training is tested against fp32 in tests/test_trainer_distributed.py."""
    torch.manual_seed(0)
    data = digits_tensors(16)
    (xtr, ytr), (xte, yte) = data["train"], data["test"]
    model = create_model("ms_resnet20", T=4)
    epochs, bs = 8, 64
    steps = epochs * (len(xtr) // bs)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(epochs):
        perm = torch.randperm(len(xtr))
        for i in range(len(xtr) // bs):
            idx = perm[i * bs:(i + 1) * bs]
            loss = F.cross_entropy(model(xtr[idx]), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    with torch.no_grad():
        acc = (model(xte).argmax(1) == yte).float().mean().item()
    print(f"digits test accuracy {acc:.4f}")
    assert acc >= 0.95


def _host_syncs(fn) -> int:
    """Device-to-host reads (item, float, bool of a tensor) that fn makes, as the profiler records them."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return sum(e.name == "aten::_local_scalar_dense" for e in prof.events())


def test_spike_monitor_reads_nothing_back_per_layer():
    """Evaluation's spike statistics: the hooks never wait for the device; the summary reads every sum in one go,
    and the rates are exactly the float64 sums of each layer's spikes."""
    model = create_model("ms_resnet20", T=2, widths=(4, 8, 8)).eval()
    x = torch.randn(2, 3, 16, 16)
    spikes = {}
    hooks = [m.register_forward_hook(lambda mod, a, o, n=n: spikes.__setitem__(n, float(spikes_of(o).float().sum())))
             for n, m in model.named_modules() if type(m).__name__ == "LIF"]
    with torch.no_grad(), SpikeMonitor(model) as mon:
        model(x)
        for h in hooks:
            h.remove()
        assert _host_syncs(lambda: model(x)) == 0
    assert _host_syncs(mon.summary) <= 1  # (tolist of the stacked sums: one copy, no per-layer reads)
    rates = mon.layer_rates()
    assert rates.keys() == spikes.keys() and sum(spikes.values()) > 0
    for n, r in rates.items():
        assert r == 2 * spikes[n] / mon.neurons[n]  # two identical forwards


def _train_step_bits(model, x):
    """Output, input and parameter gradients, and the bytes of the distinct storages saved for backward."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    out.square().sum().backward()
    return [out.detach(), x.grad, *(p.grad for p in model.parameters())], sum(storages.values())


@pytest.mark.parametrize("name", ["ms_resnet20", "spiking_resnet20", "sew_resnet20"])
def test_spike_convs_save_the_lif_code_exactly_and_without_a_copy(name, monkeypatch):
    """A spike conv fed by a LIF saves that LIF's packed code (which holds the spikes) instead of casting its input
    to uint8: the same bits in output and every gradient, and one byte per input element less saved."""
    from models.spike_conv import SpikeConv2d

    torch.manual_seed(0)
    model = create_model(name, T=2, widths=(4, 8, 8), last_bn_gamma0=0.5).train()
    x = torch.randn(2, 3, 16, 16)
    inputs = []
    hook = torch.nn.modules.module.register_module_forward_pre_hook(
        lambda m, args: inputs.append(args[0].numel()) if isinstance(m, SpikeConv2d) else None)
    ours, saved = _train_step_bits(model, x)
    hook.remove()
    forward = SpikeConv2d.forward
    monkeypatch.setattr(SpikeConv2d, "forward", lambda self, s, code=None: forward(self, s))  # the uint8 cast
    cast, saved_cast = _train_step_bits(model, x)
    assert inputs and all(torch.equal(a, b) for a, b in zip(ours, cast))
    assert saved_cast - saved == sum(inputs)


def test_strided_shortcut_subsamples_a_broadcast_stem_before_materialising_it():
    """ImageNet layouts: the first block's strided shortcut gets the static stem output broadcast over T. It
    materialises only the subsample (no tensor of the full T x stem size is made), with the same bits in output
    and gradients as materialising first and subsampling after."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from models.blocks import Shortcut, folded

    class Largest(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.numel = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, tuple | list) else [out]:
                if isinstance(t, torch.Tensor) and t.dim() and t.stride(0):  # (stride 0: a broadcast view)
                    self.numel = max(self.numel, t.numel())
            return out

    torch.manual_seed(0)
    sc = Shortcut(8, 16, 2, "conv", 0.5).train()
    stem = torch.randn(4, 8, 16, 16, requires_grad=True)
    x = stem.unsqueeze(0).expand(3, -1, -1, -1, -1)  # T = 3, as SpikingResNet.stem_forward makes it
    with Largest() as largest:
        out = sc(x)
    assert largest.numel < x.numel()
    grads = torch.autograd.grad(out.square().sum(), [stem, *sc.parameters()])
    ref = folded(lambda v: sc.bn(sc.conv(v[:, :, ::2, ::2].contiguous())), x)  # materialised, then subsampled
    ref_grads = torch.autograd.grad(ref.square().sum(), [stem, *sc.parameters()])
    assert torch.equal(out, ref) and all(torch.equal(a, b) for a, b in zip(grads, ref_grads))


@pytest.mark.parametrize("family", ["ms", "sew"])
def test_channels_last_model_runs_every_lif_in_place(family):
    """A channels_last model on a channels_last batch: every LIF reads its dense channels_last input in place and
    emits spikes in that layout (the broadcast static stem, stride 0 over T, is the one input it must copy)."""
    from models import SpikingResNet

    torch.manual_seed(0)
    model = SpikingResNet(family, (1, 1), (8, 16), (2, 2), "7x7", "conv", num_classes=5, T=2, last_bn_gamma0=0.5)
    x = torch.randn(2, 3, 32, 32)
    seen = []

    def check(m, args, out):
        if args[0].stride(0):
            seen.append((args[0].flatten(0, 1).is_contiguous(memory_format=torch.channels_last),
                         spikes_of(out).stride() == args[0].stride()))

    lifs = [m for m in model.modules() if type(m).__name__ == "LIF"]
    out = model(x)
    cl = model.to(memory_format=torch.channels_last)
    hooks = [m.register_forward_hook(check) for m in lifs]
    out_cl = cl(x.contiguous(memory_format=torch.channels_last))
    for h in hooks:
        h.remove()
    assert len(seen) >= len(lifs) - 1 and all(layout and in_place for layout, in_place in seen), seen
    torch.testing.assert_close(out_cl, out, rtol=1e-4, atol=1e-4)  # the convs' own rounding differs by layout
