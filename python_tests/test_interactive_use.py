"""A notebook user's pass (cells re-run, Ctrl-C, settings changed mid-run).

An update() stopped part-way (Ctrl-C) and run again: the re-run of an interrupted warm-up took the
layers it had reached as past their warm-up and pruned 66% of the network with no word. The next
update goes on from where it stopped when nothing changed since (mackay_ext.unfinished_update),
and ends where the uninterrupted update ends."""
import warnings

import pytest
import torch
from conftest import pruner_step
from torch import nn
from torch.nn import functional as F

import mackay_ext.pruner as pruner_module
from mackay_ext import MacKayPruner
from mackay_ext.optim import MacKayAdam, ard_param_groups

STEPS = 24
SETUPS = ["torch-adam", "MacKayAdam", "ef-exact", "fisher-mc"]


def _setup(setup):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 3))
    if setup == "MacKayAdam":
        optimizer = MacKayAdam(ard_param_groups(model), lr=3e-3, num_data=256, batch_size=32)
        pruner = MacKayPruner(model, optimizer, num_data=256)
    else:
        optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
        curvature = setup if setup in ("ef-exact", "fisher-mc") else "ef-batch"
        pruner = MacKayPruner(model, optimizer, num_data=256, batch_size=32, curvature=curvature)
    return model, optimizer, pruner


def _train(model, optimizer, pruner, steps=STEPS):
    generator = torch.Generator().manual_seed(1)
    torch.manual_seed(2)   # fisher-mc's sampled labels
    for _ in range(steps):
        x = torch.randn(32, 12, generator=generator)
        pruner_step(pruner, model, optimizer, x, x[:, :3].argmax(1))


def _stopped_update(pruner, monkeypatch, at_call=2, where="_mackay_update"):
    """update() with a KeyboardInterrupt raised at the `at_call`-th call of `where` (as a Ctrl-C
    would): at a layer's start, or after its alpha was written (_layer_entry)."""
    real, calls = getattr(pruner_module.MacKayPruner, where, None) or getattr(pruner_module, where), []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == at_call:
            raise KeyboardInterrupt
        return real(*args, **kwargs)
    with monkeypatch.context() as patch:
        if hasattr(pruner_module.MacKayPruner, where):
            patch.setattr(pruner_module.MacKayPruner, where, interrupted)
        else:
            patch.setattr(pruner_module, where, interrupted)
        with pytest.raises(KeyboardInterrupt):
            pruner.update()


def _run(monkeypatch, setup, stop_in=None, train_between=False, where="_mackay_update"):
    model, optimizer, pruner = _setup(setup)
    notes = []
    for update in range(3):
        _train(model, optimizer, pruner)
        if update == stop_in:
            _stopped_update(pruner, monkeypatch, where=where)
            if train_between:
                _train(model, optimizer, pruner, steps=2)
        with warnings.catch_warnings(record=True):
            warnings.simplefilter("always")
            notes += pruner.update()["notes"]
    return model, pruner, [n for n in notes if "stopped part-way" in n]


@pytest.mark.parametrize("where", ["_mackay_update", "_layer_entry"], ids=["layer-start", "after-alpha"])
@pytest.mark.parametrize("setup", SETUPS)
@pytest.mark.parametrize("stop_in", [0, 1], ids=["warm-up", "pruning-update"])
def test_a_stopped_update_run_again_ends_where_the_whole_update_ends(monkeypatch, setup, stop_in, where):
    model, pruner, _ = _run(monkeypatch, setup)
    stopped_model, stopped_pruner, notes = _run(monkeypatch, setup, stop_in=stop_in, where=where)
    assert [r["kept"] for r in stopped_pruner.history] == [r["kept"] for r in pruner.history]
    assert stopped_pruner.history[0]["kept"] == stopped_pruner.history[0]["total"]   # the warm-up prunes nothing
    for (name, got), expected in zip(stopped_model.state_dict().items(), model.state_dict().values()):
        assert torch.equal(got, expected), name
    for name in pruner.targets:
        assert torch.equal(stopped_pruner.alpha(name), pruner.alpha(name)), name
    assert len(notes) == 1 and "the layers it had done kept the result it gave them: 0" in notes[0]


@pytest.mark.parametrize("setup", SETUPS)
def test_a_warm_up_stopped_then_trained_is_still_the_warm_up(monkeypatch, setup):
    """The cell run again after steps (train, then update): no update has happened yet, so the
    layers the stopped warm-up reached are warming up still (it pruned them: 113 of 384 kept)."""
    _, pruner, notes = _run(monkeypatch, setup, stop_in=0, train_between=True)
    assert notes == [] and len(pruner.history) == 3
    assert pruner.history[0]["kept"] == pruner.history[0]["total"]


@pytest.mark.parametrize("setup", ["torch-adam", "MacKayAdam"])
def test_num_data_set_mid_run_is_the_prior_and_the_update_s(setup):
    """A notebook user's `pruner.num_data = N` mid-run: with MacKayAdam the next update refused,
    naming optimizer.load_state_dict, which they never called. It sets the optimizer's N too."""
    model, optimizer, pruner = _setup(setup)
    _train(model, optimizer, pruner, steps=2)
    pruner.num_data = 700
    _train(model, optimizer, pruner, steps=2)
    pruner.update(prune=False)
    assert pruner.num_data == 700
    if setup == "MacKayAdam":
        assert {g["num_data"] for g in optimizer.param_groups if g.get("ard")} == {700}
    with pytest.raises(ValueError, match="num_data"):
        pruner.num_data = 0
    if setup == "torch-adam":
        with pytest.raises(ValueError, match=r"num_data \(16\) is below batch_size \(32\)"):
            pruner.num_data = 16
    assert pruner.num_data == 700
