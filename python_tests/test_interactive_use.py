"""A notebook user's pass (cells re-run, Ctrl-C, settings changed mid-run).

An update() stopped part-way (Ctrl-C) and run again: the re-run of an interrupted warm-up took the
layers it had reached as past their warm-up and pruned 66% of the network with no word. The next
update goes on from where it stopped when nothing changed since (mackay_ext.unfinished_update),
and ends where the uninterrupted update ends."""
import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import mackay_ext.pruner as pruner_module
from mackay_ext import MacKayPruner
from mackay_ext.optim import MacKayAdam, ard_param_groups

STEPS = 24


def _setup(fused):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 3))
    if fused:
        optimizer = MacKayAdam(ard_param_groups(model), lr=3e-3, num_data=256, batch_size=32)
        pruner = MacKayPruner(model, optimizer, num_data=256)
    else:
        optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
        pruner = MacKayPruner(model, optimizer, num_data=256, batch_size=32)
    return model, optimizer, pruner


def _train(model, optimizer, steps=STEPS):
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(32, 12, generator=generator)
        optimizer.zero_grad()
        F.cross_entropy(model(x), x[:, :3].argmax(1)).backward()
        optimizer.step()


def _stopped_update(pruner, monkeypatch, at_call=2):
    """update() with a KeyboardInterrupt raised in its `at_call`-th layer (as a Ctrl-C would)."""
    real, calls = pruner_module._mackay_update, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == at_call:
            raise KeyboardInterrupt
        return real(*args, **kwargs)
    with monkeypatch.context() as patch:
        patch.setattr(pruner_module, "_mackay_update", interrupted)
        with pytest.raises(KeyboardInterrupt):
            pruner.update()


def _run(monkeypatch, fused, stop_in=None, train_between=False):
    model, optimizer, pruner = _setup(fused)
    notes = []
    for update in range(3):
        _train(model, optimizer)
        if update == stop_in:
            _stopped_update(pruner, monkeypatch)
            if train_between:
                _train(model, optimizer, steps=2)
        with warnings.catch_warnings(record=True):
            warnings.simplefilter("always")
            notes += pruner.update()["notes"]
    return model, pruner, [n for n in notes if "stopped part-way" in n]


@pytest.mark.parametrize("fused", [False, True], ids=["torch-adam", "MacKayAdam"])
@pytest.mark.parametrize("stop_in", [0, 1], ids=["warm-up", "pruning-update"])
def test_a_stopped_update_run_again_ends_where_the_whole_update_ends(monkeypatch, fused, stop_in):
    model, pruner, _ = _run(monkeypatch, fused)
    stopped_model, stopped_pruner, notes = _run(monkeypatch, fused, stop_in=stop_in)
    assert [r["kept"] for r in stopped_pruner.history] == [r["kept"] for r in pruner.history]
    assert stopped_pruner.history[0]["kept"] == stopped_pruner.history[0]["total"]   # the warm-up prunes nothing
    for (name, got), expected in zip(stopped_model.state_dict().items(), model.state_dict().values()):
        assert torch.equal(got, expected), name
    for name in pruner.targets:
        assert torch.equal(stopped_pruner.alpha(name), pruner.alpha(name)), name
    assert len(notes) == 1 and "the layers it had done kept the result it gave them: 0" in notes[0]


def test_after_a_step_the_next_update_is_a_new_one(monkeypatch):
    """Steps after the stop moved the weights: the record no longer describes the model."""
    _, pruner, notes = _run(monkeypatch, fused=False, stop_in=1, train_between=True)
    assert notes == [] and len(pruner.history) == 3


@pytest.mark.parametrize("fused", [False, True], ids=["torch-adam", "MacKayAdam"])
def test_num_data_set_mid_run_is_the_prior_and_the_update_s(fused):
    """A notebook user's `pruner.num_data = N` mid-run: with MacKayAdam the next update refused,
    naming optimizer.load_state_dict, which they never called. It sets the optimizer's N too."""
    model, optimizer, pruner = _setup(fused)
    _train(model, optimizer, steps=2)
    pruner.num_data = 700
    _train(model, optimizer, steps=2)
    pruner.update(prune=False)
    assert pruner.num_data == 700
    if fused:
        assert {g["num_data"] for g in optimizer.param_groups if g.get("ard")} == {700}
    with pytest.raises(ValueError, match="num_data"):
        pruner.num_data = 0
