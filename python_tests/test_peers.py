"""The same-harness peers of bench/peers (gradual magnitude pruning, sparse variational dropout,
L0 hard-concrete gates), their counts, and bench/pareto_mnist.py's smoke run. Each peer is
checked against its paper's formulas computed independently (quadrature, Monte Carlo, top-k)."""
import itertools
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

BENCH = os.path.join(os.path.dirname(__file__), "..", "bench")
sys.path.insert(0, BENCH)

from peers import common, gmp, l0, sparse_vd
from test_data import SHARED_MNIST, fake_mnist

from mackay_ext import models


# ------------------------------------------------------------------------------------ counts
def test_macs_and_architecture_of_chains_with_dead_units():
    net = models.create("lenet-300-100")
    with torch.no_grad():
        net[1].weight[:, :100] = 0      # 100 input pixels unread
        net[3].weight[:50] = 0          # 50 neurons of layer 2 without input: constants
    assert common.surviving_architecture(net) == [684, 300, 50, 10]
    assert common.macs_without_dead_units(net, (1, 28, 28)) == (684 * 300 + 300 * 50 + 50 * 10, 266_200)

    lenet5 = models.create("lenet-5-caffe")
    with torch.no_grad():
        lenet5[0].weight[3] = 0          # a conv1 filter without weights: a constant map
        lenet5[2].weight[:10] = 0        # 10 conv2 filters: their 160 fc1 inputs go too
        lenet5[5].weight[:, :16 * 12] = 0  # fc1 no longer reads conv2 channels 0..11
    conv1, conv2, fc1, fc2 = 19 * 25 * 24 * 24, 38 * 19 * 25 * 8 * 8, 500 * 38 * 16, 10 * 500
    assert common.surviving_architecture(lenet5) == [1, 19, 38, 500, 10]
    assert common.macs_without_dead_units(lenet5, (1, 28, 28)) == (conv1 + conv2 + fc1 + fc2, 2_293_000)


def test_a_unit_fed_only_by_dead_units_is_dead():
    net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 2))
    with torch.no_grad():
        net[0].weight[0] = 0            # unit 0 of layer 1 has no input
        net[2].weight[1] = 0
        net[2].weight[1, 0] = 1.0       # unit 1 of layer 2 reads only that dead unit
    assert common.surviving_architecture(net) == [4, 2, 2, 2]


# ------------------------------------------------------------------------------------ GMP
def test_cubic_schedule():
    assert gmp.cubic_sparsity(0, 0.9, 0, 100) == 0
    assert gmp.cubic_sparsity(100, 0.9, 0, 100) == 0.9
    assert gmp.cubic_sparsity(50, 0.9, 0, 100) == pytest.approx(0.9 * (1 - 0.5 ** 3))
    values = [gmp.cubic_sparsity(t, 0.9, 0, 100) for t in range(101)]
    assert all(b >= a for a, b in itertools.pairwise(values))  # only ever more pruned


def test_global_pruning_keeps_the_largest_over_all_layers():
    layers = [nn.Linear(7, 5), nn.Linear(5, 3)]
    masks = {m.weight: torch.ones_like(m.weight) for m in layers}
    everything = torch.cat([m.weight.detach().abs().flatten() for m in layers])
    expected = set(torch.topk(everything, 12).indices.tolist())
    gmp.prune_globally(layers, masks, 12)
    kept = torch.cat([(m.weight != 0).flatten() for m in layers]).nonzero().flatten().tolist()
    assert set(kept) == expected
    before = [m.weight.detach().clone() for m in layers]
    with torch.no_grad():   # a pruned weight that regrew by training is still pruned next time
        layers[0].weight.add_(10.0 * (layers[0].weight == 0))
    gmp.prune_globally(layers, masks, 12)
    assert all(torch.equal(m.weight, b) for m, b in zip(layers, before))


# ------------------------------------------------------------------------------ Sparse VD
def _exact_neg_kl(log_alpha: float) -> float:
    """-KL(N(theta, alpha theta^2) || log-uniform) up to the constant that makes it 0 as
    alpha -> inf: 0.5 log alpha - E log|1 + sqrt(alpha) eps| - (gamma_E + log 2) / 2 (Kingma et al.
    2015), the expectation by quadrature."""
    eps = np.linspace(-12, 12, 400_001)
    density = np.exp(-eps ** 2 / 2) / math.sqrt(2 * math.pi)
    integrand = np.log(np.abs(1 + math.sqrt(math.exp(log_alpha)) * eps) + 1e-300) * density
    expectation = np.trapezoid(integrand, eps)
    return 0.5 * log_alpha - expectation - (np.euler_gamma + math.log(2)) / 2


@pytest.mark.parametrize("log_alpha", [-4.0, -1.0, 0.0, 1.5, 3.0, 6.0])
def test_kl_approximation_matches_the_integral(log_alpha):
    approx = float(sparse_vd.neg_kl(torch.tensor(log_alpha, dtype=torch.float64)))
    assert approx == pytest.approx(_exact_neg_kl(log_alpha), abs=0.02)


def test_local_reparameterisation_has_the_weights_moments():
    layer = sparse_vd.LinearSVD(nn.Linear(6, 4).double())
    with torch.no_grad():
        layer.log_sigma2.uniform_(-3, 0)
    x = torch.randn(1, 6, dtype=torch.float64).expand(200_000, 6)
    out = layer.train()(x)
    sigma2 = layer.log_sigma2.exp().detach()
    assert torch.allclose(out.mean(0), nn.functional.linear(x[:1], layer.theta, layer.bias)[0], atol=0.02)
    assert torch.allclose(out.var(0), (x[0] ** 2 * sigma2).sum(1), rtol=0.03)


def test_test_time_weights_and_the_plain_copy():
    dense = models.create("lenet-5-caffe")
    variational = sparse_vd.variational(dense)
    layers = [m for m in variational.modules() if isinstance(m, sparse_vd._VariationalLayer)]
    with torch.no_grad():
        layers[2].log_sigma2[:100] = 10.0      # log alpha large: these go at threshold 3
    plain = sparse_vd.deterministic(variational, models.create("lenet-5-caffe"), 3.0)
    assert int((plain[5].weight == 0).sum()) >= 100
    x = torch.randn(3, 1, 28, 28)
    assert torch.allclose(plain.eval()(x), variational.eval()(x), atol=1e-6)


# ------------------------------------------------------------------------------------- L0
def test_open_probability_is_the_hard_concrete_mass_above_zero():
    gates = l0.Gates(3)
    with torch.no_grad():
        gates.log_alpha.copy_(torch.tensor([-2.0, 0.0, 2.0]))
    samples = torch.stack([gates.train()() for _ in range(40_000)])
    assert torch.allclose((samples > 0).double().mean(0), gates.open_probability().double(), atol=0.01)
    eval_gates = gates.eval()()
    expected = torch.clamp(torch.sigmoid(gates.log_alpha) * (l0.ZETA - l0.GAMMA) + l0.GAMMA, 0, 1)
    assert torch.equal(eval_gates, expected)


@pytest.mark.parametrize("name", ["lenet-300-100", "lenet-5-caffe"])
def test_folding_the_gates_changes_no_output(name):
    net = models.create(name)
    gated = l0.attach(net)
    with torch.no_grad():
        for _, gates, _, _ in gated:
            gates.log_alpha.uniform_(-4, 4)   # some gates closed, some partly open
    x = torch.randn(5, 1, 28, 28)
    before = net.eval()(x)
    l0.fold(gated)
    assert not any(hasattr(m, "l0_gates") for m in net.modules())
    assert torch.allclose(net(x), before, atol=1e-5)
    assert common.weights_kept(net)[0] < common.weights_kept(models.create(name))[0]


# ------------------------------------------------------------------------------ the driver
@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("pareto")
    data_dir = SHARED_MNIST
    if not os.path.isdir(data_dir):
        data_dir = str(out / "mnist")
        fake_mnist(data_dir, n_train=900, n_test=200)
    command = [sys.executable, os.path.join(BENCH, "pareto_mnist.py"), "--data-dir", data_dir,
               "--smoke", "--out", str(out), "--quiet", "--seeds", "0"]
    result = subprocess.run(command, check=False, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    return out, command


def test_smoke_writes_every_method_seed_and_plot(smoke):
    out, _ = smoke
    rows = json.loads((out / "pareto_mnist_smoke.json").read_text())
    for model in ("lenet-300-100", "lenet-5-caffe"):
        for seed in (0,):
            methods = {r["method"] for r in rows if r["model"] == model and r["seed"] == seed}
            # FAST_ARD_LR: both models'; LONG: LeNet-300-100's only
            fast = {"mackay-weight-fast", "mackay-weight-fast-ft1"} | (
                {"mackay-priced-long", "mackay-priced-long-ft1", "l0-long"} if model == "lenet-300-100" else set())
            assert methods == {"dense", "mackay-weight", "gmp", "sparse-vd", "mackay-group", "l0",
                               "mackay-priced"} | fast
        for row in (r for r in rows if r["model"] == model):
            assert 0 <= row["test_error"] <= 100 and 0 <= row["macs"] <= row["macs_total"]
            assert row["weights_kept"] == pytest.approx(100 * row["kept"] / row["total"])
            if row["method"] == "gmp":   # matched to a MacKay point's exact count
                assert any(r["method"] == "mackay-weight" and r["seed"] == row["seed"]
                           and r["kept"] == row["kept"] for r in rows)
        assert (out / f"pareto_mnist_smoke_{model}.png").stat().st_size > 10_000
    fast = {r["model"]: r["retrain_lr"] for r in rows if r["method"] == "mackay-weight-fast"}
    assert fast == {"lenet-300-100": 2e-3, "lenet-5-caffe": 4e-3}   # the override is recorded
    assert {r["finetune_augment_shift"] for r in rows if r["method"].endswith("-ft1")} == {1}
    report = (out / "pareto_mnist_smoke.md").read_text()
    assert "these figures mean nothing" in report and "| mackay-weight | ≤ 1.3% error" in report
    assert "| mackay-weight-fast | ≤ 1.3% error" in report
    assert "| mackay-priced-long | ≤ 1.6% error" in report and "| mackay-priced-long 0.03 | l0-long |" in report
    assert "| mackay-weight-fast-ft1 | ≤ 1.3% error" in report and "| mackay-priced-long-ft1 | ≤ 1.6% error" in report


def test_a_second_run_resumes_without_training_again(smoke):
    out, command = smoke
    before = (out / "pareto_mnist_smoke.json").read_text()
    result = subprocess.run(command, check=False, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert (out / "pareto_mnist_smoke.json").read_text() == before
