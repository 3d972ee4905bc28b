"""Weights where alpha = +inf that are not 0: an early-stopping restore of a state_dict from
before the last pruning update (the report counted them pruned, the next step zeroed them, and
sparsify(model, MacKayAdam) dropped them: 131 live weights, logits moved by 0.61, no word), and
an EMA copy of the model, which the pruner does not hold (sparsify, save_compressed and shrink
found nothing to remove in it, and said nothing)."""
import copy
import warnings

import pytest
import torch
from torch import nn

import mackay_ext
from mackay_ext import MacKayAdam, MacKayPruner, ard_param_groups


def _pruned_run(kind):
    """A small MLP trained a little, its state_dict kept, then pruned by the alpha threshold."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 4))
    if kind == "mackay":
        optimizer = MacKayAdam(ard_param_groups(model), lr=1e-2, num_data=256, batch_size=32)
        pruner = MacKayPruner(model, optimizer, num_data=256, prune="alpha", threshold=30.0)
    else:
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        pruner = MacKayPruner(model, optimizer, num_data=256, batch_size=32, prune="alpha", threshold=30.0)
    x, y = torch.randn(256, 12), torch.randint(0, 4, (256,))

    def train(steps):
        for i in range(steps):
            batch = slice(32 * (i % 8), 32 * (i % 8 + 1))
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
            optimizer.step()

    train(40)
    pruner.update()                                   # warm-up: sets alpha
    train(40)
    best = copy.deepcopy(model.state_dict())          # the "best epoch", before the pruning update
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner.update()
    train(8)
    return model, optimizer, pruner, best, x


@pytest.mark.parametrize("kind", ["mackay", "adam"])
def test_a_restored_state_dict_that_predates_the_pruning_is_said(kind):
    model, optimizer, pruner, best, x = _pruned_run(kind)
    report = pruner.report()
    assert 0 < report["kept"] < report["total"]
    with pytest.warns(UserWarning, match=r"model.load_state_dict put nonzero values at \d+ weights this pruner "
                                         r"has pruned .*0: \d+.*Load the pruner's state_dict") as said:
        model.load_state_dict(best)
    assert said[0].filename == __file__   # the user's line (it named mackay_ext's copy_inert.py)
    live = sum(int(((model.get_submodule(n).weight != 0) & (pruner.alpha(n) == float("inf"))).sum())
               for n in pruner.targets)
    assert live > 0
    # sparsify keeps them: no output changes, and where it reads alpha (a MacKayAdam's) it says so
    with torch.no_grad():
        before = model(x)
    if kind == "mackay":
        with pytest.warns(UserWarning, match=rf"sparsify: {live} nonzero weights sit where the optimizer's alpha "
                                             r"is \+inf .*kept, so that no output changes"):
            mackay_ext.sparsify(model, optimizer, min_sparsity=0.0)
    else:   # (torch Adam has no alpha: the exact zeros are the structure)
        mackay_ext.sparsify(model, optimizer, min_sparsity=0.0)
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=0, atol=1e-6)


def test_apply_masks_after_the_restore_prunes_them_and_the_library_loaders_stay_quiet():
    model, optimizer, pruner, best, _ = _pruned_run("mackay")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.load_state_dict(best)
    pruner.apply_masks()
    for name in pruner.targets:
        assert not bool((model.get_submodule(name).weight[pruner.alpha(name) == float("inf")]).any())
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # consistent weights: nothing to say
        model.load_state_dict(copy.deepcopy(model.state_dict()))


def test_an_ema_copy_is_masked_by_apply_masks_and_then_sparsifies():
    model, optimizer, pruner, _, x = _pruned_run("adam")
    ema = torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(0.9))
    with torch.no_grad():
        for p in model.parameters():   # the average of an earlier, unpruned model: nonzero everywhere
            p.add_(0.01)
        ema.update_parameters(model)
        pruner.apply_masks()
        ema.update_parameters(model)
    average = copy.deepcopy(ema.module)
    with pytest.warns(UserWarning, match=r"sparsify: no layer reached min_sparsity=0.5 .*pruner.apply_masks\(copy\)") \
            as said:
        mackay_ext.sparsify(average)
    assert said[0].filename == __file__   # (it named torch's no_grad wrapper)
    assert isinstance(average[0], nn.Linear)
    pruner.apply_masks(ema)              # the AveragedModel itself, or its .module
    for name in pruner.targets:
        pruned = pruner.alpha(name) == float("inf")
        assert not bool(ema.module.get_submodule(name).weight[pruned].any())
        assert bool(ema.module.get_submodule(name).weight[~pruned].ne(0).all())
    small = copy.deepcopy(ema.module)
    with torch.no_grad():
        expected = small(x)
    mackay_ext.sparsify(small, min_sparsity=0.0)
    assert isinstance(small[0], mackay_ext.sparse.SparseLinear)
    with torch.no_grad():
        torch.testing.assert_close(small(x), expected, rtol=1e-5, atol=1e-6)


def test_apply_masks_refuses_a_model_of_another_structure():
    model, _, pruner, _, _ = _pruned_run("adam")
    with pytest.raises(ValueError, match=r"apply_masks: the model given has no '0' .*not a copy of the pruned model"):
        pruner.apply_masks(nn.Sequential(nn.ReLU()))
    with pytest.raises(ValueError, match=r"apply_masks: '0' of the model given has shape \(32, 13\), the pruned one \(32, 12\)"):
        pruner.apply_masks(nn.Sequential(nn.Linear(13, 32), nn.ReLU(), nn.Linear(32, 4)))
    with pytest.raises(TypeError, match=r"apply_masks: model must be a torch.nn.Module"):
        pruner.apply_masks("ema")


def test_a_layer_is_found_by_its_parameters_full_name_too():
    """pruner.alpha('0.weight') was a bare KeyError: '0.weight' (the layer is '0')."""
    model, _, pruner, _, _ = _pruned_run("adam")
    assert pruner.alpha("0.weight") is pruner.alpha("0")
    assert pruner.weight("2.weight") is model[2].weight
    assert pruner.curvature_estimate("2.weight").shape == model[2].weight.shape
    with pytest.raises(KeyError, match=r"no layer '0.bias'; its layers are \['0', '2'\]"):
        pruner.alpha("0.bias")


def test_an_unfrozen_layer_under_a_second_pruner_is_not_said_to_train_without_a_prior():
    """The warning said to build a new pruner (whose load_state_dict of the old state then failed);
    a second pruner on the unfrozen layers is what works, and the first then kept warning."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    model[0].requires_grad_(False)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    head = MacKayPruner(model, optimizer, num_data=64, batch_size=8)
    model[0].requires_grad_(True)
    with pytest.warns(UserWarning, match=r"0.weight is frozen when the pruner was built, trained since without a "
                                         r"prior .*a second MacKayPruner\(model, optimizer, ..., layers=\[...\]\)"):
        head.report()
    MacKayPruner(model, optimizer, num_data=64, batch_size=8, layers=["0"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        excluded = {e["name"]: e["reason"] for e in head.report()["excluded"]}
    assert excluded["0.weight"] == "frozen when this pruner was built; another pruner puts its prior on it since"


@pytest.mark.parametrize("kind", ["mackay", "adam"])
def test_a_load_that_assigns_new_weights_is_said_at_the_load(kind):
    """load_state_dict(assign=True) replaces the Parameters: the optimizer and the pruner hold the
    old ones, so training went on without the prior (or without training the new weights) until
    the next update refused."""
    model, optimizer, pruner, best, _ = _pruned_run(kind)
    with pytest.warns(UserWarning, match=r"load_state_dict\(assign=True\) replaced the weights of 0, 2: .*"
                                         r"Load with assign=False") as caught:
        model.load_state_dict(best, assign=True)
    assert caught[0].filename == __file__
    with pytest.raises(RuntimeError, match="the weights of 0, 2 are no longer the model's"):
        pruner.update()
