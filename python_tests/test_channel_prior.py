"""channel_prior="norm-scale" (MacKayPruner(granularity="channel"), mackay_ext.channel_ard): the
prior of a channel that passes through a BatchNorm (InstanceNorm, GroupNorm) sits on the norm's scale alone. Against a
per-entry float64 reference; the alphas do not move when a filter before BatchNorm is rescaled
(which changes nothing the network computes), while the members prior's do; pruned groups stay
exactly 0 in training; settings, state and bad input."""
import copy
import math
import warnings

import pytest
import torch
from test_channel_ard import N, key_of, randomise_curvature
from torch import nn

from mackay_ext.optim import MacKayAdam, ard_param_groups
from mackay_ext.pruner import MacKayPruner

INF = math.inf


class BnChain(nn.Module):
    """fc1 (3 -> 4), BatchNorm, fc2 (4 -> 5), fc3 (5 -> 2). Groups A_o (fc1's rows, the norm's
    entries, fc2's columns; prior on bn.weight[o] alone) and B_p (fc2's rows, fc3's columns; no
    norm, so the prior stays on every member)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.bn, self.fc2, self.fc3 = nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 5), nn.Linear(5, 2)

    def forward(self, x):
        return self.fc3(torch.tanh(self.fc2(torch.tanh(self.bn(self.fc1(x))))))


def bn_chain_groups():
    """key -> (every member entry, the entries that carry the group's prior)."""
    groups = {}
    for o in range(4):
        members = ([("fc1.weight", (o, j)) for j in range(3)] + [("fc1.bias", (o,)), ("bn.weight", (o,)),
                   ("bn.bias", (o,))] + [("fc2.weight", (p, o)) for p in range(5)])
        groups[("A", o)] = (members, [("bn.weight", (o,))])
    for p in range(5):
        members = ([("fc2.weight", (p, o)) for o in range(4)] + [("fc2.bias", (p,))]
                   + [("fc3.weight", (k, p)) for k in range(2)])
        groups[("B", p)] = (members, members)
    return groups


def entry_groups(groups):
    """entry -> the groups it belongs to (holders), and -> the groups whose prior it carries."""
    holders, carriers = {}, {}
    for key, (members, prior) in groups.items():
        for entry in members:
            holders.setdefault(entry, []).append(key)
        for entry in prior:
            carriers.setdefault(entry, []).append(key)
    return holders, carriers


def _inverse(x):
    return 1.0 / x if x != 0 else INF


def reference_update(params, curvature, alpha, groups, *, rule, threshold, can_prune, eps=1e-16):
    """Per-entry float64 reference: an entry's prior precision is the sum of the alphas of the
    groups whose prior it carries, +inf once any group it belongs to is pruned."""
    holders, carriers = entry_groups(groups)

    def alpha_eff(entry, alphas):
        if any(alphas[k] == INF for k in holders[entry]):
            return INF
        return sum(alphas[k] for k in carriers.get(entry, []))

    def n_h(name, index):
        return N * max(float(curvature[name][index]), 0.0)

    new = {}
    for key, (_, prior) in groups.items():
        if alpha[key] == INF:
            new[key] = INF
            continue
        numerator = squared = count = 0.0
        for name, index in prior:
            a_eff = alpha_eff((name, index), alpha)
            if a_eff == INF:
                continue
            h = n_h(name, index)
            gamma, ratio = (1.0, 1.0 / len(carriers[(name, index)])) if a_eff == 0 else (h / (h + a_eff), alpha[key] / a_eff)
            squared += float(params[name][index]) ** 2
            numerator += ratio * gamma if rule == "mackay" else ratio
            count += 1
        new[key] = numerator / (squared + eps) if rule == "mackay" else count / (squared + eps)
    if can_prune:
        drops = []
        for key, (_, prior) in groups.items():
            live = [e for e in prior if alpha_eff(e, new) != INF]
            if new[key] == INF or not live:
                continue
            squared = sum(float(params[n][i]) ** 2 for n, i in live)
            sigma = sum(_inverse(n_h(n, i) + alpha_eff((n, i), new)) for n, i in live)
            if squared < threshold * sigma:
                drops.append(key)
        new.update({key: INF for key in drops})
    return new, alpha_eff


def bn_chain_pruner(**options):
    torch.manual_seed(3)
    model = BnChain().double()
    with torch.no_grad():
        model.bn.weight.uniform_(0.5, 1.5)      # scales that differ, so the groups differ
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    pruner = MacKayPruner(model, optimizer, num_data=N, granularity="channel", channel_prior="norm-scale",
                          example_inputs=torch.randn(2, 3, dtype=torch.float64), allow_empty_layers=True,
                          batch_size=8, **options)
    return model, optimizer, pruner


@pytest.mark.parametrize("rule", ["mackay", "paper"])
def test_update_matches_a_per_entry_float64_reference(rule):
    # (snr under both rules: a channel's members carry priors of their own scale, so the paper
    # rule's snr is a test there, and no note is said)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*rule='paper'")
        model, optimizer, pruner = bn_chain_pruner(rule=rule, prune="snr")
    groups = bn_chain_groups()
    assert sorted(key_of(g, "chain") for g in pruner.channel.groups) == sorted(groups)
    assert pruner.channel.on_scale.tolist() == [key_of(g, "chain")[0] == "A" for g in pruner.channel.groups]
    generator = torch.Generator().manual_seed(11)
    alpha = {key: 0.0 for key in groups}
    pruned_any = False
    for round_ in range(3):
        curvature = randomise_curvature(model, pruner, generator)
        params = {n: p.detach().clone() for n, p in model.named_parameters()}
        probe, _ = reference_update(params, curvature, alpha, groups, rule=rule, threshold=0.0, can_prune=False)
        snrs = sorted(_snr(params, curvature, probe, groups, k) for k in groups if probe[k] != INF)
        pruner.threshold = snrs[len(snrs) // 3] * 1.0001
        expected, alpha_eff = reference_update(params, curvature, alpha, groups, rule=rule,
                                               threshold=pruner.threshold, can_prune=round_ > 0)
        pruner.update()
        got = {key_of(g, "chain"): float(a) for g, a in zip(pruner.channel.groups, pruner.channel.alpha)}
        for key in groups:
            assert got[key] == pytest.approx(expected[key], rel=1e-12), (round_, key)
        pruned_any |= any(v == INF for v in got.values())
        # what the step reads: the carried alphas, +inf (and the weight 0) where a holder is pruned
        for name, param in model.named_parameters():
            if name not in pruner.channel.members:
                continue
            want = torch.zeros(param.shape, dtype=torch.float64)
            for index in [tuple(i) for i in torch.ones(param.shape).nonzero().tolist()]:
                if any((name, index) in members for members, _ in groups.values()):
                    want[index] = alpha_eff((name, index), expected)
            assert torch.allclose(pruner.channel.alpha_eff(name).double(), want, rtol=1e-6, atol=0), name
            assert (param[want == INF] == 0).all(), name
        alpha = expected
        optimizer.step()
    assert pruned_any


def _snr(params, curvature, alphas, groups, key):
    holders, carriers = entry_groups(groups)
    live = [e for e in groups[key][1] if not any(alphas[k] == INF for k in holders[e])]
    squared = sum(float(params[n][i]) ** 2 for n, i in live)
    sigma = sum(_inverse(N * max(float(curvature[n][i]), 0.0) + sum(alphas[k] for k in carriers[(n, i)]))
                for n, i in live)
    return squared / sigma


class ConvBn(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6, eps=1e-12)
        self.fc1, self.fc2 = nn.Linear(6 * 4 * 4, 7), nn.Linear(7, 3)

    def forward(self, x):
        x = nn.functional.max_pool2d(torch.relu(self.bn(self.conv(x))), 2)
        return self.fc2(torch.tanh(self.fc1(x.flatten(1))))


def alphas_with_filters_scaled(make, channels: int, channel_prior: str):
    """The channel alphas after the warm-up update and one with gamma < 1, with the first
    `channels` filters of make()'s conv at x1 and at x10 (the same function under a norm that
    divides their scale out); which groups hold those filters; the last pruner; the inputs."""
    x = torch.randn(8, 2, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    alphas = []
    for factor in (1.0, 10.0):
        torch.manual_seed(0)
        model = make().double()
        with torch.no_grad():
            model.conv.weight[:channels] *= factor
            model.conv.bias[:channels] *= factor
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
        pruner = MacKayPruner(model, optimizer, num_data=N, granularity="channel", channel_prior=channel_prior,
                              example_inputs=x[:2], batch_size=8)
        for _ in range(2):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
            pruner.update(prune=False)
        alphas.append(pruner.channel.alpha.clone())
    scaled = torch.tensor([any(m.name == "conv.weight" and m.dim == 0 and m.indices[0] < channels for m in g.members)
                           for g in pruner.channel.groups])
    return alphas, scaled, pruner, x


@pytest.mark.parametrize("channel_prior", ["norm-scale", "members"])
def test_rescaling_a_filter_before_batchnorm_moves_only_the_members_prior(channel_prior):
    """In training mode BatchNorm divides a filter's scale out: filters x10 compute the same
    function. The norm-scale prior's alphas (and so its pruning) stay; the members prior's alpha
    of those channels falls ~100x, set by a norm the data says nothing about."""
    alphas, scaled, _, _ = alphas_with_filters_scaled(ConvBn, 3, channel_prior)
    assert scaled.sum() == 3
    if channel_prior == "norm-scale":
        torch.testing.assert_close(alphas[1], alphas[0], rtol=1e-6, atol=0)
    else:
        ratio = alphas[0][scaled] / alphas[1][scaled]
        assert (ratio > 20).all(), ratio


class ConvGn(nn.Module):
    """conv (2 -> 6), GroupNorm with 3 groups of 2 channels, pool, fc1, fc2."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 6, 3, padding=1)
        self.gn = nn.GroupNorm(3, 6, eps=1e-12)
        self.fc1, self.fc2 = nn.Linear(6 * 4 * 4, 7), nn.Linear(7, 3)

    def forward(self, x):
        x = nn.functional.max_pool2d(torch.relu(self.gn(self.conv(x))), 2)
        return self.fc2(torch.tanh(self.fc1(x.flatten(1))))


@pytest.mark.parametrize("channel_prior", ["norm-scale", "members"])
def test_a_groupnorm_is_a_norm_scale_too(channel_prior):
    """A GroupNorm divides out the joint scale of the filters of each of its groups (a new user's
    GroupNorm U-Net kept every channel, with no word about the prior). The trace couples a norm
    group's channels into one channel group; its norm-scale prior sits on the GroupNorm's scale
    entries, so rescaling that group's filters (the same function) leaves its alpha where it
    was, while the members prior's falls ~100x; the default prior there is warned about."""
    alphas, scaled, pruner, x = alphas_with_filters_scaled(ConvGn, 2, channel_prior)   # norm group 0
    assert scaled.sum() == 1                          # the norm group's two channels are one group
    if channel_prior == "norm-scale":
        assert not pruner.channel.alpha_eff("conv.weight").any()
        assert pruner.channel.alpha_eff("gn.weight").gt(0).all()
        torch.testing.assert_close(alphas[1], alphas[0], rtol=1e-6, atol=0)
    else:
        ratio = alphas[0][scaled] / alphas[1][scaled]
        assert (ratio > 20).all(), ratio
    fresh = ConvGn().double()
    with pytest.warns(UserWarning, match="pass through a BatchNorm, InstanceNorm or GroupNorm"):
        MacKayPruner(fresh, torch.optim.SGD(fresh.parameters(), lr=0.0), num_data=N, granularity="channel",
                     example_inputs=x[:2], batch_size=8)


def test_pruned_groups_stay_zero_in_training_and_the_filters_get_no_prior():
    torch.manual_seed(0)
    model = ConvBn().double()
    x = torch.randn(32, 2, 8, 8, dtype=torch.float64)
    y = torch.randint(0, 3, (32,))
    optimizer = MacKayAdam(ard_param_groups(model), lr=1e-2, num_data=N, batch_size=32)
    pruner = MacKayPruner(model, optimizer, num_data=N, granularity="channel", channel_prior="norm-scale",
                          example_inputs=x[:2], threshold=1e9)

    def train(steps):
        for _ in range(steps):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
    train(5)
    pruner.update()                             # warm-up
    assert not pruner.channel.alpha_eff("conv.weight").any()     # scale-free: no prior
    assert pruner.channel.alpha_eff("bn.weight").gt(0).all()
    train(5)
    with pytest.warns(RuntimeWarning, match="strongest group is kept"):
        pruner.update()                         # the threshold prunes all but one group per layer
    gone = [g for g, a in zip(pruner.channel.groups, pruner.channel.alpha) if a == INF]
    assert gone
    train(10)
    for group in gone:
        assert group.is_zero(model), group


def test_settings_state_round_trip_and_bad_input():
    model, optimizer, pruner = bn_chain_pruner()
    generator = torch.Generator().manual_seed(1)
    for _ in range(2):
        randomise_curvature(model, pruner, generator)
        pruner.update()
        optimizer.step()                        # lr = 0: the weights stay
    state = pruner.state_dict()
    assert state["settings"]["channel_prior"] == "norm-scale"
    pruner.detach()
    again = MacKayPruner(model, optimizer, num_data=N, granularity="channel", channel_prior="norm-scale",
                         example_inputs=torch.randn(2, 3, dtype=torch.float64), batch_size=8)
    again.load_state_dict(state)
    torch.testing.assert_close(again.channel.alpha, pruner.channel.alpha)
    for name in pruner.channel.members:
        torch.testing.assert_close(again.channel.alpha_eff(name), pruner.channel.alpha_eff(name))
    again.detach()

    with pytest.raises(ValueError, match="channel_prior"):
        MacKayPruner(model, optimizer, num_data=N, granularity="channel", channel_prior="scale",
                     example_inputs=torch.randn(2, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="channel_prior='norm-scale'.*granularity='channel', got 'filter'"):
        MacKayPruner(model, optimizer, num_data=N, granularity="filter", channel_prior="norm-scale")


def test_without_a_batchnorm_it_is_the_members_prior_and_says_so():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    inputs = torch.randn(2, 3, dtype=torch.float64)
    twin = copy.deepcopy(model)   # one pruner per weight: the second prior on a copy
    pruners = [MacKayPruner(net, torch.optim.SGD(net.parameters(), lr=0.0), num_data=N, granularity="channel",
                            channel_prior=prior, example_inputs=inputs, batch_size=8)
               for net, prior in ((model, "members"), (twin, "norm-scale"))]
    assert any("no group passes through a BatchNorm" in note for note in pruners[1].channel.notes)
    generator = torch.Generator().manual_seed(2)
    curvature = randomise_curvature(model, pruners[0], generator)
    for name, h in curvature.items():
        if name in pruners[1].channel.members:
            pruners[1].channel.curvature(name).copy_(h)
    for pruner in pruners:
        pruner.update()
    torch.testing.assert_close(pruners[1].channel.alpha, pruners[0].channel.alpha)
