"""Priced removal of a Linear layer's inputs with the other inputs re-fitted
(mackay_ext.mac_compensate): the re-fit against a float64 least-squares solve, two copies of one
input never both removed, the compensated gain against the diagonal one, and the sampling of
E[x x^T] during training."""
import copy
import math

import torch
from torch import nn

from mackay_ext import MacKayPruner
from mackay_ext.mac_compensate import InputCovariance, compensated_price_out
from mackay_ext.mac_price import evidence_gain, price_out


def _layer_and_data(copies: bool = False, seed: int = 0):
    """Inputs 1, 3, 4 nearly dependent (or, copies=True, input 5 a copy of input 2 instead)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(400, 6, generator=g, dtype=torch.float64) + 0.3
    noise = 0.05 * torch.randn(400, generator=g, dtype=torch.float64)
    if not copies:
        x[:, 3] = 0.8 * x[:, 1] - 0.5 * x[:, 4] + noise
    else:
        x[:, 5] = x[:, 2]
    layer = nn.Linear(6, 4).double()
    with torch.no_grad():
        layer.weight.copy_(torch.randn(4, 6, generator=g, dtype=torch.float64))
        layer.bias.copy_(torch.randn(4, generator=g, dtype=torch.float64))
    with_one = torch.cat([x, torch.ones(400, 1, dtype=torch.float64)], dim=1)
    return layer, x, with_one.T @ with_one / 400


def test_a_priced_input_is_refitted_as_least_squares_would():
    layer, x, moment = _layer_and_data()
    target = layer(x).detach()
    curvature = torch.full((4, 6), 1.0, dtype=torch.float64)
    alpha = torch.full((1, 6), 2.0, dtype=torch.float64)
    macs = torch.ones(1, 6, dtype=torch.float64)
    # input 3 is nearly a mix of inputs 1 and 4, so each of the three is nearly a mix of the
    # other two: re-fitted, one of them is worth almost nothing and goes first as the price rises
    count, gamma, new_alpha = _first_to_go(layer, curvature, alpha, moment, macs)
    gone = [i for i in range(6) if new_alpha[0, i] == math.inf]
    assert count == 1 and len(gone) == 1 and gone[0] in (1, 3, 4)
    assert torch.all(layer.weight[:, gone[0]] == 0)
    n_h = 100.0 * curvature[:, gone[0]]
    assert gamma == float((n_h / (n_h + 2.0)).sum())
    # reference: least squares of the old outputs on the other inputs and a constant
    keep = [i for i in range(6) if i != gone[0]]
    design = torch.cat([x[:, keep], torch.ones(400, 1, dtype=torch.float64)], dim=1)
    solution = torch.linalg.lstsq(design, target).solution
    torch.testing.assert_close(layer.weight[:, keep].detach(), solution[:5].T, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.bias.detach(), solution[5], rtol=1e-5, atol=1e-6)


def _first_to_go(layer, curvature, alpha, moment, macs):
    """compensated_price_out at the lowest price of a 5% ladder that removes anything; the layer
    and alpha as that call left them."""
    price, state = 1e-6, {k: v.clone() for k, v in layer.state_dict().items()}
    while True:
        layer.load_state_dict(state)
        new_alpha = alpha.clone()
        count, gamma = compensated_price_out(layer, curvature, new_alpha, alpha, moment, num_data=100.0,
                                             macs=macs, price=price, rule="mackay")
        if count:
            return count, gamma, new_alpha
        price *= 1.05


def test_the_compensated_gain_of_a_redundant_input_is_below_the_diagonal_one():
    layer, _x, moment = _layer_and_data()
    curvature = torch.full((4, 6), 1.0, dtype=torch.float64)
    alpha = torch.full((1, 6), 2.0, dtype=torch.float64)
    diagonal = evidence_gain(layer.weight.detach(), curvature, alpha, num_data=100.0).view(-1)
    macs = torch.ones(1, 6, dtype=torch.float64)
    # a price just under input 3's diagonal gain: the diagonal rule keeps it, the re-fit removes it
    price = float(diagonal[3]) * 0.999
    diagonal_alpha = alpha.clone()
    price_out(layer.weight.detach().clone(), curvature, diagonal_alpha, alpha, num_data=100.0, macs=macs,
              price=price, rule="mackay")
    assert diagonal_alpha[0, 3] == 2.0
    trial_alpha = alpha.clone()
    compensated_price_out(layer, curvature, trial_alpha, alpha, moment, num_data=100.0, macs=macs,
                          price=price, rule="mackay")
    assert trial_alpha[0, 3] == math.inf


def test_two_copies_of_one_input_are_not_both_removed():
    layer, x, moment = _layer_and_data(copies=True)
    target = layer(x).detach()
    curvature = torch.full((4, 6), 1.0, dtype=torch.float64)
    alpha = torch.full((1, 6), 2.0, dtype=torch.float64)
    macs = torch.ones(1, 6, dtype=torch.float64)
    # a copy is worth nothing while the other is there: the first to go as the price rises
    _, _, new_alpha = _first_to_go(layer, curvature, alpha, moment, macs)
    gone = (new_alpha.view(-1) == math.inf).tolist()
    assert gone.count(True) == 1 and (gone[2] or gone[5])    # exactly one of the copies
    torch.testing.assert_close(layer(x).detach(), target, rtol=1e-4, atol=1e-5)   # the other took over (damped A)


def test_groups_not_for_sale_are_kept_and_pruned_inputs_stay_out_of_the_refit():
    layer, _x, moment = _layer_and_data(copies=True)
    with torch.no_grad():
        layer.weight[:, 5] = 0
    alpha = torch.tensor([[0.0, 2.0, 2.0, 2.0, 2.0, math.inf]], dtype=torch.float64)   # 0: prior off
    curvature = torch.full((4, 6), 1.0, dtype=torch.float64)
    new_alpha = alpha.clone()
    compensated_price_out(layer, curvature, new_alpha, alpha, moment, num_data=100.0,
                          macs=torch.ones(1, 6, dtype=torch.float64), price=1e9, rule="mackay")
    assert new_alpha[0, 0] == 0.0 and torch.all(layer.weight[:, 5] == 0)
    assert torch.all(new_alpha[0, 1:] == math.inf)   # everything for sale went, at that price
    assert torch.any(layer.weight[:, 0] != 0)        # input 0 took over, and was not removed


def test_input_covariance_samples_training_forwards_only():
    torch.manual_seed(0)
    layer = nn.Linear(3, 2)
    covariance = InputCovariance({"fc": layer}, every=2, decay=0.5)
    batches = [torch.randn(5, 3) for _ in range(4)]
    for batch in batches:
        layer(batch)
    layer.eval()
    layer(torch.randn(5, 3) * 100)            # eval: not sampled
    layer.train()
    with torch.no_grad():
        layer(torch.randn(5, 3) * 100)        # no grad: not sampled

    def moment(batch):
        ones = torch.cat([batch.double(), torch.ones(5, 1, dtype=torch.float64)], dim=1)
        return ones.T @ ones / 5
    expected = 0.5 * moment(batches[0]) + 0.5 * moment(batches[2])   # forwards 1 and 3 sampled
    torch.testing.assert_close(covariance.second_moment["fc"], expected, rtol=1e-12, atol=1e-12)
    covariance.remove()
    layer(torch.randn(5, 3))
    torch.testing.assert_close(covariance.second_moment["fc"], expected, rtol=1e-12, atol=1e-12)


def test_the_pruner_refits_priced_linear_inputs_and_only_those():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 6 * 6, 5), nn.ReLU(),
                          nn.Linear(5, 3))
    x = torch.randn(16, 1, 8, 8)
    y = torch.randint(0, 3, (16,))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    pruner = MacKayPruner(model, optimizer, num_data=16, batch_size=16, granularity="filter", mac_price=1e-4,
                          example_inputs=x)
    assert sorted(pruner._covariance.second_moment) == []        # nothing sampled yet
    assert set(pruner._covariance._calls) == {"3", "5"}            # the Linear layers, not the conv
    for _ in range(9):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    assert sorted(pruner._covariance.second_moment) == ["3", "5"]
    pruner.detach()
    assert not pruner._covariance._hooks


def test_without_a_bias_the_refit_is_least_squares_without_a_constant():
    layer, x, moment = _layer_and_data()
    plain = nn.Linear(6, 4, bias=False).double()
    with torch.no_grad():
        plain.weight.copy_(layer.weight)
    target = plain(x).detach()
    curvature = torch.full((4, 6), 1.0, dtype=torch.float64)
    alpha = torch.full((1, 6), 2.0, dtype=torch.float64)
    count, _, new_alpha = _first_to_go(plain, curvature, alpha, moment, torch.ones(1, 6, dtype=torch.float64))
    gone = [i for i in range(6) if new_alpha[0, i] == math.inf]
    assert count == 1
    keep = [i for i in range(6) if i != gone[0]]
    solution = torch.linalg.lstsq(x[:, keep], target).solution
    torch.testing.assert_close(plain.weight[:, keep].detach(), solution.T, rtol=1e-5, atol=1e-6)


def test_layers_too_wide_for_the_refit_are_named():
    from mackay_ext import mac_compensate
    model = nn.Sequential(nn.Linear(mac_compensate.REFIT_MAX_INPUTS + 1, 3), nn.ReLU(), nn.Linear(3, 2))
    pruner = MacKayPruner(model, torch.optim.Adam(model.parameters()), num_data=10, batch_size=2,
                          granularity="filter", mac_price=1e-3,
                          example_inputs=torch.randn(2, mac_compensate.REFIT_MAX_INPUTS + 1))
    assert set(pruner._covariance._calls) == {"2"}
    assert "inputs of 0 priced without the re-fit" in pruner.notes["mac_price refit"]


def test_a_resumed_pruner_refits_as_the_uninterrupted_one():
    """The sampled input moments are part of the pruner's state: a pruner rebuilt from
    state_dicts (model, optimizer, pruner) after an update continues bit for bit, inputs priced
    out after the resume included (without the moments it would not)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 12, generator=g)
    x[:, 5] = x[:, 3] + 0.1 * x[:, 4]
    y = (x[:, :3].sum(1) > 0).long() + (x[:, 3] > 0.5).long()

    def build():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 3))
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        pruner = MacKayPruner(model, optimizer, num_data=2000, batch_size=64, granularity="filter",
                              mac_price=1.0, mac_price_ramp=6, example_inputs=x[:2])
        return model, optimizer, pruner

    def train(model, optimizer, pruner, updates):
        for _ in range(updates):
            for _ in range(5):
                optimizer.zero_grad()
                nn.functional.cross_entropy(model(x), y).backward()
                optimizer.step()
            pruner.update()

    def resumed(state):
        other_model, other_optimizer, other = build()
        other_model.load_state_dict(saved[0])
        other_optimizer.load_state_dict(saved[1])
        other.load_state_dict(state)
        train(other_model, other_optimizer, other, 4)
        return other_model, other

    model, optimizer, pruner = build()
    train(model, optimizer, pruner, 3)
    saved = copy.deepcopy([model.state_dict(), optimizer.state_dict(), pruner.state_dict()])
    assert set(saved[2]["input_covariance"]["second_moment"]) == {"0", "2"}
    train(model, optimizer, pruner, 4)
    assert sum(layer.get("priced_out") or 0 for update in pruner.history[3:] for layer in update["layers"]) > 0
    other_model, other = resumed(saved[2])
    for key, value in model.state_dict().items():
        assert torch.equal(other_model.state_dict()[key], value), key
    for name in pruner.targets:
        assert torch.equal(other.alpha(name), pruner.alpha(name))
    forgetful, _ = resumed({k: v for k, v in saved[2].items() if k != "input_covariance"})
    assert not all(torch.equal(forgetful.state_dict()[k], v) for k, v in model.state_dict().items())
