"""The source paper's CIFAR networks (mackay_ext.models): shapes for any input channels and classes,
sizes against the published counts and the counts the paper's code prints, option-A shortcuts,
the paper's ResNet ARD layers, and one MacKay training round on each."""
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mackay_ext import MacKayAdam, MacKayPruner, ard_param_groups, count_macs, models
from mackay_ext.coupling import channel_groups

PAPER_NETS = ["vgg-d6", "vgg-g5", "resnet-20", "resnet-56", "resnet-110"]
BLOCKS = {"resnet-20": 3, "resnet-56": 9, "resnet-110": 18}   # basic blocks per stage: (depth - 2) / 6


def weights(model):
    """Conv and Linear weights only: what the paper's code counts (left_weightn)."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))


def paper_count(widths: str) -> int:
    """The paper's code's weight count from its printed layer widths, e.g. "3-64-64 64-10":
    3x3 convs between consecutive conv widths, then dense layers between the Linear widths."""
    conv, dense = ([int(w) for w in part.split("-")] for part in widths.split())
    return sum(9 * a * b for a, b in itertools.pairwise(conv)) + sum(a * b for a, b in itertools.pairwise(dense))


# -- shapes ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", PAPER_NETS)
@pytest.mark.parametrize("in_channels,num_classes", [(1, 100), (3, 10)])
def test_output_shape_for_any_channels_and_classes(name, in_channels, num_classes):
    model = models.create(name, num_classes=num_classes, in_channels=in_channels).eval()
    with torch.no_grad():
        out = model(torch.randn(2, in_channels, 32, 32))
    assert out.shape == (2, num_classes) and torch.isfinite(out).all()
    first = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    assert first.in_channels == in_channels


@pytest.mark.parametrize("name", PAPER_NETS)
def test_registered_for_the_cli(name):
    assert models.DEFAULT_DATASET[name] == "cifar10"
    assert set(models.DEFAULT_DATASET) == set(models.MODELS)
    assert models.create(name).training   # the CLI builds it with the name alone


def test_bad_arguments_name_what_was_expected():
    with pytest.raises(ValueError, match="in_channels must be a positive int, got 0"):
        models.create("resnet-20", in_channels=0)
    with pytest.raises(ValueError, match="num_classes must be a positive int"):
        models.create("vgg-d6", num_classes=-1)
    for name in ("digits-mlp", "lenet-300-100", "lenet-5-caffe", "vgg-like"):   # checked for every model
        for bad in (0, -1, 2.5, True):
            with pytest.raises(ValueError, match=f"create: num_classes must be a positive int, got {bad!r}"):
                models.create(name, num_classes=bad)
    with pytest.raises(ValueError, match="create: in_channels must be a positive int, got 1.5"):
        models.create("vgg-like", in_channels=1.5)
    with pytest.raises(ValueError, match="lenet-300-100 has a fixed input and takes no in_channels"):
        models.create("lenet-300-100", in_channels=3)
    with pytest.raises(ValueError, match="depth must be 6n \\+ 2"):
        models.CifarResNet(21)
    with pytest.raises(ValueError, match="shortcut must be 'A'"):
        models.CifarResNet(20, shortcut="C")
    with pytest.raises(ValueError, match="config must be one of"):
        models.PaperVGG("E")


# -- sizes -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,parameters,published", [("resnet-20", 269_722, "0.27"),
                                                       ("resnet-56", 853_018, "0.85"),
                                                       ("resnet-110", 1_727_962, "1.7")])
def test_resnet_parameters_match_the_published_counts(name, parameters, published):
    model = models.create(name)
    total = sum(p.numel() for p in model.parameters())
    assert total == parameters
    assert f"{total / 1e6:.{len(published) - 2}f}" == published   # He et al. 2016, Table 6


def test_weight_counts_as_the_paper_code_prints_them():
    # the paper's notebooks print these widths and totals (resnet/cifar10_resnet56_ard.ipynb,
    # vgg/cifar100_vggG5_ard_load.ipynb); D6's widths are those of its Table 4 row "@1"
    resnet56 = "3-16" + "-16-16" * 9 + "-32-32" * 9 + "-64-64" * 9 + " 64-10"
    assert paper_count(resnet56) == 848_944 == weights(models.create("resnet-56"))
    g5 = "3-64-64-128-128-256-256-256-256-512-512-512-512-512-512-512-512 512-100"
    assert paper_count(g5) == 20_070_080 == weights(models.create("vgg-g5", num_classes=100))
    d6 = "3-64-64-128-128-256-256-256-512-512-512-512-512-512 512-512-10"
    assert paper_count(d6) == weights(models.create("vgg-d6")) == 14_977_728
    resnet110 = "3-16" + "-16-16" * 18 + "-32-32" * 18 + "-64-64" * 18 + " 64-10"
    assert paper_count(resnet110) == weights(models.create("resnet-110"))


@pytest.mark.parametrize("name,num_classes,paper_macs,dense_macs", [
    ("resnet-56", 10, 125_485_056, 64 * 10),       # the paper's conv count; it leaves out the Linear
    ("resnet-110", 10, 252_887_040, 64 * 10),
    ("vgg-g5", 100, 398_182_400, 0)])              # its G5 count includes the Linear
def test_macs_match_the_paper_code(name, num_classes, paper_macs, dense_macs):
    model = models.create(name, num_classes=num_classes).eval()
    assert count_macs(model, (torch.zeros(1, 3, 32, 32),)) == paper_macs + dense_macs


def test_vgg_layouts():
    d6, g5 = models.create("vgg-d6"), models.create("vgg-g5")
    def convs(m):
        return [c.out_channels for c in m.modules() if isinstance(c, nn.Conv2d)]

    def dense(m):
        return [(c.in_features, c.out_features) for c in m.modules() if isinstance(c, nn.Linear)]
    assert convs(d6) == [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]
    assert convs(g5) == [64, 64, 128, 128] + [256] * 4 + [512] * 8
    assert dense(d6) == [(512, 512), (512, 10)] and dense(g5) == [(512, 10)]
    assert sum(isinstance(m, nn.BatchNorm2d) for m in d6.modules()) == 13
    assert isinstance(g5.features[-1], nn.AvgPool2d)
    assert not any(isinstance(m, (nn.Dropout, nn.BatchNorm1d)) for m in d6.modules())


# -- option-A shortcuts --------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(BLOCKS))
def test_shortcuts_are_zero_padding_without_parameters(name):
    model = models.create(name)
    shortcuts = [b.shortcut for b in model.modules() if isinstance(b, models.BasicBlock)]
    assert len(shortcuts) == 3 * BLOCKS[name]
    padded = [s for s in shortcuts if isinstance(s, models.ZeroPadShortcut)]
    assert len(padded) == 2   # entering stages 2 and 3; every other shortcut is the identity
    assert all(isinstance(s, nn.Identity) for s in shortcuts if s not in padded)
    assert not any("shortcut" in n for n, _ in model.named_parameters())
    assert not any("shortcut" in n for n, _ in model.named_buffers())


def test_zero_pad_shortcut_against_a_hand_built_reference():
    x = torch.randn(3, 5, 9, 7, dtype=torch.float64)
    got = models.ZeroPadShortcut(5, 12, 2)(x)
    sub = x[:, :, 0::2, 0::2]   # rows 0, 2, 4, 6, 8 and columns 0, 2, 4, 6
    expected = torch.cat([torch.zeros(3, 3, 5, 4, dtype=torch.float64), sub,
                          torch.zeros(3, 4, 5, 4, dtype=torch.float64)], dim=1)
    assert torch.equal(got, expected)
    assert torch.equal(models.ZeroPadShortcut(4, 4, 1)(x[:, :4]), x[:, :4])
    with pytest.raises(ValueError, match="out_channels \\(2\\) must be at least in_channels \\(4\\)"):
        models.ZeroPadShortcut(4, 2, 1)


def test_block_computes_the_residual_formula():
    torch.manual_seed(1)
    block = models.BasicBlock(4, 8, 2).double().eval()
    for bn in (block.bn1, block.bn2):
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    inner = F.relu(F.batch_norm(F.conv2d(x, block.conv1.weight, stride=2, padding=1), block.bn1.running_mean,
                                block.bn1.running_var, block.bn1.weight, block.bn1.bias, eps=block.bn1.eps))
    out = F.batch_norm(F.conv2d(inner, block.conv2.weight, padding=1), block.bn2.running_mean,
                       block.bn2.running_var, block.bn2.weight, block.bn2.bias, eps=block.bn2.eps)
    shortcut = torch.zeros(2, 8, 3, 3, dtype=torch.float64)
    shortcut[:, 2:6] = x[:, :, ::2, ::2]
    with torch.no_grad():
        torch.testing.assert_close(block(x), F.relu(out + shortcut), rtol=1e-12, atol=1e-12)


def test_option_b_keeps_the_projection():
    model = models.CifarResNet(20, shortcut="B")
    assert sum(p.numel() for p in model.parameters()) == 269_722 + 16 * 32 + 2 * 32 + 32 * 64 + 2 * 64


# -- the paper's ARD layers ----------------------------------------------------------------------
@pytest.mark.parametrize("name", list(BLOCKS))
def test_paper_ard_layers_are_the_first_conv_of_each_block(name):
    model = models.create(name)
    n = BLOCKS[name]
    expected = [f"layer{stage}.{i}.conv1" for stage in (1, 2, 3) for i in range(n)]
    assert models.paper_ard_layers(model) == expected
    assert models.paper_ard_layers(model, include_stem=True) == ["conv1"] + expected
    blocks = dict(model.named_modules())
    for layer in expected:
        block = blocks[layer.rpartition(".")[0]]
        assert isinstance(block, models.BasicBlock) and blocks[layer] is block.conv1


def test_paper_ard_layers_inside_another_model_and_refused_without_a_resnet():
    outer = nn.Sequential(nn.Identity(), models.create("resnet-20"))
    assert models.paper_ard_layers(outer)[:2] == ["1.layer1.0.conv1", "1.layer1.1.conv1"]
    with pytest.raises(ValueError, match="PaperVGG holds no CifarResNet.*MacKayPruner\\(layers=None\\)"):
        models.paper_ard_layers(models.create("vgg-g5"))


def test_paper_ard_filters_are_block_internal_channels():
    """Each filter of a paper ARD layer is a coupled group of its own block (conv1 output, bn1,
    conv2 input) and touches nothing of the residual stream, so it can be removed alone."""
    model = models.create("resnet-20")
    groups = channel_groups(model, (torch.randn(2, 3, 16, 16),))
    by_layer = {}
    for group in groups:
        owners = {m.name.rpartition(".")[0] for m in group.members}
        convs = [m for m in group.members if m.name.endswith("conv1.weight") and m.dim == 0]
        if convs and convs[0].name != "conv1.weight":   # not the stem
            block = convs[0].name.rsplit(".", 2)[0]
            assert owners == {f"{block}.conv1", f"{block}.bn1", f"{block}.conv2"}, group
            assert group.fixed is None
            by_layer.setdefault(convs[0].name, set()).update(convs[0].indices)
    layers = models.paper_ard_layers(model)
    assert sorted(by_layer) == sorted(f"{layer}.weight" for layer in layers)
    widths = {layer: model.get_submodule(layer).out_channels for layer in layers}
    assert all(by_layer[f"{layer}.weight"] == set(range(widths[layer])) for layer in layers)


# -- one training round with MacKay's update -------------------------------------------------------
@pytest.mark.parametrize("name", PAPER_NETS)
def test_trains_and_prunes_with_mackay_adam(name):
    torch.manual_seed(0)
    model = models.create(name, num_classes=10)
    is_resnet = name.startswith("resnet")
    layers = models.paper_ard_layers(model) if is_resnet else None
    # a small step, so that alpha moves far less than it varies over a layer's filters
    optimizer = MacKayAdam(ard_param_groups(model), lr=1e-5, num_data=50_000, batch_size=2)
    pruner = MacKayPruner(model, optimizer, num_data=50_000, granularity="filter", rule="paper",
                          prune="alpha", threshold=1e13, layers=layers)
    if is_resnet:
        assert list(pruner.layers) == layers
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([1, 7])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    def step():
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        return loss.item()

    assert math.isfinite(step())
    pruner.update()   # warm-up: alpha from the weights, nothing pruned
    for layer_name, layer in pruner.layers.items():   # one finite alpha per filter (conv) or input (Linear)
        alpha = pruner.alpha(layer_name)
        assert alpha.numel() == (layer.out_channels if isinstance(layer, nn.Conv2d) else layer.in_features)
        assert torch.isfinite(alpha).all() and (alpha > 0).all()
    # the paper's rule gives alpha_g = 1 / mean(w^2), about fan-in / 2 at He init, so layers differ: a threshold
    # at the highest per-layer median prunes about half of that layer and less of every other
    medians = {n: float(pruner.alpha(n).flatten().median()) for n in pruner.layers}
    highest = max(medians, key=medians.get)
    pruner.threshold = medians[highest]
    assert math.isfinite(step())
    pruner.update()
    for layer_name, layer in pruner.layers.items():
        pruned = torch.isinf(pruner.alpha(layer_name)).flatten()
        rows = layer.weight.flatten(1) if isinstance(layer, nn.Conv2d) else layer.weight.t()
        assert not rows[pruned].any() and rows[~pruned].any(1).all()   # pruned groups exactly zero
        assert 0 < int((~pruned).sum())
        if layer_name == highest:
            assert 0 < int(pruned.sum()) < pruned.numel()
    assert all(not torch.equal(before[n], p) for n, p in model.named_parameters() if p.dim() >= 2)
    if is_resnet:   # the layers without ARD keep every filter
        assert all(m.weight.flatten(1).any(1).all() for n, m in model.named_modules()
                   if n.endswith("conv2"))
