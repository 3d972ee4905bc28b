"""MAC-priced pruning (mackay_ext.mac_price, MacKayPruner(mac_price=...)): the MACs per weight
against torch's FlopCounterMode, the evidence gain against the log evidence written out from
Gaussian densities in float64, the pruning decision group by group, and the pruner's arguments."""
import math

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from mackay_ext import MacKayPruner
from mackay_ext.ard_targets import find_targets
from mackay_ext.mac_price import evidence_gain, price_out, target_uses, weight_uses


class _Tied(nn.Module):
    """Embedding and output layer share one matrix; positions of a sequence reuse the Linear."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(11, 6)
        self.mix = nn.Linear(6, 6, bias=False)
        self.out = nn.Linear(6, 11, bias=False)
        self.out.weight = self.embed.weight

    def forward(self, tokens):
        return self.out(torch.tanh(self.mix(self.embed(tokens))))


MODELS = {
    "conv": (lambda: nn.Sequential(nn.Conv2d(3, 5, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(5),
                                   nn.ReLU(), nn.Conv2d(5, 4, (3, 2), bias=False), nn.Flatten(),
                                   nn.Linear(4 * 4 * 6, 7, bias=False)),
             lambda: torch.randn(3, 3, 11, 13)),
    "conv1d-transpose": (lambda: nn.Sequential(nn.Conv1d(2, 4, 3, bias=False), nn.ReLU(),
                                               nn.ConvTranspose1d(4, 3, 4, stride=2, bias=False)),
                         lambda: torch.randn(2, 2, 9)),
    "sequence": (lambda: nn.Sequential(nn.Linear(5, 8, bias=False), nn.GELU(), nn.Linear(8, 3, bias=False)),
                 lambda: torch.randn(4, 7, 5)),
    "tied": (_Tied, lambda: torch.randint(0, 11, (2, 9))),
}


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_macs_per_weight_add_up_to_torch_flop_count(kind):
    """sum over targets of (weights x uses per example) is what FlopCounterMode counts for one
    example (these models have no bias, so every MAC is a weight's)."""
    make_model, make_input = MODELS[kind]
    torch.manual_seed(0)
    model, x = make_model(), make_input()
    targets, _ = find_targets(model, None, None)
    uses = target_uses(weight_uses(model, x), targets)
    ours = sum(targets[name].param.numel() * uses[name] for name in targets)
    with FlopCounterMode(display=False) as counter:
        model(x)
    assert ours == pytest.approx(counter.get_total_flops() / 2 / x.shape[0], rel=1e-12)


def test_counting_forward_changes_nothing():
    """The forward runs in eval mode without gradients: BatchNorm statistics stay, modes return."""
    make_model, make_input = MODELS["conv"]
    model = make_model().train()
    model[1].eval()   # a mixed-mode model keeps its mix
    stats = model[1].running_mean.clone()
    weight_uses(model, make_input())
    assert torch.equal(model[1].running_mean, stats)
    assert model.training and not model[1].training and model[0].training


def test_a_layer_the_forward_never_runs_is_named():
    class Skips(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.unused = nn.Linear(3, 3), nn.Linear(3, 3)

        def forward(self, x):
            return self.used(x)

    model = Skips()
    uses = weight_uses(model, torch.randn(2, 3))
    with pytest.raises(ValueError, match=r"cannot count the MACs of unused \(Linear.weight, shape \(3, 3\)\): "
                                         r"not the weight of a Linear \(or transformers' Conv1D\), Conv, "
                                         r"ConvTranspose or Embedding that the forward on example_inputs ran"):
        target_uses(uses, find_targets(model, None, None)[0])


def _log_evidence_gain(a, h, alpha):
    """log Z(with the weight) - log Z(weight fixed at 0) for a quadratic log likelihood
    -H (w - a)^2 / 2 and prior N(0, 1/alpha), from Gaussian densities (no Laplace algebra):
    Z_with = sqrt(2 pi / H) N(a; 0, 1/H + 1/alpha), Z_without = exp(-H a^2 / 2)."""
    normal = torch.distributions.Normal(torch.zeros_like(a), (1 / h + 1 / alpha).sqrt())
    return 0.5 * torch.log(2 * math.pi / h) + normal.log_prob(a) + 0.5 * h * a * a


def test_gain_and_decision_against_gaussian_evidence():
    """Per filter of a (6, 2, 3) weight: gain_g computed by price_out from the posterior mean
    m = H a / (alpha + H) equals the sum of the exact Gaussian log evidence ratios of its
    weights; exactly the groups below price x MACs are pruned, the rest untouched."""
    g = torch.Generator().manual_seed(3)
    num_data = 50.0
    a = torch.randn(6, 2, 3, generator=g, dtype=torch.float64) * torch.tensor([0.01, 0.05, 0.1, 0.3, 1.0, 2.0],
                                                                              dtype=torch.float64).view(6, 1, 1)
    h = torch.rand(6, 2, 3, generator=g, dtype=torch.float64) + 0.1           # per-example curvature
    alpha = torch.rand(6, 1, 1, generator=g, dtype=torch.float64) * 5 + 0.5   # one alpha per filter
    big_h = h * num_data
    mean = big_h * a / (alpha + big_h)
    exact = _log_evidence_gain(a, big_h, alpha).sum(dim=(1, 2))
    gain = evidence_gain(mean, h, alpha, num_data=num_data)
    torch.testing.assert_close(gain.view(-1), exact, rtol=1e-10, atol=1e-12)
    uses = 4.0
    macs = 2 * 3 * uses
    price = float(exact.sort().values[2:4].mean()) / macs   # between the third and fourth group
    weight, new_alpha = mean.clone(), alpha.clone().float()
    old_alpha = torch.full_like(new_alpha, 2.0)
    count, gamma = price_out(weight, h, new_alpha, old_alpha, num_data=num_data,
                             macs=torch.full((6, 1, 1), macs, dtype=torch.float64), price=price, rule="mackay")
    expected = exact < price * macs
    assert count == 3 and int(expected.sum()) == 3
    assert torch.equal(new_alpha.view(-1) == math.inf, expected)
    assert torch.equal(weight[expected], torch.zeros_like(weight[expected]))
    assert torch.equal(weight[~expected], mean[~expected])
    assert torch.equal(new_alpha.view(-1)[~expected], alpha.float().view(-1)[~expected])
    gamma_ref = (big_h / (big_h + 2.0)).sum(dim=(1, 2))[expected].sum()
    assert gamma == pytest.approx(float(gamma_ref), rel=1e-12)


def test_pruned_warmup_and_per_weight_groups_are_left_alone():
    weight = torch.tensor([[0.0, 1e-4, 3.0]], dtype=torch.float64)
    alpha = torch.tensor([[math.inf, 0.0, 1.0]])
    count, _ = price_out(weight, torch.ones_like(weight), alpha, alpha.clone(), num_data=10.0,
                         macs=torch.ones_like(weight), price=1e9, rule="mackay")
    assert count == 1   # only the live weight with alpha > 0
    assert alpha.tolist() == [[math.inf, 0.0, math.inf]]


def _train(model, x, y, pruner, optimizer, steps=12):
    for _ in range(steps):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    return pruner.update()


def _conv_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 6, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(6 * 6 * 6, 4))


@pytest.mark.parametrize("optimizer_kind", ["adam", "mackay_adam"])
def test_pruner_price_zero_is_the_old_pruner_and_a_price_prunes_dear_groups(optimizer_kind):
    from mackay_ext import MacKayAdam, ard_param_groups
    x, y = torch.randn(16, 1, 16, 16), torch.arange(16) % 4

    def run(**options):
        model = _conv_net()
        if optimizer_kind == "adam":
            optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
            extra = {"batch_size": 16}
        else:
            optimizer = MacKayAdam(ard_param_groups(model), lr=1e-2, num_data=200, batch_size=16)
            extra = {}
        pruner = MacKayPruner(model, optimizer, num_data=200, granularity="filter", **extra, **options)
        _train(model, x, y, pruner, optimizer)   # warm-up update: alpha from 0
        return model, pruner, _train(model, x, y, pruner, optimizer)

    base_model, base, _ = run()
    zero_model, zero, _ = run(mac_price=0.0)
    for name in base.targets:
        assert torch.equal(base.alpha(name), zero.alpha(name))
    assert all(torch.equal(p, q) for p, q in zip(base_model.parameters(), zero_model.parameters()))
    model, priced, report = run(mac_price=1e3, example_inputs=x[:2], allow_empty_layers=True)
    conv = next(layer for layer in report["layers"] if layer["name"] == "0")
    assert conv["priced_out"] == 6 and conv["groups_kept"] == 0   # every filter costs 25 x 144 MACs
    assert bool((model[0].weight == 0).all())
    assert priced.state_dict()["settings"]["mac_price"] == 1e3


def test_pruner_arguments():
    model, x = _conv_net(), torch.randn(2, 1, 16, 16)
    optimizer = torch.optim.Adam(model.parameters())
    for bad in (-1.0, math.nan, math.inf, True, "1"):
        error = TypeError if isinstance(bad, (bool, str)) else ValueError   # the type, as the other options
        with pytest.raises(error, match=r"mac_price must be a finite number >= 0"):
            MacKayPruner(model, optimizer, num_data=10, batch_size=2, mac_price=bad, example_inputs=x)
    with pytest.raises(ValueError, match=r"mac_price > 0 needs example_inputs="):
        MacKayPruner(model, optimizer, num_data=10, batch_size=2, mac_price=1e-3)
    with pytest.raises(ValueError, match=r"example_inputs is used by granularity='channel' and mac_price > 0"):
        MacKayPruner(model, optimizer, num_data=10, batch_size=2, example_inputs=x)


# ---------------------------------------------------------------- coupled channel groups
def _channel_net():
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(2, 5, 3, bias=False), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(5, 3, 3, bias=False), nn.Flatten(), nn.Linear(3 * 4 * 4, 4, bias=False))


def test_channel_group_macs_are_what_shrinking_the_group_removes():
    """MACs of a coupled group (a filter with its consumers' input slices) against the MACs
    FlopCounterMode counts before and after shrink removes that group alone."""
    from mackay_ext.shrink import count_macs, shrink
    x = torch.randn(2, 2, 14, 14)
    model = _channel_net()
    pruner = MacKayPruner(model, torch.optim.Adam(model.parameters()), num_data=10, batch_size=2,
                          granularity="channel", mac_price=1e-6, example_inputs=x)
    channel = pruner.channel
    full = count_macs(model, x[:1])
    for number, group in enumerate(channel.groups):
        copy = _channel_net()
        group.zero_(copy)
        small = shrink(copy, x[:1])
        assert float(channel.macs[number]) == full - count_macs(small, x[:1]), repr(group)


def _chain_live_macs(weights: list[torch.Tensor]) -> int:
    """MACs of a chain of Linear layers with every dead unit removed, by fixpoint: a hidden unit
    lives while it has a non-zero weight from a live input and one to a live output (the last
    layer's outputs always live); an input lives while a live unit reads it."""
    nonzero = [w != 0 for w in weights]
    alive = [torch.ones(w.shape[1], dtype=torch.bool) for w in weights] + [torch.ones(weights[-1].shape[0],
                                                                                      dtype=torch.bool)]
    for _ in range(len(weights) + 2):
        for layer in range(len(weights) - 1, -1, -1):   # readers: a unit with no live output dies
            reads = (nonzero[layer] & alive[layer + 1].view(-1, 1)).any(dim=0)
            alive[layer] = alive[layer] & reads
        for layer in range(1, len(weights)):             # writers: a unit with no live input dies
            fed = (nonzero[layer - 1] & alive[layer - 1].view(1, -1)).any(dim=1)
            alive[layer] = alive[layer] & fed
    return sum(int((nonzero[i] & alive[i + 1].view(-1, 1) & alive[i].view(1, -1)).sum())
               for i in range(len(weights)))


def test_freed_macs_of_input_groups_are_what_the_network_loses():
    """granularity='filter' on an MLP (one alpha per input of each Linear): MACs_g is what the full
    network with its dead units removed loses when the group goes: a pixel's column, a hidden
    unit's outgoing column and its incoming row."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(7, 6), nn.ReLU(), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    x = torch.randn(4, 7)
    pruner = MacKayPruner(model, torch.optim.Adam(model.parameters()), num_data=10, batch_size=4,
                          granularity="filter", mac_price=1e-3, example_inputs=x)
    weights = [model[i].weight.detach().clone() for i in (0, 2, 4)]
    full = _chain_live_macs(weights)
    checked = 0
    for name, target in pruner.targets.items():
        layer = [0, 2, 4].index(int(name.split(".")[0]))
        macs = pruner._freed.group_macs(target.param, pruner.alpha(name)).view(-1)
        assert macs.numel() == weights[layer].shape[1]   # one group per input
        for column in range(weights[layer].shape[1]):
            cut = [w.clone() for w in weights]
            cut[layer][:, column] = 0
            assert float(macs[column]) == full - _chain_live_macs(cut), (name, column)
            checked += 1
    assert checked == 7 + 6 + 5
    with torch.no_grad():   # the full network's MACs: zeros made later change nothing
        model[0].weight[3] = 0
    assert float(pruner._freed.group_macs(model[2].weight, pruner.alpha("2")).view(-1)[3]) == 5 + 7


def test_freed_macs_of_one_weight_groups_are_their_own():
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    pruner = MacKayPruner(model, torch.optim.Adam(model.parameters()), num_data=10, batch_size=4,
                          granularity="weight", mac_price=1e-3, example_inputs=torch.randn(2, 4))
    macs = pruner._freed.group_macs(model[2].weight, pruner.alpha("2"))
    assert macs.shape == (2, 3) and torch.all(macs == 1)


def test_freed_macs_of_filters_include_their_readers():
    """granularity='filter' on convs: a filter that is its channel's only writer also frees the
    next conv's (or, through Flatten, the Linear's) input slice; shrink is the reference."""
    from mackay_ext.coupling import channel_groups
    from mackay_ext.shrink import count_macs, shrink
    x = torch.randn(2, 2, 14, 14)
    model = _channel_net()
    pruner = MacKayPruner(model, torch.optim.Adam(model.parameters()), num_data=10, batch_size=4, granularity="filter",
                          mac_price=1e-6, example_inputs=x)
    full = count_macs(_channel_net(), x[:1])   # a copy without the pruner's hooks
    groups = channel_groups(model, x[:1])
    for name in ("0.weight", "3.weight"):
        macs = pruner._freed.group_macs(model.get_parameter(name), pruner.alpha(name.split(".")[0])).view(-1)
        for filter_index in range(macs.numel()):
            group = next(g for g in groups if any(m.name == name and m.dim == 0 and m.indices == (filter_index,)
                                                  for m in g.members))
            copy = _channel_net()
            group.zero_(copy)
            assert float(macs[filter_index]) == full - count_macs(shrink(copy, x[:1]), x[:1]), (name, filter_index)


def test_channel_groups_are_priced_by_the_gain_of_all_their_members():
    """A conv filter is in two groups (its own output channel and its input channel's): each entry's
    prior is alpha_eff = the sum of its groups' alphas. Reference: alpha_eff built entry by entry
    from the groups' member slices, per-entry gains from evidence_gain (checked above against the
    Gaussian evidence), summed over each group's slices; exactly the groups below price x MACs go."""
    from mackay_ext.mac_price import channel_priced_out
    x, y = torch.randn(8, 2, 14, 14), torch.arange(8) % 4
    model = _channel_net()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    pruner = MacKayPruner(model, optimizer, num_data=100, batch_size=8, granularity="channel",
                          mac_price=1e-6, example_inputs=x[:2])
    _train(model, x, y, pruner, optimizer)   # warm-up: alpha from 0
    channel = pruner.channel
    new = channel.alpha.clone() * torch.linspace(0.5, 2.0, len(channel.alpha), dtype=torch.float64)
    alpha_eff = {name: torch.zeros_like(p, dtype=torch.float64) for name, p in model.named_parameters()}
    for group, alpha in zip(channel.groups, new):
        for m in group.members:   # each entry adds the alpha of every group it is in
            alpha_eff[m.name] += torch.zeros_like(alpha_eff[m.name]).index_fill_(
                m.dim, torch.tensor(m.indices), float(alpha))
    gains = torch.zeros(len(channel.groups), dtype=torch.float64)
    per_entry = {name: evidence_gain(model.get_parameter(name).detach(), channel.curvature_estimate(name),
                                     alpha_eff[name], num_data=100.0)
                 for name in channel.members}
    for number, group in enumerate(channel.groups):
        for m in group.members:
            gains[number] += float(per_entry[m.name].index_select(m.dim, torch.tensor(m.indices)).sum())
    per_mac = gains / channel.macs
    price = float(per_mac.sort().values[len(per_mac) // 2 - 1: len(per_mac) // 2 + 1].mean())
    priced = channel_priced_out(channel, new, 100.0, price)
    assert torch.equal(priced, per_mac < price)
    assert 0 < int(priced.sum()) < len(priced)


def test_channel_pruner_reports_priced_groups_and_keeps_them_zero():
    x, y = torch.randn(8, 2, 14, 14), torch.arange(8) % 4
    model = _channel_net()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    pruner = MacKayPruner(model, optimizer, num_data=100, batch_size=8, granularity="channel",
                          mac_price=1e3, example_inputs=x[:2], allow_empty_layers=True,
                          threshold=0.0)   # the snr criterion off: what goes, the price took
    assert _train(model, x, y, pruner, optimizer)["channel"]["priced_out"] == 0   # warm-up prunes nothing
    report = _train(model, x, y, pruner, optimizer)
    assert report["channel"]["priced_out"] == len(pruner.channel.groups)
    _train(model, x, y, pruner, optimizer, steps=3)
    assert bool((model[0].weight == 0).all()) and bool((model[3].weight == 0).all())


@pytest.mark.parametrize("granularity", ["filter", "channel"])
def test_price_ramps_over_pruning_updates_and_resumes(granularity):
    """mac_price_ramp=3: the warm-up update charges nothing and does not count; the pruning
    updates then charge 1/3, 2/3, 3/3 of the price, then the price; a pruner loaded from a
    state dict continues the ramp where it stood."""
    x, y = torch.randn(8, 2, 14, 14), torch.arange(8) % 4

    def build(model):
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        return optimizer, MacKayPruner(model, optimizer, num_data=100, batch_size=8, granularity=granularity,
                                       mac_price=0.3, mac_price_ramp=3, example_inputs=x[:2],
                                       allow_empty_layers=True)

    model = _channel_net()
    optimizer, pruner = build(model)
    prices = [_train(model, x, y, pruner, optimizer, steps=2)["mac_price"] for _ in range(3)]
    assert prices == pytest.approx([0.1, 0.1, 0.2])   # warm-up (not counted), then 1/3, 2/3
    state = pruner.state_dict()
    assert state["priced_updates"] == 2
    other_model = _channel_net()
    other_optimizer, other = build(other_model)
    other.load_state_dict(state)
    assert other.current_mac_price() == pytest.approx(0.3)
    assert _train(other_model, x, y, other, other_optimizer, steps=2)["mac_price"] == pytest.approx(0.3)
    assert _train(other_model, x, y, other, other_optimizer, steps=2)["mac_price"] == pytest.approx(0.3)


def test_ramp_argument():
    model, x = _conv_net(), torch.randn(2, 1, 16, 16)
    for bad in (0, -2, 1.5, True, "3"):
        error = ValueError if bad in (0, -2) and not isinstance(bad, bool) else TypeError
        with pytest.raises(error, match=r"mac_price_ramp must be an int >= 1 \(pruning updates\)"):
            MacKayPruner(model, torch.optim.Adam(model.parameters()), num_data=10, batch_size=2,
                         mac_price=1e-3, mac_price_ramp=bad, example_inputs=x)


class _Branchy(nn.Module):
    """A forward torch.export cannot trace (it branches on a value)."""

    def __init__(self):
        super().__init__()
        self.first, self.second = nn.Linear(4, 3), nn.Linear(3, 2)

    def forward(self, x):
        hidden = torch.relu(self.first(x))
        if float(hidden.detach().sum()) > -1.0:
            hidden = hidden * 2
        return self.second(hidden)


def test_an_untraceable_model_is_priced_by_each_groups_own_weights_and_says_so():
    model = _Branchy()
    pruner = MacKayPruner(model, torch.optim.Adam(model.parameters()), num_data=10, batch_size=2,
                          granularity="filter", mac_price=1e-3, example_inputs=torch.randn(2, 4))
    assert "channels not traced" in pruner.notes["mac_price"]
    macs = pruner._freed.group_macs(model.second.weight, pruner.alpha("second")).view(-1)
    assert macs.tolist() == [2.0, 2.0, 2.0]   # its own column only: the unit's row is not charged
