"""Per-layer spikes and energy: the per-layer table adds up to the run-level metrics, SOPs follow the
firing rate of the layer that feeds them, and both checkpoint formats load."""

from __future__ import annotations

import csv

import pytest
import torch

from analysis.loading import load_checkpoint_model, real_batches
from analysis.spikes import main, measure
from models import create_model
from models.stats import E_AC_PJ, E_MAC_PJ

pytestmark = pytest.mark.usefixtures("one_thread")


def _trained_ish(name="ms_resnet20", T=3):
    """A model with non-trivial BN running statistics (a few train-mode forwards on real digits)."""
    torch.manual_seed(0)
    model = create_model(name, T=T, widths=(8, 16, 16), last_bn_gamma0=0.3)
    with torch.no_grad():
        for x, _ in real_batches("digits", 8, 32, 3):
            model(x)
    return model


def test_layer_table_adds_up_and_sops_follow_rates():
    model = _trained_ish()
    batches = real_batches("digits", 8, 50, 0, split="test")
    rows, summary = measure(model, batches)
    by_name = {r["layer"]: r for r in rows}
    lif = [r for r in rows if r["kind"] == "lif"]
    syn = [r for r in rows if r["kind"] == "synapse"]
    assert len(lif) == 2 * 9 + 1  # two per MS block, one before the head
    assert all(0.0 <= r["rate"] <= 1.0 and r["spikes_per_neuron"] == pytest.approx(3 * r["rate"]) for r in lif)
    assert sum(r["mj"] for r in syn) == pytest.approx(summary["energy/mj_per_image"], rel=1e-9)
    assert sum(r["sops"] for r in syn) / 1e9 == pytest.approx(summary["energy/gsops_per_image"], rel=1e-9)
    for r in syn:
        assert r["mj"] == pytest.approx((r["macs"] * E_MAC_PJ + r["sops"] * E_AC_PJ) * 1e-9)
    # blocks.4.conv2 (16 -> 16 channels, 4x4 maps at 8 px input) reads the spikes of blocks.4.lif2:
    # its synaptic operations are its dense MACs times their firing rate.
    dense = 3 * 16 * 4 * 4 * 16 * 9
    assert by_name["blocks.4.lif2"]["neurons"] == 16 * 4 * 4
    assert by_name["blocks.4.conv2"]["sops"] == pytest.approx(dense * by_name["blocks.4.lif2"]["rate"], rel=1e-6)
    assert by_name["blocks.4.conv2"]["macs"] == 0.0
    # the stem and MS-ResNet's downsampling 1x1 convs see real values: dense MACs, no SOPs
    assert by_name["stem_convs.0"]["sops"] == 0.0 and by_name["blocks.3.shortcut.conv"]["macs"] > 0
    assert summary["spikes/per_neuron_per_sample"] == pytest.approx(
        sum(r["spikes_per_neuron"] * r["neurons"] for r in lif) / sum(r["neurons"] for r in lif), rel=1e-6)


def test_command_on_both_checkpoint_formats(tmp_path):
    model = _trained_ish("spiking_resnet20")
    kwargs = {"num_classes": 10, "T": 3, "widths": [8, 16, 16], "last_bn_gamma0": 0.3}
    plain = tmp_path / "plain.pt"
    torch.save({"model": "spiking_resnet20", "model_kwargs": kwargs, "state_dict": model.state_dict()}, plain)
    exported = tmp_path / "exported.pt"  # the layout python -m trainer.export writes
    torch.save({"state_dict": model.state_dict(), "step": 1, "epoch": 0, "metrics": {}, "source": "x",
                "model": {"name": "spiking_resnet20", "num_classes": 10, "T": 3,
                          "kwargs": {"widths": [8, 16, 16], "last_bn_gamma0": 0.3}}}, exported)
    results = []
    for ckpt in (plain, exported):
        out = tmp_path / ckpt.stem
        rows, summary = main([str(ckpt), "--size", "8", "--batch-size", "150", "--out", str(out)])
        results.append(summary)
        with open(out / "spikes.csv") as f:
            assert len(list(csv.DictReader(f))) == len(rows)
        assert "spikes/per_neuron_per_sample" in (out / "spikes.md").read_text()
        assert (out / "spikes.png").stat().st_size > 10_000
    assert results[0] == results[1]
    assert results[0]["spikes/rate"] > 0

    name, m = load_checkpoint_model(plain, T=5)
    assert name == "spiking_resnet20" and m.T == 5


def test_bad_checkpoint_is_rejected(tmp_path):
    bad = tmp_path / "bad.pt"
    torch.save({"weights": {}}, bad)
    with pytest.raises(ValueError, match="'model' and 'state_dict'"):
        load_checkpoint_model(bad)
