"""Block dynamical isometry and gradient norms (docs/model.md §8.4): the Hutchinson estimator against the exact
Jacobian, identity of MS blocks at init, and the depth behaviour of the per-block gradient norm."""

from __future__ import annotations

import csv
import math

import pytest
import torch
import torch.nn.functional as F

from analysis.gradnorm import bdi_stats, main
from analysis.loading import real_batches
from models import LIF, create_model
from models.blocks import MSBlock, SpikingBlock

pytestmark = pytest.mark.usefixtures("one_thread")


def _exact_bdi(block, x):
    """phi(JJ^T), phi((JJ^T)^2) and the per-probe variances of the Hutchinson terms, from the full J."""
    y = block(x)
    d = y.numel()
    J = torch.autograd.functional.jacobian(block, x).reshape(d, x.numel()).double()
    A = J @ J.T
    A2 = A @ A
    phi, phi2 = A.trace() / d, A2.trace() / d
    # Var(v^T M v) for Rademacher v = 2 (||M||_F^2 - sum_i M_ii^2)
    var_a = 2 * (A.square().sum() - A.diagonal().square().sum()) / d**2
    var_b = 2 * (A2.square().sum() - A2.diagonal().square().sum()) / d**2
    return float(phi), float(phi2 - phi**2), float(var_a), float(var_b)


@pytest.mark.parametrize("kind", ["ms_downsample", "ms_identity", "vanilla"])
def test_hutchinson_matches_exact_jacobian(kind):
    torch.manual_seed(0)
    neuron = LIF
    if kind == "ms_downsample":  # 3 -> 4 channels, stride 2: J is not square
        block, x = MSBlock(3, 4, 2, neuron, "pool", 0.5, last_bn_gamma0=0.5), torch.randn(2, 2, 3, 4, 4)
    elif kind == "ms_identity":
        block, x = MSBlock(3, 3, 1, neuron, "pool", 0.5, last_bn_gamma0=0.5), torch.randn(2, 2, 3, 4, 4)
    else:
        block = SpikingBlock(3, 3, 1, neuron, "pool", 0.5, last_bn_gamma0=0.5)
        x = (torch.rand(2, 2, 3, 4, 4) < 0.3).float()
    block.train()
    x.requires_grad_(True)
    phi, spread, var_a, var_b = _exact_bdi(block, x)

    k = 256
    est_phi, est_spread = bdi_stats(block(x), x, k, torch.Generator().manual_seed(1))
    tol_phi = 5 * math.sqrt(var_a / k)
    tol_spread = 5 * (math.sqrt(var_b / k) + 2 * phi * math.sqrt(var_a / k))
    print(f"{kind}: phi exact {phi:.4f} est {est_phi:.4f} (tol {tol_phi:.4f}); "
          f"spread exact {spread:.4f} est {est_spread:.4f} (tol {tol_spread:.4f})")
    assert 0 < tol_phi < 0.1 * phi  # the test has resolution: J is far from trivial
    assert abs(est_phi - phi) < tol_phi
    assert abs(est_spread - spread) < tol_spread
    assert spread > tol_spread  # a non-identity block has a measurable spread


def test_bdi_stats_needs_two_probes():
    x = torch.randn(3, requires_grad=True)
    with pytest.raises(ValueError, match="probes"):
        bdi_stats(2 * x, x, 1, torch.Generator())


def _block_stats(name, T=2, **kw):
    x, _ = real_batches("digits", 8, 8, 1)[0]
    torch.manual_seed(0)
    model = create_model(name, T=T, **kw).train()
    h = model.stem_forward(x)
    out = []
    for block in list(model.blocks)[:3]:  # stage 1: identity shortcuts
        h = h.detach().requires_grad_(True)
        y = block(h)
        out.append(bdi_stats(y, h, 4, torch.Generator().manual_seed(0)))
        h = y
    return out


def test_ms_block_is_an_isometry_at_init_and_vanilla_is_not():
    for phi, spread in _block_stats("ms_resnet20"):
        assert phi == pytest.approx(1.0, abs=1e-6) and spread == pytest.approx(0.0, abs=1e-6)
    # Vanilla at its default init: the LIF after the add makes J = D (I + J_F), far from an isometry.
    vanilla = _block_stats("spiking_resnet20")
    print("vanilla phi, spread per block:", vanilla)
    assert all(spread > 1.0 for _, spread in vanilla)
    # Even with the last BN zero-initialised a vanilla block is no identity: its output LIF sees
    # u in {0, 1} (input spikes), outside the surrogate window, so no gradient crosses the block at all.
    for phi, spread in _block_stats("spiking_resnet20", last_bn_gamma0=0.0):
        assert phi == 0.0 and spread == 0.0


def _block_input_grad_norms(name, x, y):
    from models.grad_norms import BlockGradNorms

    torch.manual_seed(0)
    model = create_model(name, T=2).train()
    with BlockGradNorms(model) as norms:
        F.cross_entropy(model(x), y).backward()
    return norms.block_norms(), model


@pytest.mark.slow
def test_grad_norm_flat_with_depth_for_ms_and_decaying_for_vanilla():
    x, y = real_batches("digits", 16, 4, 1)[0]
    ratio = {}
    for name in ("ms_resnet20", "ms_resnet110", "spiking_resnet20", "spiking_resnet110"):
        norms, model = _block_input_grad_norms(name, x, y)
        ratio[name] = norms[0] / norms[-1]
        if name.startswith("ms"):
            # An MS block with identity shortcut is the identity at init: dL/dx passes it unchanged.
            for b, block in enumerate(model.blocks[:-1]):
                if isinstance(block.shortcut, torch.nn.Identity):
                    assert norms[b] == pytest.approx(norms[b + 1], rel=1e-5)
    print("||dL/dx_first|| / ||dL/dx_last||:", {k: round(v, 3) for k, v in ratio.items()})
    assert 0.5 < ratio["ms_resnet110"] < 2.0
    assert ratio["ms_resnet110"] / ratio["ms_resnet20"] == pytest.approx(1.0, abs=0.25)
    assert ratio["spiking_resnet110"] < 0.3
    assert ratio["spiking_resnet110"] / ratio["spiking_resnet20"] < 0.3


def test_gradnorm_command_writes_csv_and_plot(tmp_path):
    rows = main(["--models", "ms_resnet20,spiking_resnet20", "--T", "2", "--size", "8", "--batch-size", "4",
                 "--batches", "1", "--probes", "2", "--out", str(tmp_path)])
    with open(tmp_path / "gradnorm.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(rows) == 2 * 9
    assert (tmp_path / "gradnorm.png").stat().st_size > 10_000
    ms = [r for r in table if r["model"] == "ms_resnet20"]
    identity = [r for r in ms if r["block"] not in ("3", "6")]  # 3 and 6 downsample
    assert all(float(r["phi"]) == pytest.approx(1.0, abs=1e-6) for r in identity)
    assert all(float(r["grad_norm"]) > 0 for r in table)


def test_gradnorm_command_rejects_missing_models(tmp_path):
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path)])
