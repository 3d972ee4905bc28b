"""Units nobody listens to: their feeding weights are dropped, the network's output is unchanged
(Linear chains, conv -> conv, conv -> pool -> Flatten -> Linear), cascades are followed, and
models that are not a plain chain are left alone. Also MacKayPruner.prune_unused_units."""
import math
import warnings

import pytest
import torch
from torch import nn

from mackay_ext import MacKayPruner, models
from mackay_ext.dead_units import prune_unused_units
from mackay_ext.optim import MacKayAdam, ard_param_groups


def layers(model):
    return {n: m for n, m in model.named_children() if isinstance(m, (nn.Linear, nn.Conv2d))}


def random_masks(model, keep, generator):
    return {n: torch.rand(m.weight.shape, generator=generator) < keep for n, m in layers(model).items()}


def apply(model, masks):
    with torch.no_grad():
        for name, module in layers(model).items():
            module.weight.mul_(masks[name])


@pytest.mark.parametrize("name,shape,keep", [("lenet-300-100", (5, 1, 28, 28), 0.004),
                                             ("lenet-5-caffe", (5, 1, 28, 28), 0.02),
                                             ("digits-mlp", (7, 64), 0.03)])
def test_output_unchanged_and_unused_rows_dropped(name, shape, keep):
    generator = torch.Generator().manual_seed(0)
    model = models.create(name, num_classes=10).double()
    masks = random_masks(model, keep, generator)
    new = prune_unused_units(model, masks)
    assert all((new[n] <= masks[n]).all() for n in masks)  # only ever removes
    assert sum(int(masks[n].sum() - new[n].sum()) for n in masks) > 0
    x = torch.randn(shape, generator=generator, dtype=torch.float64)
    before = model
    after = models.create(name, num_classes=10).double()
    after.load_state_dict(before.state_dict())
    apply(before, masks)
    apply(after, new)
    torch.testing.assert_close(after(x), before(x), rtol=0, atol=1e-12)
    # every unit still fed has a listener in the next layer
    chain = list(layers(model).items())
    for (name_a, a), (name_b, b) in zip(chain, chain[1:]):
        fed = new[name_a].flatten(1).any(1)
        listened = new[name_b].transpose(0, 1).flatten(1).any(1)
        if listened.numel() != fed.numel():  # conv -> Flatten -> Linear
            listened = listened.reshape(fed.numel(), -1).any(1)
        assert not (fed & ~listened).any()


def test_cascade_through_layers():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2), nn.ReLU(), nn.Linear(2, 1))
    masks = {"0": torch.ones(4, 3, dtype=torch.bool), "2": torch.ones(2, 4, dtype=torch.bool),
             "4": torch.tensor([[True, False]])}
    new = prune_unused_units(model, masks)
    assert new["2"].tolist() == [[True] * 4, [False] * 4]
    assert new["0"].all()  # units of layer 0 still reach output 0 of layer 2
    masks["2"] = torch.tensor([[True, False, False, False], [True] * 4])
    new = prune_unused_units(model, masks)
    assert new["0"].tolist() == [[True] * 3] + [[False] * 3] * 3


@pytest.mark.parametrize("model, x, unread", [
    # a Linear on a conv's width axis (no Flatten): its inputs are not the conv's channels
    (nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Linear(8, 3)), torch.randn(2, 1, 5, 8), 1),
    # a per-token Linear flattened with its tokens: the next Linear's input 3t + j is unit j of
    # token t, so its first 4 inputs are not the first unit's
    (nn.Sequential(nn.Linear(6, 3), nn.ReLU(), nn.Flatten(), nn.Linear(12, 2)), torch.randn(2, 4, 6), 4),
])
def test_inputs_that_are_not_the_units_in_order_are_left_alone(model, x, unread):
    """prune_unused_units counts a consumer's inputs as the producer's units only where they are:
    here the sizes happen to fit, but dropping the 'silent' units would change the output."""
    torch.manual_seed(0)
    last = [m for m in model if isinstance(m, nn.Linear)][-1]
    with torch.no_grad():
        last.weight[:, :unread] = 0
        expected = model(x)
    masks = {n: m.weight != 0 for n, m in layers(model).items()}
    after = prune_unused_units(model, masks)
    assert all(torch.equal(after[n], masks[n]) for n in masks)
    apply(model, after)
    with torch.no_grad():
        assert torch.equal(model(x), expected)


def test_models_that_are_not_a_chain_are_left_alone():
    model = models.create("resnet-20", num_classes=10)
    masks = {n: torch.zeros_like(m.weight, dtype=torch.bool)
             for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    assert prune_unused_units(model, masks) == masks
    odd = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))  # a layer the chain does not know
    masks = {"0": torch.ones(4, 4, dtype=torch.bool), "2": torch.zeros(2, 4, dtype=torch.bool)}
    assert prune_unused_units(odd, masks)["0"].all()


@pytest.mark.parametrize("fused", [True, False])
def test_pruner_prunes_unused_units_with_grouped_alpha(fused):
    torch.manual_seed(0)
    model = models.create("lenet-300-100", num_classes=10)
    optimizer = MacKayAdam(ard_param_groups(model), num_data=100, batch_size=10) if fused else \
        torch.optim.Adam(model.parameters())
    pruner = MacKayPruner(model, optimizer, num_data=100, granularity="input", batch_size=10)
    pruner.alpha("5")[:, 50:] = math.inf  # inputs 50.. of the last layer: hidden units 50.. of layer 3
    pruner.apply_masks()
    removed = pruner.prune_unused_units()
    assert removed == 50 * 300
    alpha = pruner.alpha("3")
    assert alpha.shape == (100, 300) and torch.isinf(alpha[50:]).all() and torch.isfinite(alpha[:50]).all()
    assert (model[3].weight[50:] == 0).all() and pruner.granularity["3"] == "weight"
    assert pruner.prune_unused_units() == 0  # idempotent


@pytest.mark.parametrize("allow_empty_layers", [False, True])
def test_kept_groups_that_do_not_connect_empty_a_layer_with_a_warning(allow_empty_layers):
    """Each update keeps a group of every layer, but the next layer may read none of what the
    first kept: dropping the unread units then empties the first layer. Exact (the output no
    longer depended on the input anyway), but said, unless empty layers were allowed."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    optimizer = MacKayAdam(ard_param_groups(model), lr=1e-3, num_data=10, batch_size=2)
    pruner = MacKayPruner(model, optimizer, num_data=10, allow_empty_layers=allow_empty_layers)
    state = pruner.state_dict()
    state["alpha"]["0"] = torch.zeros(3, 4).index_fill_(0, torch.tensor([2]), math.inf)   # unit 2 made by nobody
    state["alpha"]["2"] = torch.zeros(2, 3).index_fill_(1, torch.tensor([0, 1]), math.inf)   # only unit 2 read
    pruner.load_state_dict(state)
    if allow_empty_layers:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert pruner.prune_unused_units() == 8
    else:
        with pytest.warns(RuntimeWarning, match=r"every kept weight of 0 \(Linear.weight, shape \(3, 4\)\) fed "
                                                r"units nobody reads any more, so the layer is now empty"):
            assert pruner.prune_unused_units() == 8
    assert not model[0].weight.any()
