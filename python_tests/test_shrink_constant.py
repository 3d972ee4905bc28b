"""shrink on what per-weight pruning leaves (mackay_ext.shrink_constant): units nobody reads and
units that output a constant (every producing weight zero), whose contribution goes into each
consumer's bias where that is exact. Equal outputs in float64, fewer units, exports."""
import itertools

import pytest
import torch
import torch.nn.functional as F
from test_shrink import assert_equal_outputs, assert_exports, to_double, trained_like
from torch import nn

from mackay_ext.shrink import shrink


def mlp(widths=(6, 9, 7, 4), seed=0):
    torch.manual_seed(seed)
    layers = []
    for a, b in itertools.pairwise(widths):
        layers += [nn.Linear(a, b), nn.ReLU()]
    model = nn.Sequential(*layers[:-1]).double().eval()
    with torch.no_grad():
        for m in model:
            if isinstance(m, nn.Linear):
                m.bias.uniform_(-1, 1)       # a silent unit still outputs relu(bias)
    return model


def units_with_a_job(model):
    """Reference widths: a hidden unit stays when it has an incoming weight and an outgoing one."""
    linears = [m for m in model if isinstance(m, nn.Linear)]
    return [int(((a.weight != 0).any(1) & (b.weight != 0).any(0)).sum()) for a, b in itertools.pairwise(linears)]


@pytest.mark.parametrize("seed", range(4))
def test_linear_chain_loses_constant_and_unread_units(seed):
    model = mlp(seed=seed)
    rng = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model[0].weight[torch.randperm(9, generator=rng)[:3]] = 0       # 3 constant units: relu(bias)
        model[2].weight[:, torch.randperm(9, generator=rng)[:2]] = 0    # up to 2 unread ones
        model[2].weight[torch.randperm(7, generator=rng)[:2]] = 0       # 2 constant in the second layer
    expected_widths = units_with_a_job(model)
    inputs = (torch.randn(5, 6, dtype=torch.float64),)
    with torch.no_grad():
        expected = model(*inputs)
    small, report = shrink(model, inputs, report=True)
    assert [m.out_features for m in small if isinstance(m, nn.Linear)][:-1] == expected_widths
    assert report.params_after < report.params_before and report.folded and not report.kept_unused
    with torch.no_grad():
        assert_equal_outputs(expected, small(*inputs))
        assert_equal_outputs(model(inputs[0] * 3), small(inputs[0] * 3))   # other inputs too


def test_cascade_a_unit_fed_only_by_constant_units_becomes_constant():
    model = mlp()
    with torch.no_grad():
        model[0].weight[:4] = 0                     # units 0-3 of the first layer are constant
        model[2].weight[0, 4:] = 0                  # unit 0 of the second layer reads only those
    inputs = (torch.randn(4, 6, dtype=torch.float64),)
    with torch.no_grad():
        expected = model(*inputs)
    small, report = shrink(model, inputs, report=True)
    assert (small[0].out_features, small[2].out_features) == (5, 6) and report.rounds >= 2
    with torch.no_grad():
        assert_equal_outputs(expected, small(*inputs))


def test_a_layer_of_constant_units_keeps_one():
    model = mlp()
    with torch.no_grad():
        model[2].weight.zero_()                     # every unit of the second layer is constant
    inputs = (torch.randn(3, 6, dtype=torch.float64),)
    with torch.no_grad():
        expected = model(*inputs)
    small = shrink(model, inputs)
    assert small[2].out_features == 1              # refusing is for pruned (all-zero) groups only
    with torch.no_grad():
        assert_equal_outputs(expected, small(*inputs))


class ConvChain(nn.Module):
    """conv -> BatchNorm -> ReLU -> conv (padding and padding mode chosen) -> pool -> Linear."""

    def __init__(self, padding=0, padding_mode="zeros", bias=True):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 5, 3, padding=padding, padding_mode=padding_mode, bias=bias)
        self.fc = nn.Linear(5 * 2 * 2, 4)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        return self.fc(F.max_pool2d(F.relu(self.conv2(x)), 2).flatten(1))


def constant_filters(model, inputs, filters=(1, 4)):
    trained_like(model)
    with torch.no_grad():
        model.conv1.weight[list(filters)] = 0       # conv1 bias stays: a constant map through BN
        model.bn1.bias.uniform_(0.5, 1)             # ... and ReLU lets it through
    with torch.no_grad():
        return model(*inputs)


@pytest.mark.parametrize("padding, padding_mode, folded", [(0, "zeros", True), (1, "zeros", False),
                                                           (1, "replicate", True)])
def test_conv_consumer_folds_a_constant_only_where_exact(padding, padding_mode, folded):
    size = 4 if padding else 6
    model, inputs = to_double(ConvChain(padding, padding_mode), (torch.randn(3, 3, size, size),))
    expected = constant_filters(model, inputs)
    small, report = shrink(model, inputs, report=True)
    with torch.no_grad():
        assert_equal_outputs(expected, small(*inputs))
    if folded:
        assert small.conv1.out_channels == small.bn1.num_features == small.conv2.in_channels == 4
        assert len(report.folded) == 2
    else:                                           # border positions read zeros, not the constant
        assert small.conv1.out_channels == 6 and not report.folded
        assert len(report.kept_unused) == 2 and "pads with zeros" in report.kept_unused[0][1]


def test_constant_folded_into_a_bias_less_consumer_exports():
    model, inputs = to_double(ConvChain(bias=False), (torch.randn(2, 3, 6, 6),))
    expected = constant_filters(model, inputs)
    with torch.no_grad():
        model.fc.weight[:, 8:12] = 0                # conv2 channel 2 is unread: its row goes too
    with torch.no_grad():
        expected = model(*inputs)
    small = shrink(model, inputs)
    assert small.conv2.bias is not None and small.conv2.bias.shape == (4,) and small.conv2.out_channels == 4
    with torch.no_grad():
        assert_equal_outputs(expected, small(*inputs))
    assert_exports(small, inputs)


def test_linear_batchnorm_constant_units_export():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    model, inputs = to_double(trained_like1d(model), (torch.randn(4, 5),))
    with torch.no_grad():
        model[0].weight[[0, 5, 6]] = 0
        expected = model(*inputs)
    small = shrink(model, inputs)
    assert small[0].out_features == small[1].num_features == small[3].in_features == 5
    with torch.no_grad():
        assert_equal_outputs(expected, small(*inputs))
    assert_exports(small, inputs)


def trained_like1d(model):
    for m in model.modules():
        if isinstance(m, nn.BatchNorm1d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.bias.data.uniform_(0.5, 1)
    return model


class ResidualMLP(nn.Module):
    def __init__(self, width=6):
        super().__init__()
        self.stem = nn.Linear(4, width)
        self.block = nn.Linear(width, width)
        self.head = nn.Linear(width, 3)

    def forward(self, x):
        h = self.stem(x)
        h = h + self.block(F.relu(h))               # channel j of stem and block summed
        return self.head(F.relu(h))


def test_residual_stream_with_one_constant_addend_is_kept():
    model, inputs = to_double(ResidualMLP(), (torch.randn(4, 4),))
    with torch.no_grad():
        model.block.weight[2] = 0                   # block's channel 2 is constant, stem's is not
        expected = model(*inputs)
    small, report = shrink(model, inputs, report=True)
    assert small.stem.out_features == 6 and not report.removed
    with torch.no_grad():
        assert_equal_outputs(expected, small(*inputs))


def test_residual_stream_with_every_addend_constant_is_folded():
    model, inputs = to_double(ResidualMLP(), (torch.randn(4, 4),))
    with torch.no_grad():
        model.stem.weight[2] = 0
        model.block.weight[2] = 0                   # the stream's channel 2 is relu(b_stem + b_block)
        model.stem.bias[2] = 0.7
        expected = model(*inputs)
    small, report = shrink(model, inputs, report=True)
    assert small.stem.out_features == small.block.out_features == small.head.in_features == 5
    assert len(report.folded) == 1
    with torch.no_grad():
        assert_equal_outputs(expected, small(*inputs))


class InputScaled(nn.Module):
    """A constant unit multiplied by a scale read off the input is no constant."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 5), nn.Linear(5, 2)

    def forward(self, x):
        return self.fc2(self.fc1(x) * x.pow(2).mean(1, keepdim=True))


@pytest.mark.parametrize("batch", [1, 3])
def test_input_dependent_constant_is_not_folded(batch):
    model, inputs = to_double(InputScaled(), (torch.randn(batch, 4),))
    with torch.no_grad():
        model.fc1.weight[1] = 0
        model.fc1.bias[1] = 0.5
    probe = torch.randn(6, 4, dtype=torch.float64)
    with torch.no_grad():
        expected = model(probe)
    small, report = shrink(model, inputs, report=True)
    assert small.fc1.out_features == 5 and len(report.kept_unused) == 1
    assert "every input" in report.kept_unused[0][1]
    with torch.no_grad():
        assert_equal_outputs(expected, small(probe))


def per_weight_pruned(name, kept_fraction=0.03, silent=0.4, seed=0):
    """A per-weight result as the Trainer leaves it: weights kept by magnitude, a share of each
    hidden layer's units without any incoming weight (their bias stays)."""
    import mackay_ext
    torch.manual_seed(seed)
    model = mackay_ext.models.create(name).double().eval()
    linears = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    with torch.no_grad():
        for layer in linears:
            w = layer.weight
            w[w.abs() < w.abs().flatten().kthvalue(int(w.numel() * (1 - kept_fraction))).values] = 0
            layer.bias.uniform_(-0.5, 0.5)
        for layer in linears[:-1]:
            rows = torch.randperm(layer.weight.shape[0])[: int(silent * layer.weight.shape[0])]
            layer.weight[rows] = 0
    return model


@pytest.mark.parametrize("name", ["lenet-300-100", "lenet-5-caffe"])
def test_per_weight_lenets_shrink_to_smaller_layers(name):
    model = per_weight_pruned(name)
    inputs = (torch.randn(3, 1, 28, 28, dtype=torch.float64),)
    with torch.no_grad():
        expected = model(*inputs)
    small, report = shrink(model, inputs, report=True)
    layers = [m for m in small.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    old = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    for new, before in zip(layers[:-1], old[:-1]):
        assert new.weight.shape[0] <= 0.6 * before.weight.shape[0] + 1   # the silent units went
    assert report.params_after < 0.8 * report.params_before
    with torch.no_grad():
        assert_equal_outputs(expected, small(*inputs))
    assert all(type(m).__module__.startswith("torch.nn") for m in small.children())
