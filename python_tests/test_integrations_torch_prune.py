"""mackay_ext.integrations.torch_prune: MacKay masks <-> torch.nn.utils.prune masks."""
import math

import pytest
import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

from mackay_ext import MacKayAdam, MacKayPruner
from mackay_ext.integrations.torch_prune import (
    from_torch_prune,
    to_torch_prune,
    torch_prune_masks,
)


def _mlp():   # odd sizes
    return nn.Sequential(nn.Linear(7, 13), nn.Tanh(), nn.Linear(13, 5)).double()


def _pruned_by_mackay(granularity="weight"):
    model = _mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    pruner = MacKayPruner(model, optimizer, num_data=100, batch_size=10, granularity=granularity)
    generator = torch.Generator().manual_seed(1)
    for name in pruner.targets:
        alpha = pruner.alpha(name)
        alpha.copy_(torch.rand(alpha.shape, generator=generator, dtype=torch.float64).float() + 0.5)
        alpha.masked_fill_(torch.rand(alpha.shape, generator=generator) < 0.4, math.inf)
    pruner.apply_masks()
    return model, pruner


@pytest.mark.parametrize("granularity", ["weight", "input", "output"])
@pytest.mark.parametrize("remove", [False, True])
def test_masks_round_trip(granularity, remove):
    model, pruner = _pruned_by_mackay(granularity)
    x = torch.randn(9, 7, dtype=torch.float64)
    expected = model(x)
    written = to_torch_prune(pruner)
    assert written == ["0.weight", "2.weight"]
    assert torch.equal(model(x), expected)
    for name, (module, attr, mask) in torch_prune_masks(model).items():
        layer = name.rsplit(".", 1)[0]
        assert torch.equal(mask, (pruner.alpha(layer) != math.inf).expand_as(mask).double())
    # a second model that sees only the torch masks, loaded from the first one's state_dict
    # (as a tool that saved its masks would hand them over), nonzero weights under the masks
    other = _mlp()
    for layer in (other[0], other[2]):
        torch_prune.identity(layer, "weight")
    other.load_state_dict(model.state_dict())
    for module, attr, mask in torch_prune_masks(other).values():
        getattr(module, attr + "_orig").data.add_((mask == 0).double())   # nonzero under the mask
    optimizer = torch.optim.SGD(other.parameters(), lr=0.1)
    imported_into = MacKayPruner(other, optimizer, num_data=100, batch_size=10, granularity=granularity)
    assert sorted(imported_into.targets) == ["0.weight_orig", "2.weight_orig"]
    result = from_torch_prune(other, imported_into, remove=remove)
    assert result["left"] == []
    for layer in ("0", "2"):
        # a reparametrised weight_orig keeps its layer's groups: the same alpha shape comes back
        ours = imported_into.alpha(layer + ".weight_orig") == math.inf
        assert ours.shape == pruner.alpha(layer).shape
        assert torch.equal(ours, pruner.alpha(layer) == math.inf)
        theirs = (pruner.alpha(layer) == math.inf).expand_as(pruner.weight(layer))
        assert result["imported"][layer + ".weight_orig"] == int(theirs.sum())
    assert torch.equal(other(x), expected)
    assert bool(torch_prune_masks(other)) != remove
    kept = {name: f"{int(mask.sum())}/{mask.numel()} kept" for name, (_, _, mask) in torch_prune_masks(model).items()}
    print(f"granularity={granularity} remove={remove}: to_torch_prune -> {written} {kept}; "
          f"from_torch_prune -> {result}; outputs equal both ways")
    if remove:
        assert isinstance(other[0].weight, nn.Parameter)


@pytest.mark.parametrize("remove", [False, True])
def test_l1_unstructured_import_trains_with_pruned_entries_at_zero(remove):
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(11, 9), nn.ReLU(), nn.Linear(9, 3))
    torch_prune.l1_unstructured(model[0], "weight", amount=0.5)
    torch_prune.l1_unstructured(model[2], "weight", amount=7)
    torch_prune.l1_unstructured(model[2], "bias", amount=1)   # no prior on a bias: left as it is
    masks = {name: mask for name, (_, _, mask) in torch_prune_masks(model).items()}
    optimizer = MacKayAdam([{"params": [model[0].weight_orig, model[2].weight_orig]},
                            {"params": [model[0].bias, model[2].bias_orig], "ard": False}],
                           lr=1e-2, num_data=64, batch_size=16)
    pruner = MacKayPruner(model, optimizer, num_data=64)
    result = from_torch_prune(model, pruner, remove=remove)
    assert result == {"imported": {"0.weight_orig": 50, "2.weight_orig": 7}, "left": ["2.bias"]}
    x, y = torch.randn(64, 11), torch.randint(0, 3, (64,))
    for step in range(6):
        batch = slice(16 * (step % 4), 16 * (step % 4) + 16)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
        optimizer.step()
    for layer in ("0", "2"):
        pruned = masks[layer + ".weight"] == 0
        weight = pruner.weight(layer + ".weight_orig")
        assert torch.equal(weight[pruned], torch.zeros(int(pruned.sum())))
        assert bool((weight[~pruned] != 0).all())   # the kept weights trained
        assert torch.equal(model[int(layer)].weight[pruned], torch.zeros(int(pruned.sum())))
    report = pruner.update()   # the pruner goes on with the weights, reparametrised or not
    assert report["kept"] <= 9 * 11 + 9 * 3 - 57


def test_partial_group_mask_refused_and_nothing_changed():
    # the pruner first (grouped alpha), then another tool masks the model: found by identity
    model = _mlp()
    pruner = MacKayPruner(model, torch.optim.SGD(model.parameters(), lr=0.1), num_data=10,
                          batch_size=2, granularity="input")
    torch_prune.random_unstructured(model[0], "weight", amount=0.5)
    torch_prune.ln_structured(model[2], "weight", amount=4, n=2, dim=1)
    with pytest.raises(ValueError, match=r"mask of 0.weight removes part of an alpha group of 0 "
                                         r"\(granularity 'input', alpha shape \(1, 7\)\)"):
        from_torch_prune(model, pruner)
    assert not bool(pruner.alpha("0").isinf().any()) and not bool(pruner.alpha("2").isinf().any())
    torch_prune.remove(model[0], "weight")
    # whole input columns are accepted and stay one alpha per column
    assert from_torch_prune(model, pruner) == {"imported": {"2": 4 * 5}, "left": []}
    assert pruner.alpha("2").shape == (1, 13) and int(pruner.alpha("2").isinf().sum()) == 4


def test_tied_weight_written_to_every_owner():
    shared = nn.Linear(5, 5, bias=False).double()
    model = nn.Sequential(shared, nn.Tanh(), shared)
    pruner = MacKayPruner(model, torch.optim.SGD(model.parameters(), lr=0.1), num_data=10, batch_size=2)
    pruner.alpha("0").view(-1)[::3] = math.inf
    pruner.apply_masks()
    x = torch.randn(4, 5, dtype=torch.float64)
    expected = model(x)
    assert to_torch_prune(pruner) == ["0.weight", "2.weight"]
    assert model[0].weight_orig is model[2].weight_orig
    assert torch.equal(model(x), expected)


def test_bad_arguments():
    with pytest.raises(TypeError, match="pruner must be a mackay_ext.MacKayPruner, got dict"):
        to_torch_prune({})
    with pytest.raises(TypeError, match="pruner must be a mackay_ext.MacKayPruner, got NoneType"):
        from_torch_prune(_mlp(), None)
    with pytest.raises(TypeError, match="model must be an nn.Module, got str"):
        torch_prune_masks("model")


def test_updates_go_on_after_to_torch_prune():
    """to_torch_prune keeps the pruner's Parameter as weight_orig: later updates still run."""
    model, pruner = _pruned_by_mackay("weight")
    to_torch_prune(pruner)
    report = pruner.update()
    assert report["kept"] <= report["total"]


def _conv_and_linear():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 25, 4))


def test_ef_exact_serves_torch_pruned_layers_and_unimported_masks_are_said():
    """A new user's torch.nn.utils.prune layer: ef-exact refused it as if it were no Linear, and
    under ef-batch its masked weights took alphas of their own and counted as kept, silently.
    ef-exact now takes weight_orig (the squares masked: those of the zeroed plain layer times the
    mask), and update() says once which masks were not imported."""
    import copy
    import warnings
    import torch.nn.functional as F
    plain = _conv_and_linear()
    masked = copy.deepcopy(plain)
    torch_prune.l1_unstructured(masked[0], "weight", amount=0.4)
    torch_prune.l1_unstructured(masked[3], "weight", amount=0.5)
    masks = [masked[0].weight_mask, masked[3].weight_mask]
    with torch.no_grad():
        plain[0].weight.mul_(masks[0])
        plain[3].weight.mul_(masks[1])
    x, y = torch.randn(16, 3, 5, 5), torch.randint(0, 4, (16,))
    curvatures = []
    for model, imported in ((plain, False), (masked, True)):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
        pruner = MacKayPruner(model, optimizer, num_data=100, batch_size=16, curvature="ef-exact")
        if imported:
            assert from_torch_prune(model, pruner)["imported"] == {"0.weight_orig": 65, "3.weight_orig": 300}
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        with warnings.catch_warnings():
            warnings.simplefilter("error")   # imported: nothing to say
            pruner.update(prune=False)
        curvatures.append([pruner.curvature_estimate(name) for name in pruner.targets])
    for expected, got, mask in zip(*curvatures, masks):
        torch.testing.assert_close(got, expected * mask, rtol=1e-6, atol=0)
    unimported = _conv_and_linear()
    torch_prune.l1_unstructured(unimported[3], "weight", amount=0.5)
    optimizer = torch.optim.Adam(unimported.parameters())
    pruner = MacKayPruner(unimported, optimizer, num_data=100, batch_size=16)
    F.cross_entropy(unimported(x), y).backward()
    optimizer.step()
    with pytest.warns(RuntimeWarning, match=r"torch.nn.utils.prune masks zero weights this pruner counts as kept, "
                                            r"each with an alpha of its own: 3.weight_orig \(300\).*from_torch_prune"):
        pruner.update(prune=False)
    F.cross_entropy(unimported(x), y).backward()
    optimizer.step()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pruner.update(prune=False)   # said once
