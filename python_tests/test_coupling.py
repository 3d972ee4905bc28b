"""Coupled channel groups (mackay_ext.coupling): hand-derived groups on small models, a
cross-check against Torch-Pruning's DependencyGraph on CNNs, the ChannelGroup API and bad input.
End-to-end exactness (zero groups, shrink, equal outputs) is in test_shrink.py."""
import random
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mackay_ext.coupling import (
    ChannelGroup,
    CouplingError,
    Member,
    channel_groups,
    group_index,
    trace_coupling,
)


def as_sets(groups):
    """Each group as a set of (name, dim, index) entries: easy to compare with a hand derivation."""
    return [{(m.name, m.dim, i) for m in g.members for i in m.indices} for g in groups]


def entries(*specs):
    """specs: (name, dim, indices) -> set of (name, dim, index)."""
    return {(n, d, i) for n, d, idx in specs for i in idx}


class ConvBnConv(nn.Module):
    def __init__(self, affine=True):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 5, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(5, affine=affine)
        self.conv2 = nn.Conv2d(5, 4, 3, padding=1, bias=False)
        self.fc = nn.Linear(4 * 2 * 2, 3)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)
        x = F.relu(self.conv2(x))
        return self.fc(F.adaptive_avg_pool2d(x, 2).flatten(1))


def test_conv_bn_flatten_groups_by_hand():
    model = ConvBnConv()
    groups = channel_groups(model, torch.randn(2, 3, 8, 8))
    expected = [entries(("conv1.weight", 0, [c]), ("conv1.bias", 0, [c]), ("bn1.weight", 0, [c]),
                        ("bn1.bias", 0, [c]), ("conv2.weight", 1, [c])) for c in range(5)]
    # flatten: channel c of a (4, 2, 2) map is fc's input columns 4c .. 4c+3
    expected += [entries(("conv2.weight", 0, [c]), ("fc.weight", 1, range(4 * c, 4 * c + 4))) for c in range(4)]
    assert as_sets(groups) == expected
    assert [g.kind for g in groups] == ["channel"] * 9
    assert groups[0].buffers == (Member("bn1.running_mean", 0, (0,)), Member("bn1.running_var", 0, (0,)))
    assert repr(groups[2]) == ("channel: conv1.weight[out 2] => conv1.bias[2] => bn1.weight[2] => bn1.bias[2] "
                               "=> conv2.weight[in 2]")


class Residual(nn.Module):
    """Two branches summed, then concatenated with a third: the add couples, the cat offsets."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(2, 3, 1)
        self.b = nn.Conv2d(2, 3, 3, padding=1)
        self.c = nn.Conv2d(2, 2, 1)
        self.dw = nn.Conv2d(5, 5, 3, padding=1, groups=5)
        self.head = nn.Conv2d(5, 1, 1)

    def forward(self, x):
        y = torch.cat([F.relu(self.a(x) + self.b(x)), self.c(x)], dim=1)
        return self.head(self.dw(y)).mean(dim=(2, 3))


def test_residual_add_concat_and_depthwise_by_hand():
    groups = channel_groups(Residual(), torch.randn(1, 2, 5, 7))
    expected = [entries(("a.weight", 0, [c]), ("a.bias", 0, [c]), ("b.weight", 0, [c]), ("b.bias", 0, [c]),
                        ("dw.weight", 0, [c]), ("dw.bias", 0, [c]), ("head.weight", 1, [c])) for c in range(3)]
    expected += [entries(("c.weight", 0, [c]), ("c.bias", 0, [c]), ("dw.weight", 0, [3 + c]),
                         ("dw.bias", 0, [3 + c]), ("head.weight", 1, [3 + c])) for c in range(2)]
    assert sorted(map(sorted, as_sets(groups))) == sorted(map(sorted, expected))


class Joined(nn.Module):
    """Two convs joined by torch.stack (new dim 2) or torch.cat along height, then flattened into
    a Linear: the join needs equal channel counts, so channel c of both convs goes together."""

    def __init__(self, join):
        super().__init__()
        self.join = join
        self.c1, self.c2 = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 3, padding=1)
        self.f = nn.Linear(8 if join == "stack" else 32, 2)

    def forward(self, x):
        a, b = self.c1(x), self.c2(x)
        if self.join == "stack":
            return self.f(torch.stack([a, b], 2).mean((3, 4)).flatten(1))       # f input 2c + s
        return self.f(torch.cat([a, b], 2).flatten(1))       # 2x2 images: f input 8c + k


@pytest.mark.parametrize("join", ["stack", "cat"])
def test_stack_and_cat_beside_the_channels_tie_the_inputs_channels(join):
    groups = channel_groups(Joined(join), torch.randn(2, 3, 2, 2))
    width = 2 if join == "stack" else 8
    expected = [entries(("c1.weight", 0, [c]), ("c1.bias", 0, [c]), ("c2.weight", 0, [c]), ("c2.bias", 0, [c]),
                        ("f.weight", 1, range(width * c, width * (c + 1)))) for c in range(4)]
    assert sorted(map(sorted, as_sets(groups))) == sorted(map(sorted, expected))


def test_grouped_convolution_by_position_and_layer_norm_blocked_with_reasons():
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 6, 1)
            self.grouped = nn.Conv2d(6, 6, 1, groups=2)
            self.proj = nn.Linear(6, 8)
            self.norm = nn.LayerNorm(8)
            self.out = nn.Linear(8, 2)

        def forward(self, x):
            x = self.grouped(self.conv(x)).mean(dim=(2, 3))
            return self.out(self.norm(self.proj(x)))

    coupling = trace_coupling(Model(), torch.randn(2, 4, 3, 3))
    # 2 conv groups of 3: position j of every conv group goes at once, so the groups stay equal
    expected = [entries(("conv.weight", 0, [j, 3 + j]), ("conv.bias", 0, [j, 3 + j]), ("grouped.weight", 1, [j]))
                for j in range(3)]
    expected += [entries(("grouped.weight", 0, [k, 3 + k]), ("grouped.bias", 0, [k, 3 + k]),
                         ("proj.weight", 1, [k, 3 + k])) for k in range(3)]
    assert as_sets(coupling.groups) == expected
    assert all(g.fixed is None for g in coupling.groups)
    reasons = " | ".join(r for _, r in coupling.blocked)
    assert "grouped convolution" not in reasons and "reaches the model output" in reasons
    # LayerNorm statistics mix every channel of proj: one class spanning the layer, not 8 groups
    norm_class = [(g, r) for g, r in coupling.blocked if any(m.name == "norm.weight" for m in g.members)]
    assert len(norm_class) == 1 and "spans every channel of proj.weight" in norm_class[0][1]
    assert {m.name for m in norm_class[0][0].members} >= {"proj.weight", "norm.weight", "norm.bias", "out.weight"}


@pytest.mark.parametrize("batch_first", [True, False])
def test_multihead_attention_heads(batch_first):
    embed, heads = 12, 3
    hd = embed // heads
    mha = nn.MultiheadAttention(embed, heads, batch_first=batch_first)

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha, self.out = mha, nn.Linear(embed, 2)

        def forward(self, x):
            return self.out(self.mha(x, x, x, need_weights=False)[0])

    x = torch.randn(2, 5, embed) if batch_first else torch.randn(5, 2, embed)
    groups = channel_groups(Model(), x)
    expected = []
    for h in range(heads):
        rows = [part * embed + h * hd + j for part in range(3) for j in range(hd)]
        expected.append(entries(("mha.in_proj_weight", 0, rows), ("mha.in_proj_bias", 0, rows),
                                ("mha.out_proj.weight", 1, range(h * hd, (h + 1) * hd))))
    head_groups = [g for g in groups if g.kind == "head"]
    assert as_sets(head_groups) == expected
    assert all(g.module == "mha" for g in head_groups)
    # the attention's output channels (no LayerNorm after it here) are ordinary groups
    assert as_sets([g for g in groups if g.kind == "channel"]) == [
        entries(("mha.out_proj.weight", 0, [c]), ("mha.out_proj.bias", 0, [c]), ("out.weight", 1, [c]))
        for c in range(embed)]


def test_option_a_padding_shortcut_maps_channels_with_offset():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv0 = nn.Conv2d(1, 2, 1)
            self.conv = nn.Conv2d(2, 6, 1)
            self.fc = nn.Linear(6, 1)

        def forward(self, x):
            x = self.conv0(x)
            y = self.conv(x) + F.pad(x, (0, 0, 0, 0, 1, 3))   # channels 1, 2 of the sum are x's 0, 1
            return self.fc(y.mean(dim=(2, 3)))

    groups = channel_groups(Block(), torch.randn(1, 1, 3, 3))
    by_conv0 = [g for g in groups if g.members[0].name == "conv0.weight"]
    assert as_sets(by_conv0) == [
        entries(("conv0.weight", 0, [c]), ("conv0.bias", 0, [c]), ("conv.weight", 1, [c]),
                ("conv.weight", 0, [c + 1]), ("conv.bias", 0, [c + 1]), ("fc.weight", 1, [c + 1])) for c in range(2)]
    padded = [g for g in groups if g.members[0].name == "conv.weight"]
    assert [g.members[0].indices for g in padded] == [(0,), (3,), (4,), (5,)]
    assert all(g.fixed and "constant padding" in g.fixed for g in padded)
    assert all(g.fixed is None for g in by_conv0)


def test_channel_slice_in_forward_is_fixed():
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 6, 1)
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(self.conv(x)[:, :4].mean(dim=(2, 3)))

    groups = channel_groups(Model(), torch.randn(1, 3, 2, 2))
    assert len(groups) == 6 and all(g.fixed and "fixed positions" in g.fixed for g in groups)


def test_group_api_squared_norm_zero_and_repr_ranges():
    torch.manual_seed(3)
    model = ConvBnConv()
    group = channel_groups(model, torch.randn(2, 3, 8, 8))[6]   # conv2 filter 1 => fc columns 4-7
    assert repr(group) == "channel: conv2.weight[out 1] => fc.weight[in 4-7]"
    expected = model.conv2.weight[1].double().pow(2).sum() + model.fc.weight[:, 4:8].double().pow(2).sum()
    torch.testing.assert_close(group.squared_norm(model), expected, rtol=1e-12, atol=0)
    assert group.num_weights(model) == 5 * 9 + 3 * 4
    curvature = {n: torch.rand_like(p) for n, p in model.named_parameters()}
    torch.testing.assert_close(group.gather(curvature.__getitem__),
                               torch.cat([curvature["conv2.weight"][1].reshape(-1),
                                          curvature["fc.weight"][:, 4:8].reshape(-1)]))
    assert not group.is_zero(model)
    group.zero_(model)
    assert group.is_zero(model) and group.squared_norm(model) == 0
    assert model.conv2.weight[0].abs().sum() > 0 and model.fc.weight[:, :4].abs().sum() > 0


def test_matches_torch_pruning_on_resnet18():
    """Independent reference: Torch-Pruning's DependencyGraph on a CNN it handles exactly."""
    tp = pytest.importorskip("torch_pruning")
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.randn(1, 3, 32, 32)
    ours = {frozenset(s) for s in as_sets(channel_groups(model, x))}
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=x)
    names = {m: n for n, m in model.named_modules()}
    rng = random.Random(0)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    for conv in convs:
        channel = rng.randrange(conv.out_channels)
        group = graph.get_pruning_group(conv, tp.prune_conv_out_channels, idxs=[channel])
        theirs = set()
        for item in group:
            module, handler = item.dep.target.module, item.dep.handler.__name__
            for name, p in module.named_parameters(recurse=False):
                if "in_channels" in handler and p.dim() < 2:
                    continue   # a consumer's bias is not part of its input channel
                dim = 1 if "in_channels" in handler else 0
                theirs |= {(f"{names[module]}.{name}", dim, int(i)) for i in item.idxs}
        assert frozenset(theirs) in ours, names[conv]


def test_bad_input_is_named():
    model = ConvBnConv()
    with pytest.raises(CouplingError, match="example_inputs do not run the model"):
        channel_groups(model, torch.randn(2, 4, 8, 8))
    with pytest.raises(TypeError, match="example_inputs must be"):
        channel_groups(model, 3)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        channel_groups(lambda x: x, torch.randn(1))
    assert model.training   # the trace leaves the model's mode as it was


def test_unknown_op_names_the_module():
    class Roller(nn.Module):
        def forward(self, x):
            return torch.roll(x, 1, dims=1)

    model = nn.Sequential(nn.Conv2d(3, 4, 1), Roller(), nn.Conv2d(4, 2, 1))
    with pytest.raises(CouplingError, match=r"roll.*module '1' \(Roller\)"):
        channel_groups(model, torch.randn(1, 3, 2, 2))


def test_a_recurrent_layer_is_named_without_torch_exports_advice():
    """nn.GRU re-lists its weights as it runs; torch.export's warning about that (advice for its
    own users) came before the CouplingError and named nothing the user did (a new user's pass)."""
    class Forecaster(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn, self.head = nn.GRU(3, 5, batch_first=True), nn.Linear(5, 2)

        def forward(self, x):
            return self.head(self.rnn(x)[0][:, -1])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(CouplingError, match=r"gru.*module 'rnn' \(GRU\)"):
            channel_groups(Forecaster(), torch.randn(2, 4, 3))


def test_keyword_inputs_odd_sizes_and_single_channel_layers():
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.one = nn.Linear(7, 1)       # one neuron: removing it empties the layer
            self.wide = nn.Linear(7, 5)
            self.out = nn.Linear(6, 3)

        def forward(self, x=None):
            return self.out(torch.cat([torch.tanh(self.one(x)), self.wide(x)], dim=-1))

    coupling = trace_coupling(Model(), {"x": torch.randn(1, 7)})
    assert as_sets(coupling.groups) == [entries(("wide.weight", 0, [c]), ("wide.bias", 0, [c]),
                                                ("out.weight", 1, [1 + c])) for c in range(5)]
    assert any("spans every channel of one.weight" in r for _, r in coupling.blocked)


def test_group_index_numbers_every_sliced_index():
    model = ConvBnConv()
    groups = channel_groups(model, torch.randn(1, 3, 4, 4))
    index = group_index(groups, model)
    assert index[("conv1.weight", 0)].tolist() == [0, 1, 2, 3, 4]
    assert index[("conv2.weight", 1)].tolist() == [0, 1, 2, 3, 4]
    assert index[("conv2.weight", 0)].tolist() == [5, 6, 7, 8]
    assert index[("fc.weight", 1)].tolist() == [5] * 4 + [6] * 4 + [7] * 4 + [8] * 4
    assert ("fc.weight", 0) not in index and ("fc.bias", 0) not in index   # the output is no group


def test_group_is_a_value():
    a = ChannelGroup((Member("w", 0, (1, 2, 3, 7), _ndim=2),))
    assert repr(a) == "channel: w[out 1-3,7]" and a == ChannelGroup((Member("w", 0, (1, 2, 3, 7)),))


def test_channel_groups_with_its_arguments_swapped_names_itself():
    with pytest.raises(TypeError, match=r"channel_groups: model must be a torch.nn.Module \(the first argument\), got Tensor"):
        channel_groups(torch.randn(2, 3, 8, 8), nn.Conv2d(3, 4, 3))


class RegionsInForward(nn.Module):
    """ConvBnConv's layers with parts of its forward under another grad mode or autocast, which
    torch.export keeps as subgraphs: a reentrant checkpoint, torch.no_grad() around the second
    conv (a frozen part), torch.autocast around the pooling."""

    def __init__(self, region: str):
        super().__init__()
        self.region, self.plain = region, ConvBnConv()

    def forward(self, x):
        p = self.plain
        x = F.max_pool2d(F.relu(p.bn1(p.conv1(x))), 2)
        if self.region == "checkpoint":
            x = torch.utils.checkpoint.checkpoint(lambda t: F.relu(p.conv2(t)), x, use_reentrant=True)
        elif self.region == "no_grad":
            with torch.no_grad():
                x = F.relu(p.conv2(x))
        else:
            x = F.relu(p.conv2(x))
            with torch.autocast("cpu", dtype=torch.bfloat16):
                x = F.adaptive_avg_pool2d(x, 2) * 2
            return p.fc(x.float().flatten(1))
        return p.fc(F.adaptive_avg_pool2d(x, 2).flatten(1))


@pytest.mark.parametrize("region", ["checkpoint", "no_grad", "autocast"])
def test_regions_under_another_grad_mode_or_autocast_are_followed(region):
    """A new user's mobile block under torch.utils.checkpoint(use_reentrant=True) could not be
    shrunk ("cannot follow wrap_with_set_grad_enabled"), nor a forward with a no_grad part: the
    region's ops couple as they would outside it, and no warning of the trace's own runs leaks."""
    torch.manual_seed(0)
    model = RegionsInForward(region)
    x = torch.randn(2, 3, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        groups = as_sets(channel_groups(model, x))
    expected = as_sets(channel_groups(model.plain, x))
    assert groups == [{(f"plain.{name}", d, i) for name, d, i in group} for group in expected]
    assert len(groups) == 9   # conv1's 5 channels (each with bn1's) and conv2's 4


@pytest.mark.parametrize("kind", ["weight_norm", "spectral_norm", "orthogonal", "weight_norm hook"])
def test_a_parametrized_weight_is_named_with_the_way_out(kind):
    """A parametrization computes the weight in forward, so its channels cannot be cut; the error
    named an op inside torch's parametrization (aten._weight_norm, mv, tril) and no remedy."""
    conv = nn.Conv2d(4, 4, 3, padding=1)
    if kind == "weight_norm hook":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)   # the hook form is deprecated
            conv = nn.utils.weight_norm(conv)
    else:
        conv = getattr(nn.utils.parametrizations, kind)(conv)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), conv, nn.ReLU(), nn.Conv2d(4, 2, 1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # nor torch.export's advice on the hook setting the weight
        with pytest.raises(CouplingError, match=r"parametrization \(2: .*\).*remove_parametrizations"):
            channel_groups(model, torch.randn(1, 3, 6, 6))


class ConstantChannelNet(nn.Module):
    """conv1 -> BatchNorm -> ReLU -> conv2 (with a bias) -> pooled Linear, conv2's call inside a
    region of the forward."""

    def __init__(self, region: str):
        super().__init__()
        self.region = region
        self.conv1, self.bn1 = nn.Conv2d(3, 5, 3, padding=1), nn.BatchNorm2d(5)
        self.conv2, self.fc = nn.Conv2d(5, 4, 1), nn.Linear(4, 3)   # 1x1: no padding, so a constant
        # input channel adds the same to every position (shrink folds it into the bias)

    def forward(self, x):
        h = F.relu(self.bn1(self.conv1(x)))
        if self.region == "checkpoint":
            h = torch.utils.checkpoint.checkpoint(self.conv2, h, use_reentrant=True)
        elif self.region == "no_grad":
            with torch.no_grad():
                h = self.conv2(h)
        else:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                h = self.conv2(h)
        return self.fc(F.relu(h).float().mean((2, 3)))


@pytest.mark.parametrize("region", ["checkpoint", "no_grad", "autocast"])
def test_shrink_through_regions_keeps_the_outputs(region):
    """shrink through the same regions, with a channel of conv1 left constant (its filter and
    BatchNorm scale 0, its shift not): the constant is folded into conv2's bias from conv2's recorded input,
    which autocast records in bfloat16 beside a float32 weight (that raised a dtype error)."""
    from mackay_ext.shrink import shrink
    torch.manual_seed(0)
    model = ConstantChannelNet(region)
    with torch.no_grad():
        model.conv1.weight[1] = 0
        model.conv1.bias[1] = 0
        model.bn1.weight[1] = 0   # as norm-scale pruning leaves a channel: its shift alone
        model.bn1.bias[1] = 0.7
        model.conv2.weight[2] = 0
        model.conv2.bias[2] = 0
    model.eval()
    x = torch.randn(2, 3, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        small = shrink(model, (x,))
    assert small.conv1.out_channels == 4 and small.conv2.out_channels == 3
    with torch.no_grad():
        torch.testing.assert_close(small(x), model(x), rtol=0, atol=2e-2 if region == "autocast" else 1e-5)
