"""max_prune_fraction: an update prunes at most a share of a layer's live groups, and the groups
it keeps of those the criterion picked are the least clear-cut (mackay_ext.prune_cap)."""
import math
import warnings

import pytest
import torch
from torch import nn

from mackay_ext import MacKayAdam, MacKayPruner, ard_param_groups

NUM_DATA = 256


def prepared(granularity="output", backend="ext", **options):
    """A small MLP trained under the prior, after its warm-up update and more training: the next
    update can prune. The same state every call (seeded)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 6)).double()
    optimizer = MacKayAdam(ard_param_groups(model), lr=1e-2, num_data=NUM_DATA, batch_size=32)
    pruner = MacKayPruner(model, optimizer, num_data=NUM_DATA, granularity=granularity,
                          backend=backend, **options)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(NUM_DATA, 20, generator=g, dtype=torch.float64)
    y = x[:, :6].argmax(1)

    def train(steps):
        for step in range(steps):
            index = torch.arange(step * 32, (step + 1) * 32) % NUM_DATA
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x[index]), y[index]).backward()
            optimizer.step()
    train(30)
    pruner.update()                       # warm-up: alpha estimated, nothing pruned
    train(30)
    return model, pruner, train


def rows_of(pruner, name):
    """Pruned groups (rows, granularity "output") of one layer."""
    return set((pruner.alpha(name).flatten() == math.inf).nonzero().flatten().tolist())


@pytest.mark.parametrize("backend", ["ext", "torch"])
@pytest.mark.parametrize("fraction", [0.25, 0.5])
def test_an_update_prunes_at_most_the_share_and_keeps_the_least_clear_cut(backend, fraction):
    threshold = 3.0                       # high: the criterion picks most rows
    # what the criterion picks: no group kept back, not even a layer's last
    _, free, _ = prepared(backend=backend, threshold=threshold, allow_empty_layers=True)
    free_report = free.update()
    held_model, held, _ = prepared(backend=backend, threshold=threshold)
    before = {n: (held.weight(n).detach().clone(), held.alpha(n).clone(), held.curvature_estimate(n).clone())
              for n in held.targets}
    held.update(prune=False)              # the same new alpha, nothing pruned
    model, limited, _ = prepared(backend=backend, threshold=threshold, max_prune_fraction=fraction)
    report = limited.update()

    capped_somewhere = False
    for index, name in enumerate(limited.targets):
        weight, old_alpha, h = before[name]
        new_alpha = held.alpha(name).double().flatten()
        n_h = h.double().clamp(min=0) * NUM_DATA
        # independent float64 reference: snr of every row with the update's new alpha
        snr = weight.square().sum(1) / (1.0 / (n_h + new_alpha[:, None])).sum(1)
        gamma = (n_h / (n_h + old_alpha.double().flatten()[:, None])).sum(1)
        picked = rows_of(free, name)
        allowed = math.floor(fraction * weight.shape[0])
        expected = set(sorted(picked, key=lambda r: float(snr[r]))[:allowed]) if len(picked) > allowed else picked
        capped_somewhere |= len(picked) > allowed
        assert rows_of(limited, name) == expected
        restored = sorted(picked - expected)
        layer = report["layers"][index]
        assert layer["limited"] == len(restored)
        if restored:
            assert torch.equal(limited.weight(name).detach()[restored], weight[restored])
            torch.testing.assert_close(limited.alpha(name).double().flatten()[restored], new_alpha[restored])
        free_gamma = free_report["layers"][index]["gamma"]
        assert layer["gamma"] == pytest.approx(free_gamma + float(gamma[restored].sum()), rel=1e-9, abs=1e-12)
        pruned = sorted(expected)
        assert (limited.weight(name).detach()[pruned] == 0).all()
    assert capped_somewhere, "the criterion picked too few rows for the limit to matter"
    assert report["kept"] > free_report["kept"]


def test_a_share_of_one_changes_nothing():
    _, free, _ = prepared(threshold=3.0)
    with pytest.warns(RuntimeWarning, match="strongest group is kept"):
        free.update()
    _, limited, _ = prepared(threshold=3.0, max_prune_fraction=1.0)
    with pytest.warns(RuntimeWarning, match="strongest group is kept"):
        report = limited.update()
    for name in limited.targets:
        assert torch.equal(limited.alpha(name), free.alpha(name))
        assert torch.equal(limited.weight(name), free.weight(name))
    assert all(layer["limited"] == 0 for layer in report["layers"])


def test_a_layer_thins_over_updates_and_never_empties():
    model, pruner, train = prepared(max_prune_fraction=0.5, threshold=1e9)   # every row picked
    name = "2"
    kept = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")       # no "strongest group is kept" warning is needed
        for _ in range(4):
            train(1)
            report = pruner.update()
            kept.append(report["layers"][1]["groups_kept"])
    assert kept == [3, 2, 1, 1]               # floor(6 / 2) = 3 go, then 1 of 3, 1 of 2, none of 1


@pytest.mark.parametrize("value,error", [(0, ValueError), (-0.5, ValueError), (1.5, ValueError),
                                         (float("nan"), ValueError), ("0.5", TypeError), (True, TypeError)])
def test_bad_shares_are_refused_with_the_argument_named(value, error):
    model = nn.Sequential(nn.Linear(4, 3))
    optimizer = MacKayAdam(ard_param_groups(model), lr=1e-2, num_data=10, batch_size=2)
    with pytest.raises(error, match="max_prune_fraction"):
        MacKayPruner(model, optimizer, num_data=10, max_prune_fraction=value)


def channel_prepared(**options):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 12, 3, padding=1), nn.BatchNorm2d(12), nn.ReLU(),
                          nn.Conv2d(12, 10, 3, padding=1), nn.BatchNorm2d(10), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(10, 4)).double()
    optimizer = MacKayAdam(ard_param_groups(model), lr=1e-2, num_data=NUM_DATA, batch_size=16)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(64, 3, 6, 6, generator=g, dtype=torch.float64)
    y = x[:, 0].mean((1, 2)).gt(0).long() + 2 * x[:, 1].mean((1, 2)).gt(0).long()
    pruner = MacKayPruner(model, optimizer, num_data=NUM_DATA, granularity="channel",
                          example_inputs=x[:2], **options)

    def train(steps):
        for step in range(steps):
            index = torch.arange(step * 16, (step + 1) * 16) % 64
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x[index]), y[index]).backward()
            optimizer.step()
    train(20)
    pruner.update()
    train(20)
    return pruner


def channel_pruned(pruner):
    return set((pruner.channel.alpha == math.inf).nonzero().flatten().tolist())


@pytest.mark.parametrize("fraction", [0.3, 0.5])
def test_channel_groups_are_limited_per_parameter_dimension(fraction):
    threshold = 50.0
    free = channel_prepared(threshold=threshold, allow_empty_layers=True)   # what the criterion picks
    free.update()
    limited = channel_prepared(threshold=threshold, max_prune_fraction=fraction)
    section = limited.update()["channel"]
    picked, kept_out = channel_pruned(free), channel_pruned(limited)
    assert kept_out <= picked and section["limited"] == len(picked - kept_out) > 0
    for name, dim, ids in limited.channel.keys:
        here = set(ids[ids >= 0].tolist())
        assert len(kept_out & here) <= math.floor(fraction * len(here)), (name, dim)
    for number in kept_out:                                   # every member of a pruned group is 0
        group = limited.channel.groups[number]
        assert all(bool((values == 0).all()) for _, values in group.slices(limited.model))
    one = channel_prepared(threshold=threshold, max_prune_fraction=1.0, allow_empty_layers=True)
    one.update()
    assert channel_pruned(one) == picked


def test_the_limit_holds_with_a_plain_torch_optimizer():
    """alpha kept by the pruner itself (proximal prior after each SGD step), not by MacKayAdam."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 6))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    pruner = MacKayPruner(model, optimizer, num_data=NUM_DATA, granularity="output", batch_size=32,
                          threshold=1e9, max_prune_fraction=0.25)     # every row picked, a quarter go
    x = torch.randn(NUM_DATA, 20)
    y = x[:, :6].argmax(1)
    kept = []
    for _ in range(3):
        for step in range(8):
            index = torch.arange(step * 32, (step + 1) * 32)
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x[index]), y[index]).backward()
            optimizer.step()
        report = pruner.update()
        kept.append([layer["groups_kept"] for layer in report["layers"]])
    assert kept == [[16, 6], [12, 5], [9, 4]]       # warm-up; then floor(16/4) = 4 and 1 of 6; 3 and 1
    assert (model[0].weight[pruner.alpha("0").flatten() == math.inf] == 0).all()


def test_a_share_of_one_may_empty_a_layer_when_allowed():
    """allow_empty_layers=True still lets the last group go with the limit set."""
    _, free, _ = prepared(threshold=1e9, allow_empty_layers=True)
    free.update()
    _, limited, _ = prepared(threshold=1e9, allow_empty_layers=True, max_prune_fraction=1.0)
    report = limited.update()
    assert all(layer["groups_kept"] == 0 and "kept_strongest" not in layer for layer in report["layers"])
    for name in limited.targets:
        assert torch.equal(limited.alpha(name), free.alpha(name))
