"""Channel ARD (MacKayPruner(granularity="channel"), mackay_ext.channel_ard): the group update
against a per-entry float64 reference on tiny models whose groups are written out by hand, the
alpha_eff the optimizer reads, training that prunes a CNN with BatchNorm and a residual add down to
groups that stay exactly 0 and shrink to an equal smaller model, the pruner's guarantees, bad input."""
import math
import re
import warnings
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from conftest import train_steps
from torch import nn

import mackay_ext
from mackay_ext import NonFiniteError
from mackay_ext.cli.prune import _accuracy_loss_warning
from mackay_ext.coupling import CouplingError
from mackay_ext.optim import MacKayAdam, ard_param_groups
from mackay_ext.pruner import MacKayPruner

N = 50.0
INF = math.inf


# -- tiny models and their groups, by hand ------------------------------------------------------
class Chain(nn.Module):
    """fc1 (3 -> 4), fc2 (4 -> 5), fc3 (5 -> 2): fc2.weight[p, o] is in two groups, A_o and B_p."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(3, 4), nn.Linear(4, 5), nn.Linear(5, 2)

    def forward(self, x):
        return self.fc3(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))


def chain_groups():
    """group key -> list of entries (parameter name, index)."""
    groups = {}
    for o in range(4):
        groups[("A", o)] = ([("fc1.weight", (o, j)) for j in range(3)] + [("fc1.bias", (o,))]
                            + [("fc2.weight", (p, o)) for p in range(5)])
    for p in range(5):
        groups[("B", p)] = ([("fc2.weight", (p, o)) for o in range(4)] + [("fc2.bias", (p,))]
                            + [("fc3.weight", (k, p)) for k in range(2)])
    return groups


class Skip(nn.Module):
    """h = fc1(x); h = h + fc2(tanh h); fc3(tanh h): the add puts fc2's rows and columns of channel c
    in one group C_c, so fc2.weight[c, c] is in C_c once and fc2.weight[c, d] in C_c and C_d."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(3, 4), nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):
        h = self.fc1(x)
        h = h + self.fc2(torch.tanh(h))
        return self.fc3(torch.tanh(h))


def skip_groups():
    groups = {}
    for c in range(4):
        entries = ([("fc1.weight", (c, j)) for j in range(3)] + [("fc1.bias", (c,))]
                   + [("fc2.weight", (c, d)) for d in range(4)] + [("fc2.weight", (d, c)) for d in range(4) if d != c]
                   + [("fc2.bias", (c,))] + [("fc3.weight", (k, c)) for k in range(2)])
        groups[("C", c)] = entries
    return groups


TINY = {"chain": (Chain, chain_groups), "skip": (Skip, skip_groups)}


def key_of(group, kind):
    """The hand key of a traced ChannelGroup, by its producer's rows."""
    rows = {m.name: m.indices[0] for m in group.members if m.dim == 0 and m.name.endswith("weight")}
    if "fc1.weight" in rows:
        return ("A" if kind == "chain" else "C", rows["fc1.weight"])
    return ("B", rows["fc2.weight"])


def _inverse(x):
    return 1.0 / x if x != 0 else INF       # Sigma_ii of an entry with neither data nor prior


def reference_update(params, curvature, alpha, groups, *, rule, prune, threshold, can_prune, eps=1e-16):
    """Per-entry float64 reference of the channel-ARD update (module docstring of channel_ard).
    params, curvature: name -> float64 tensor; alpha: key -> float. Returns the new alphas."""
    member_of = {}
    for key, entries in groups.items():
        for entry in entries:
            member_of.setdefault(entry, []).append(key)

    def alpha_eff(entry, alphas):
        return sum(alphas[g] for g in member_of[entry])

    new = {}
    for key, entries in groups.items():
        if alpha[key] == INF:
            new[key] = INF
            continue
        numerator = squared = sigma = count = 0.0
        for name, index in entries:
            a_eff = alpha_eff((name, index), alpha)
            if a_eff == INF:
                continue            # held at 0 by another pruned group
            w = float(params[name][index])
            n_h = N * max(float(curvature[name][index]), 0.0)
            if a_eff == 0:
                gamma, ratio = 1.0, 1.0 / len(member_of[(name, index)])
            else:
                gamma, ratio = n_h / (n_h + a_eff), alpha[key] / a_eff
            squared += w * w
            sigma += _inverse(n_h + a_eff)
            count += 1
            numerator += ratio * gamma if rule == "mackay" else ratio
        if rule == "mackay":
            new[key] = numerator / (squared + eps)
        elif rule == "em":
            new[key] = numerator / (squared + sigma)
        else:
            new[key] = count / (squared + eps)
    if can_prune:
        drops = []                      # every group decided on the same new alphas
        for key, entries in groups.items():
            if new[key] == INF:
                continue
            if prune == "alpha":
                drop = new[key] >= threshold
            else:
                live = [e for e in entries if alpha_eff(e, new) != INF]
                squared = sum(float(params[n][i]) ** 2 for n, i in live)
                sigma = sum(_inverse(N * max(float(curvature[n][i]), 0.0) + alpha_eff((n, i), new)) for n, i in live)
                drop = squared < threshold * sigma
            if drop:
                drops.append(key)
        new.update({key: INF for key in drops})
    return new


def tiny_pruner(kind, optimizer_kind="sgd", **options):
    make, hand = TINY[kind]
    torch.manual_seed(3)
    model = make().double()
    if optimizer_kind == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
        options.setdefault("batch_size", 8)
    elif optimizer_kind == "adam":      # biases in an ard=False group: tracked by the pruner
        optimizer = MacKayAdam(ard_param_groups(model), lr=0.0, num_data=N, batch_size=8)
    else:                               # every parameter in the ARD group: biases' state alpha
        optimizer = MacKayAdam(model.parameters(), lr=0.0, num_data=N, batch_size=8)
    pruner = MacKayPruner(model, optimizer, num_data=N, granularity="channel",
                          example_inputs=torch.randn(2, 3, dtype=torch.float64), allow_empty_layers=True,
                          **options)
    return model, optimizer, pruner, hand()


def randomise_curvature(model, pruner, generator, zero_share=0.2):
    """Random h >= 0 (some exactly 0) on every member; returns name -> float64 copy."""
    out = {}
    for name, param in model.named_parameters():
        h = torch.rand(param.shape, generator=generator, dtype=torch.float64) * 2.0
        h[torch.rand(param.shape, generator=generator) < zero_share] = 0.0
        if name in pruner.channel.members:
            pruner.channel.curvature(name).copy_(h)
        out[name] = h
    return out


def hand_alpha(pruner, kind):
    return {key_of(g, kind): float(a) for g, a in zip(pruner.channel.groups, pruner.channel.alpha)}


@pytest.mark.parametrize("kind", ["chain", "skip"])
@pytest.mark.parametrize("rule,prune", [("mackay", "snr"), ("em", "snr"), ("paper", "snr"), ("mackay", "alpha")])
def test_update_matches_a_per_entry_float64_reference(kind, rule, prune):
    model, optimizer, pruner, groups = tiny_pruner(kind, rule=rule, prune=prune)
    assert sorted(key_of(g, kind) for g in pruner.channel.groups) == sorted(groups)
    generator = torch.Generator().manual_seed(7)
    alpha = {key: 0.0 for key in groups}
    for round_ in range(3):
        curvature = randomise_curvature(model, pruner, generator, zero_share=0.2)
        params = {n: p.detach().clone() for n, p in model.named_parameters()}
        can_prune = round_ > 0
        # em from alpha = 0 starts from MacKay's estimate (an entry with h = 0 would have an
        # infinite Sigma and keep its group at 0 for ever)
        rule_now = "mackay" if rule == "em" and round_ == 0 else rule
        # a threshold between the groups' values, so that some are pruned and some are not
        probe = reference_update(params, curvature, alpha, groups, rule=rule_now, prune=prune, threshold=0.0,
                                 can_prune=False)
        if prune == "snr":
            ratios = sorted(_snr(params, curvature, probe, groups, key) for key in groups if probe[key] != INF)
        else:
            ratios = sorted(v for v in probe.values() if v != INF)
        threshold = ratios[len(ratios) // 3] * 1.0001
        pruner.threshold = threshold
        expected = reference_update(params, curvature, alpha, groups, rule=rule_now, prune=prune,
                                    threshold=threshold, can_prune=can_prune)
        report = pruner.update()
        got = hand_alpha(pruner, kind)
        for key in groups:
            assert got[key] == pytest.approx(expected[key], rel=1e-12), (round_, key)
        if can_prune:
            assert 0 < sum(v == INF for v in got.values()) < len(groups)
            assert len(report["channel"]["pruned"]) == sum(
                expected[k] == INF and alpha[k] != INF for k in groups)
        alpha = expected
        check_alpha_eff(model, pruner, groups, alpha)
        optimizer.step()   # lr = 0: the weights stay, but the next update may prune


def _snr(params, curvature, alphas, groups, key):
    member_of = {}
    for k, entries in groups.items():
        for entry in entries:
            member_of.setdefault(entry, []).append(k)
    live = [(n, i) for n, i in groups[key] if sum(alphas[g] for g in member_of[(n, i)]) != INF]
    squared = sum(float(params[n][i]) ** 2 for n, i in live)
    sigma = sum(_inverse(N * max(float(curvature[n][i]), 0.0) + sum(alphas[g] for g in member_of[(n, i)]))
                for n, i in live)
    return squared / sigma


def check_alpha_eff(model, pruner, groups, alpha):
    """Every entry's alpha_eff (what the step reads) is the sum of its groups' alphas, in float32;
    entries of a pruned group are exactly 0."""
    expected = {n: torch.zeros(p.shape, dtype=torch.float64) for n, p in model.named_parameters()}
    for key, entries in groups.items():
        for name, index in set(entries):
            expected[name][index] += alpha[key]
    for name, param in model.named_parameters():
        got = pruner.channel.alpha_eff(name).double() if name in pruner.channel.members else None
        if got is None:
            assert not expected[name].any(), name
            continue
        assert torch.allclose(got, expected[name], rtol=1e-6, atol=0), name   # float32 storage
        assert (param[expected[name] == INF] == 0).all(), name


@pytest.mark.parametrize("kind", ["chain", "skip"])
@pytest.mark.parametrize("optimizer_kind", ["adam", "adam-all-ard"])
def test_mackay_adam_reads_alpha_eff_and_holds_pruned_groups(kind, optimizer_kind):
    model, optimizer, pruner, groups = tiny_pruner(kind, optimizer_kind, threshold=1.0)
    where = pruner.channel.members["fc1.bias"].where
    assert where == ("own" if optimizer_kind == "adam" else "optimizer")
    generator = torch.Generator().manual_seed(2)
    randomise_curvature(model, pruner, generator, zero_share=0.5)
    pruner.update()
    state = optimizer.ard_state(model.fc2.weight)["alpha"]
    assert state.shape == model.fc2.weight.shape and state.dtype == torch.float32
    if where == "optimizer":
        assert pruner.channel.alpha_eff("fc1.bias") is optimizer.ard_state(model.fc1.bias)["alpha"]
    alpha = hand_alpha(pruner, kind)
    check_alpha_eff(model, pruner, groups, alpha)
    for param_group in optimizer.param_groups:
        param_group["lr"] = 1e-2
    x = torch.randn(16, 3, dtype=torch.float64)
    for _ in range(3):
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()
    randomise_curvature(model, pruner, generator, zero_share=0.5)
    pruner.update()
    pruned = [g for g, a in zip(pruner.channel.groups, pruner.channel.alpha) if a == INF]
    assert pruned
    for _ in range(3):
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()
    assert all(g.is_zero(model) for g in pruned)   # biases too, in MacKayAdam's ard=False group
    check_alpha_eff(model, pruner, groups, hand_alpha(pruner, kind))


# -- a CNN trained and pruned, then shrunk -----------------------------------------------------------
class ResNetish(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv3, self.bn3 = nn.Conv2d(8, 7, 3, padding=1, bias=False), nn.BatchNorm2d(7)
        self.head = nn.Linear(7 * 2 * 2, 5)

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(y + self.bn2(self.conv2(y)))          # residual add: conv1, conv2 channels coupled
        y = F.max_pool2d(F.relu(self.bn3(self.conv3(y))), 2)
        return self.head(F.adaptive_avg_pool2d(y, 2).flatten(1))


def cnn_run(optimizer_kind):
    torch.manual_seed(0)
    model = ResNetish().double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(128, 3, 8, 8, generator=g, dtype=torch.float64)
    teacher = torch.randn(3, 5, generator=g, dtype=torch.float64)
    y = (x.mean(dim=(2, 3)) @ teacher).argmax(1)     # depends on channel means only: few channels needed
    if optimizer_kind == "adam":
        optimizer = MacKayAdam(ard_param_groups(model), lr=1e-2, num_data=128, batch_size=32)
        # thresholds that prune about half the groups here (0.1 with the curvature read before
        # its bias correction, 18-63% of B g^2 at these updates every 20 steps)
        options = {"threshold": 0.3}
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        options = {"batch_size": 32, "threshold": 0.05}
    pruner = MacKayPruner(model, optimizer, num_data=128, granularity="channel", example_inputs=x[:2],
                          **options)

    def train(steps):
        model.train()
        for step in range(steps):
            index = torch.arange(step * 32, (step + 1) * 32) % 128
            optimizer.zero_grad()
            F.cross_entropy(model(x[index]), y[index]).backward()
            optimizer.step()
    return model, optimizer, pruner, train, x


@pytest.mark.parametrize("optimizer_kind", ["adam", "sgd"])
def test_cnn_with_batchnorm_and_residual_prunes_groups_that_stay_zero_and_shrink(optimizer_kind):
    model, _, pruner, train, x = cnn_run(optimizer_kind)
    groups = pruner.channel.groups
    names = {m.name for g in groups for m in g.members}
    assert {"bn1.weight", "bn2.bias", "conv2.bias", "bn3.weight", "head.weight"} <= names
    residual = [g for g in groups if {("conv1.weight", 0), ("conv2.weight", 0), ("conv2.weight", 1)}
                <= {(m.name, m.dim) for m in g.members}]
    assert len(residual) == 8                       # one group per residual channel
    train(20)
    first = pruner.update()
    assert first["channel"]["warmup"] and first["channel"]["groups_kept"] == len(groups)
    for _ in range(4):
        train(20)
        report = pruner.update()
    pruned = [g for g, a in zip(groups, pruner.channel.alpha) if a == INF]
    assert 0 < len(pruned) < len(groups)
    assert report["channel"]["groups_kept"] == len(groups) - len(pruned)
    assert all(isinstance(text, str) and text.startswith("channel: ") for h in pruner.history
               for text in h["channel"]["pruned"])
    assert sum(len(h["channel"]["pruned"]) for h in pruner.history) == len(pruned)
    layer = {entry["name"]: entry for entry in report["layers"]}
    # conv3.weight: sliced by its 7 output groups and the 8 residual groups of its input
    assert layer["conv3"]["groups"] == 15 and layer["head"]["groups"] == 7
    assert not report["channel"]["kept_strongest"]
    train(10)                                        # pruned groups stay exactly 0 under training
    assert all(g.is_zero(model) for g in pruned)
    assert all(not g.is_zero(model) for g, a in zip(groups, pruner.channel.alpha) if a != INF)

    model.eval()
    with torch.no_grad():
        expected = model(x)
    small, shrunk = mackay_ext.shrink(model, x[:2], report=True)
    assert len(shrunk.removed) == len(pruned)
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        got = small(x)
    assert (got - expected).abs().max() <= 1e-10 * expected.abs().max()


def test_guarantees_warmup_no_step_no_pruning_strongest_kept_and_state_round_trip():
    model, _, pruner, train, _ = cnn_run("adam")
    train(10)
    assert pruner.update()["channel"]["warmup"]
    with pytest.warns(RuntimeWarning, match="no optimizer step since the previous update"):
        second = pruner.update()
    assert not second["channel"]["pruned"] and second["channel"]["groups_kept"] == len(pruner.channel.groups)
    train(5)
    for name in pruner.channel.members:              # nothing determined: every group prunable
        pruner.channel.curvature(name).zero_()
    with pytest.warns(RuntimeWarning, match=r"every channel group of .* strongest group is kept"):
        report = pruner.update()
    assert report["channel"]["kept_strongest"]
    # the CLI's accuracy warning names those layers, as it does for the other granularities
    emptied = {entry.split(" (dim")[0] for entry in report["channel"]["kept_strongest"]}
    warning = _accuracy_loss_warning(SimpleNamespace(dense_test_accuracy=0.9, pruner=pruner), 0.1)
    assert all(f"{name} (dim" in warning for name in emptied), warning
    head_groups = pruner.report()["layers"][-1]
    assert head_groups["name"] == "head" and head_groups["groups_kept"] >= 1
    for entry in report["layers"]:                   # no layer lost every group
        assert entry["groups"] == 0 or entry["groups_kept"] >= 1, entry["name"]

    state = pruner.state_dict()
    model2, _, pruner2, _, _ = cnn_run("adam")
    model2.load_state_dict(model.state_dict())
    pruner2.load_state_dict(state)
    assert torch.equal(pruner2.channel.alpha, pruner.channel.alpha)
    for name in pruner.channel.members:
        assert torch.equal(pruner2.channel.alpha_eff(name), pruner.channel.alpha_eff(name)), name

    pruner.switch_off_prior()
    assert not bool(pruner.channel.alpha[torch.isfinite(pruner.channel.alpha)].any())
    assert (pruner.channel.alpha == INF).sum() == (state["channel"]["alpha"] == INF).sum()


def test_nan_in_a_norm_member_raises_before_anything_changes():
    model, _, pruner, train, _ = cnn_run("sgd")
    train(3)
    pruner.update()
    train(3)
    with torch.no_grad():
        model.bn2.bias[1] = float("nan")
    alpha = pruner.channel.alpha.clone()
    with pytest.raises(NonFiniteError, match=r"bn2\.bias \(weight\)"):
        pruner.update()
    assert torch.equal(alpha, pruner.channel.alpha)


# -- bad input -----------------------------------------------------------------------------------
def test_bad_input_is_named():
    model = ResNetish()
    optimizer = MacKayAdam(ard_param_groups(model), num_data=10, batch_size=2)
    with pytest.raises(ValueError, match=r"granularity='channel' needs example_inputs="):
        MacKayPruner(model, optimizer, num_data=10, granularity="channel")
    with pytest.raises(ValueError, match="example_inputs is used by granularity='channel' and mac_price > 0 only"):
        MacKayPruner(model, optimizer, num_data=10, example_inputs=torch.randn(1, 3, 8, 8))
    with pytest.raises(ValueError, match="pass granularity='channel', not per layer"):
        MacKayPruner(model, optimizer, num_data=10, granularity={"conv1": "channel"})
    with pytest.raises(CouplingError, match="example_inputs do not run the model") as refused:
        MacKayPruner(model, optimizer, num_data=10, granularity="channel", example_inputs=torch.randn(1, 4, 8, 8))
    # the inputs are wrong, not the model: no advice to give up the granularity (it said use 'filter')
    assert "pass example_inputs= that the model's forward accepts" in str(refused.value)
    assert "granularity='filter'" not in str(refused.value)

    class Roller(nn.Module):
        def forward(self, x):
            return torch.roll(x, 1, dims=1)

    rolling = nn.Sequential(nn.Conv2d(3, 4, 1), Roller(), nn.Conv2d(4, 2, 1))
    with pytest.raises(CouplingError, match=r"roll.*module '1' \(Roller\)"):
        MacKayPruner(rolling, MacKayAdam(ard_param_groups(rolling), num_data=10, batch_size=2), num_data=10,
                     granularity="channel", example_inputs=torch.randn(1, 3, 2, 2))


def test_groups_without_an_alpha_are_listed():
    model = Chain()
    model.fc2.bias.requires_grad_(False)             # B_p groups hold a frozen member
    optimizer = MacKayAdam(ard_param_groups(model), num_data=10, batch_size=2)
    pruner = MacKayPruner(model, optimizer, num_data=10, granularity="channel", example_inputs=torch.randn(2, 3))
    assert len(pruner.channel.groups) == 4
    notes = pruner.report()["channel"]["notes"]
    assert sum("fc2.bias is frozen" in note for note in notes) == 5


def test_penalty_prior_covers_every_member():
    model, _, pruner, groups = tiny_pruner("chain", prior="penalty")
    randomise_curvature(model, pruner, torch.Generator().manual_seed(4))
    pruner.update()
    alpha = hand_alpha(pruner, "chain")
    expected = 0.0
    params = dict(model.named_parameters())
    member_of = {}
    for key, entries in groups.items():
        for entry in entries:
            member_of.setdefault(entry, []).append(key)
    for (name, index), keys in member_of.items():
        expected += sum(alpha[k] for k in keys) * float(params[name].detach()[index]) ** 2
    expected /= 2 * N
    penalty = pruner.penalty()
    assert penalty.requires_grad and float(penalty.detach()) == pytest.approx(expected, rel=1e-6)


def test_no_removable_group_says_what_blocks_the_channels():
    """A model whose every channel reaches its output has nothing to prune by channel: the error
    names the blocked channels and why, not just 'none'."""
    model = nn.Sequential(nn.Linear(4, 3))
    with pytest.raises(ValueError, match=r"found no coupled channel group to put a prior on \(0 removable groups; "
                                         r"none; blocked: channel: 0.weight\[out 0\] => 0.bias\[0\]: it reaches "
                                         r"the model output"):
        MacKayPruner(model, torch.optim.Adam(model.parameters()), num_data=10, batch_size=2,
                     granularity="channel", example_inputs=(torch.randn(2, 4),))


def test_frozen_norms_everywhere_are_said_in_a_few_lines():
    """Freezing every BatchNorm (a common fine-tuning recipe) takes the prior off every channel
    group: the refusal counts them by reason and shows one, where it listed all (a ResNet-18's
    2,880 groups made a 722,343-character message)."""
    blocks = [nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()) for _ in range(12)]
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), *blocks,
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.requires_grad_(False)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad])
    with pytest.raises(ValueError) as caught:
        MacKayPruner(model, optimizer, num_data=10, batch_size=2, granularity="channel",
                     example_inputs=(torch.randn(2, 3, 8, 8),))
    message = str(caught.value)
    assert re.search(r"\(52 removable groups; 52 without a prior: 52 with a frozen member \(a frozen member, such as "
                     r"a frozen norm, takes the prior off every group it is in: unfreeze it", message)
    assert message.count("no alpha for") == 1 and "and 51 more" in message and len(message) < 1500


@pytest.mark.parametrize("options,warned", [({}, True), ({"channel_prior": "members"}, False),
                                            ({"max_prune_fraction": 0.5}, False),
                                            ({"channel_prior": "norm-scale"}, False)])
def test_the_default_prior_on_filters_before_a_batchnorm_is_warned_about(options, warned):
    """A new user's BatchNorm CNN (and torchvision's resnet18) under granularity="channel" with
    nothing else set lost 99% of its weights in the first pruning update: the filters before a
    norm are scale-free. Left at its default there, without max_prune_fraction, the prior's
    placement is warned about, naming norm-scale; a choice made (either prior, or the cap) is not."""
    torch.manual_seed(0)
    model = ResNetish().double()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    optimizer = MacKayAdam(ard_param_groups(model), lr=1e-2, num_data=128, batch_size=32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        MacKayPruner(model, optimizer, num_data=128, granularity="channel", example_inputs=x, **options)
    messages = [str(w.message) for w in caught if "pass through a BatchNorm" in str(w.message)]
    assert bool(messages) == warned
    if warned:
        assert re.search(r"\d+ of \d+ channel groups pass through a BatchNorm.*channel_prior='norm-scale'",
                         messages[0])


def test_an_update_that_prunes_nearly_everything_says_what_to_do():
    """Only per-layer 'the strongest group is kept' warnings marked a collapse (they read like a
    safety net); one warning now gives the share pruned, the layers it would have emptied and
    the ways out."""
    model, _, pruner, train, _ = cnn_run("adam")
    train(10)
    pruner.update()                                  # warm-up: alpha from the curvature
    train(5)
    for name in pruner.channel.members:              # nothing determined: every group prunable
        pruner.channel.curvature(name).zero_()
    with pytest.warns(RuntimeWarning, match=r"this update pruned 9\d\.\d% of the weights still live "
                                            r"\([\d,]+ -> [\d,]+\) and would have emptied \d+ layer.*"
                                            r"max_prune_fraction=0.5.*channel_prior='norm-scale'"):
        pruner.update()


def test_an_op_the_trace_cannot_follow_says_what_to_do_and_a_per_layer_channel_is_named():
    """One ConvTranspose2d anywhere rules out granularity='channel' (layers= does not narrow the
    trace): the error named the module but no way out. And granularity={'c1': 'channel', ...}
    with example_inputs was refused for example_inputs, not for the per-layer 'channel'."""
    class Decoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.t = nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ConvTranspose2d(8, 4, 2, stride=2)

        def forward(self, x):
            return self.t(F.relu(self.c1(x)))

    model, x = Decoder(), torch.randn(2, 3, 8, 8)
    optimizer = MacKayAdam(ard_param_groups(model), lr=1e-3, num_data=100, batch_size=2)
    for layers in (None, ["c1"]):
        with pytest.raises(CouplingError, match=r"module 't' \(ConvTranspose2d\).*layers= does not narrow the "
                                                r"trace\): use granularity='filter'.*sparsify"):
            MacKayPruner(model, optimizer, num_data=100, granularity="channel", example_inputs=(x,), layers=layers)
    with pytest.raises(ValueError, match="granularity='channel' couples layers across the whole model"):
        MacKayPruner(model, optimizer, num_data=100, granularity={"c1": "channel", "t": "weight"},
                     example_inputs=(x,))
    MacKayPruner(model, optimizer, num_data=100, granularity="filter")   # the way out works


def test_layers_left_without_a_prior_by_the_channel_trace_are_warned_about():
    """ConvNeXt under granularity='channel': 17 of 41 layers (the residual stream, which a
    LayerNorm couples) got no prior, said only in report()['channel']['notes']."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 3))
    optimizer = MacKayAdam(ard_param_groups(model), lr=1e-3, num_data=100, batch_size=2)
    with pytest.warns(UserWarning, match=r"1 of 3 layers are in no channel group, so they train without a "
                                         r"prior: 4 \(the trace keeps their channels whole; 4: .*granularity='filter'"):
        pruner = MacKayPruner(model, optimizer, num_data=100, granularity="channel",
                              example_inputs=torch.randn(2, 4))
    # report()["excluded"] names it (it said so only in the channel notes), and the totals leave it
    # out: a layer never pruned counted as kept (a TransformerEncoder's embedding and head)
    report = pruner.report()
    assert [e["name"] for e in report["excluded"] if "in no channel group" in e["reason"]] == ["4"]
    assert [layer["name"] for layer in report["layers"]] == ["0", "2"]
    assert report["total"] == 4 * 8 + 8 * 8 == pruner.kept_weights()
    assert pruner.sparsity() == 0.0


def test_gpt2_attention_heads_get_a_prior():
    """A new user's tiny GPT-2 under granularity='channel': the trace marked every head group as
    kept by shrink (GPT2Attention splits c_attn's output into q, k and v at split_size), so
    attention trained without a prior and was never pruned, though shrink re-sizes that split and
    removes heads. The heads now get an alpha each and zeroed heads shrink away."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=40, n_embd=16, n_layer=1, n_head=4, n_positions=16,
                                     use_cache=False, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = transformers.GPT2LMHeadModel(config).eval()
    tokens = torch.randint(0, 40, (2, 9))
    heads = [g for g in mackay_ext.channel_groups(model, (tokens,)) if g.kind == "head"]
    assert len(heads) == 4 and all(g.fixed is None for g in heads)
    optimizer = MacKayAdam(ard_param_groups(model), lr=1e-3, num_data=100, batch_size=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # (the embeddings and their tie are said, as ever)
        pruner = MacKayPruner(model, optimizer, num_data=100, granularity="channel", example_inputs=(tokens,))
    layers = [layer["name"] for layer in pruner.report()["layers"]]
    assert "transformer.h.0.attn.c_attn" in layers and "transformer.h.0.attn.c_proj" in layers
    alpha = pruner.alpha("transformer.h.0.attn.c_attn")
    assert alpha.shape == model.transformer.h[0].attn.c_attn.weight.shape
    with torch.no_grad():   # pruning head 1's group by hand: q, k and v columns and c_proj's rows
        heads[1].zero_(model)
        expected = model(tokens).logits
    small = mackay_ext.shrink(model, (tokens,))
    assert small.transformer.h[0].attn.num_heads == 3
    with torch.no_grad():
        torch.testing.assert_close(small(tokens).logits, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("how", ["frozen, torch Adam", "frozen, MacKayAdam", "lr 0, torch Adam"])
def test_a_layer_held_after_the_build_keeps_its_channels(how):
    """A new user froze a backbone stage after the warm-up update (or set its group's lr to 0):
    under granularity="channel" the next updates zeroed its rows and biases, and the proximal
    prior shrank its frozen bias every step, with no word, where the per-weight granularities
    leave such a layer alone. Now every group with such a member is re-estimated and not pruned,
    said per member, and the member is not moved."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))
    first = list(model[0].parameters())
    if how == "frozen, MacKayAdam":
        optimizer = MacKayAdam(ard_param_groups(model), lr=1e-2, num_data=64, batch_size=16)
    else:
        rest = [p for p in model.parameters() if all(p is not q for q in first)]
        optimizer = torch.optim.Adam([{"params": first}, {"params": rest}], lr=1e-2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # (a threshold that prunes nearly all the free groups: said)
        pruner = MacKayPruner(model, optimizer, num_data=64, batch_size=16, granularity="channel",
                              example_inputs=(torch.randn(2, 6),), prune="alpha", threshold=1.0)
    x, y = torch.randn(64, 6), torch.randint(0, 3, (64,))

    def steps(count):
        train_steps(model, optimizer, x, y, count, batch=16)

    steps(20)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner.update()
    steps(20)
    if how.startswith("frozen"):
        model[0].requires_grad_(False)
    else:
        optimizer.param_groups[0]["lr"] = 0.0
    held = [p.detach().clone() for p in first]
    why = "its requires_grad is False now" if how.startswith("frozen") else "its param group's lr is 0"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = pruner.update()
    said = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    for member in ("0.weight", "0.bias"):
        assert sum(f"{member} (a member of channel groups): {why}" in text for text in said) == 1
    steps(20)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = pruner.update()
    for before, after in zip(held, first):
        assert torch.equal(before, after)
    assert any(note.startswith(f"0.bias: {why}") for note in report["notes"])
    # the 16 groups of fc1's rows are held; the others were pruned by the low threshold
    assert report["channel"]["held"] == 16 and report["channel"]["groups_kept"] < 32


def test_a_collapse_under_a_price_names_the_price_not_the_cap_already_set():
    """max_prune_fraction does not limit what mac_price removes; a new user with the cap at 0.5
    lost 64 of 64 units a layer to the price and the warning told them to pass the cap."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))
    x = torch.randn(256, 20)
    y = (x[:, :4] * 2).argmax(1)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    pruner = MacKayPruner(model, optimizer, num_data=256, batch_size=32, granularity="channel",
                          example_inputs=(x[:8],), max_prune_fraction=0.5, mac_price=1e-3)

    def steps(count):
        train_steps(model, optimizer, x, y, count, batch=32)

    steps(200)
    pruner.update()
    steps(50)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = pruner.update()
    assert report["channel"]["priced_out"] > 0
    assert int((model[0].weight.abs().sum(1) != 0).sum()) < 32   # past the cap's half of 64 units
    said = " ".join(str(w.message) for w in caught)
    assert re.search(r"pass a lower mac_price, or a longer mac_price_ramp \(now 1\), which raises the price over "
                     r"more updates \(\d+ groups went for their multiply-adds, which max_prune_fraction does not "
                     r"limit\), or a smaller max_prune_fraction \(now 0.5\)", said)
    assert "pass max_prune_fraction=0.5" not in said


def test_a_group_is_held_through_a_frozen_bias_alone():
    """Only a 1-D member frozen after the build (fc1's bias): the groups it is in are held, the
    bias is not moved by the proximal prior, and the other groups are pruned as before."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner = MacKayPruner(model, optimizer, num_data=64, batch_size=16, granularity="channel",
                              example_inputs=(torch.randn(2, 6),), prune="alpha", threshold=1.0)
    x, y = torch.randn(64, 6), torch.randint(0, 3, (64,))

    def steps(count):
        train_steps(model, optimizer, x, y, count, batch=16)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        steps(20)
        pruner.update()
        steps(20)
        model[0].bias.requires_grad_(False)
        bias = model[0].bias.detach().clone()
        pruner.update()
        steps(20)
        report = pruner.update()
    assert torch.equal(model[0].bias, bias)
    assert report["channel"]["held"] == 16 and report["channel"]["groups_kept"] < 32
    assert bool((model[0].weight != 0).all(dim=1).all())   # no row of fc1 pruned
