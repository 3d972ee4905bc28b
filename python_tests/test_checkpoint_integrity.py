"""Training checkpoints and the integrations' states are sealed with a digest (a damaged file
resumed without a word), and a state that is refused is refused whole: MacKayAdam, MacKayPruner
and Trainer.load_checkpoint check the values and leave nothing half loaded."""
import copy
import re
import math

import pytest
import torch
from torch import nn

from mackay_ext import MacKayAdam, MacKayPruner, ard_param_groups
from mackay_ext._checksum import DIGEST_KEY, load_sealed, payload_digest, save_sealed
from mackay_ext._files import CorruptFileError, load_plain
from mackay_ext.curvature import FisherAccumulator
from mackay_ext.data import Splits
from mackay_ext.train import FitConfig, Trainer

CONFIG = FitConfig(pretrain_epochs=1, rounds=1, epochs=2, batch_size=8)


def _splits(train=40, width=6):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(train + 20, width, generator=generator)
    y = (x[:, 0] > 0).long()
    return Splits(x[:train], y[:train], x[train:train + 10], y[train:train + 10], x[train + 10:],
                  y[train + 10:], name="mine")


def _net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 2))


@pytest.fixture()
def checkpoint(tmp_path):
    """A checkpoint of a run after its first precision updates (alpha, curvature, moments set)."""
    path = str(tmp_path / "checkpoint.pt")
    trainer = Trainer(_net(), _splits(), FitConfig(pretrain_epochs=1, rounds=1, epochs=2, batch_size=8,
                                                   finetune_epochs=0), checkpoint=path)
    trainer.pretrain()
    trainer._update_precisions()
    trainer._run_phase(1)
    trainer.save_checkpoint()
    return path


def _trainer():
    return Trainer(_net(seed=5), _splits(), FitConfig(pretrain_epochs=1, rounds=1, epochs=2, batch_size=8,
                                                      finetune_epochs=0))


def _edited(path, edit, reseal):
    """The file at `path` with `edit` applied to its contents, its digest made again (a
    deliberate edit) or kept (damage)."""
    state = torch.load(path, weights_only=True)
    digest = state.pop(DIGEST_KEY)
    edit(state)
    state[DIGEST_KEY] = payload_digest(state) if reseal else digest
    torch.save(state, path)
    return path


def _everything(trainer):
    return copy.deepcopy({"model": trainer.model.state_dict(), "optimizer": trainer.optimizer.state_dict(),
                          "pruner": trainer.pruner.state_dict(), "position": trainer.position,
                          "history": trainer.history, "rng": torch.get_rng_state()})


def _assert_same(before, after):
    flat_before, flat_after = _flatten(before), _flatten(after)
    assert flat_before.keys() == flat_after.keys()
    for key, value in flat_before.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, flat_after[key]), key
        else:
            assert value == flat_after[key] or (value != value and flat_after[key] != flat_after[key]), key


def _flatten(obj, prefix=""):
    if isinstance(obj, dict):
        return {k: v for key, item in obj.items() for k, v in _flatten(item, f"{prefix}/{key}").items()}
    if isinstance(obj, (list, tuple)):
        return {k: v for i, item in enumerate(obj) for k, v in _flatten(item, f"{prefix}/{i}").items()}
    return {prefix: obj}


def test_a_checkpoint_resumes_with_its_digest_checked(checkpoint):
    assert DIGEST_KEY in torch.load(checkpoint, weights_only=True)
    trainer = _trainer()
    trainer.load_checkpoint(checkpoint)
    assert trainer.position["phase"] == "round"
    assert DIGEST_KEY not in load_sealed(checkpoint, "checkpoint")


def test_a_damaged_checkpoint_is_refused_before_anything_is_loaded(checkpoint):
    """torch's zip reader checks no CRC: one changed weight resumed without a word."""
    def damage(state):
        state["model"]["0.weight"][0, 0] += 1e-3
    _edited(checkpoint, damage, reseal=False)
    trainer = _trainer()
    before = _everything(trainer)
    with pytest.raises(CorruptFileError, match="do not match the checksum saved with them"):
        trainer.load_checkpoint(checkpoint)
    _assert_same(before, _everything(trainer))


def test_a_checkpoint_from_before_the_digest_loads_with_a_warning(checkpoint):
    state = torch.load(checkpoint, weights_only=True)
    del state[DIGEST_KEY]
    torch.save(state, checkpoint)
    trainer = _trainer()
    with pytest.warns(UserWarning, match="carries no checksum"):
        trainer.load_checkpoint(checkpoint)
    assert trainer.position == state["position"]


@pytest.mark.parametrize("position", [{"phase": "bogus", "round": 0, "epoch": 0},
                                      {"phase": "round", "round": -1, "epoch": 0},
                                      {"phase": "round", "round": 1, "epoch": 1.5},
                                      {"phase": "round", "round": 1, "epoch": 0, "updated": "yes"},
                                      ["round", 1, 0]])
def test_an_edited_position_is_refused(checkpoint, position):
    """An unknown phase ran nothing and returned the model as it was, as if trained."""
    _edited(checkpoint, lambda state: state.update(position=position), reseal=True)
    with pytest.raises(ValueError, match="is not one Trainer writes"):
        _trainer().load_checkpoint(checkpoint)


@pytest.mark.parametrize("key, value", [("exp_avg_sq", -1.0), ("exp_avg", math.nan), ("alpha", math.nan),
                                        ("alpha", -2.0), ("curvature", math.inf)])
def test_a_refused_optimizer_state_leaves_the_trainer_as_it_was(checkpoint, key, value):
    """The model was loaded before the optimizer's state failed: half the checkpoint stayed in."""
    def poison(state):
        state["optimizer"]["state"][0][key].view(-1)[0] = value
    _edited(checkpoint, poison, reseal=True)
    trainer = _trainer()
    trainer._run_phase(1)   # a state of its own to keep
    before = _everything(trainer)
    with pytest.raises(ValueError, match=f"parameter 0's saved {key} holds"):
        trainer.load_checkpoint(checkpoint)
    _assert_same(before, _everything(trainer))


def test_a_failure_after_the_model_was_loaded_puts_everything_back(checkpoint, monkeypatch):
    """A refusal past the checks (here the pruner's, made to fail) still leaves nothing loaded."""
    trainer = _trainer()
    trainer._run_phase(1)
    before = _everything(trainer)
    real = MacKayPruner.load_state_dict
    calls = []

    def fail_once(self, state):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("made to fail")
        real(self, state)
    monkeypatch.setattr(MacKayPruner, "load_state_dict", fail_once)
    with pytest.raises(RuntimeError, match="made to fail"):
        trainer.load_checkpoint(checkpoint)
    _assert_same(before, _everything(trainer))


def _optimizer_and_state():
    model = _net()
    optimizer = MacKayAdam(ard_param_groups(model), lr=1e-2, num_data=40, batch_size=8)
    for _ in range(3):
        optimizer.zero_grad()
        model(torch.randn(8, 6)).square().mean().backward()
        optimizer.step()
    return model, optimizer, copy.deepcopy(optimizer.state_dict())


@pytest.mark.parametrize("key, value", [("step", -1.0), ("step", 2.5), ("step", math.inf),
                                        ("exp_avg_sq", -1e-8), ("exp_avg", math.inf), ("curvature", -1.0),
                                        ("curvature", math.nan), ("alpha", math.nan)])
def test_mackay_adam_refuses_values_no_step_writes(key, value):
    """Loaded, each made every later step NaN (or took the square root of a negative number)."""
    _, optimizer, state = _optimizer_and_state()
    mine = copy.deepcopy(optimizer.state_dict())
    state["state"][0][key] = state["state"][0][key].clone()
    state["state"][0][key].view(-1)[0] = value
    with pytest.raises(ValueError, match=f"parameter 0's saved {key} holds .* nothing was loaded"):
        optimizer.load_state_dict(state)
    _assert_same(mine, optimizer.state_dict())


@pytest.mark.parametrize("shape", [(3, 6), (7,), (2, 1, 6)])
def test_mackay_adam_refuses_an_alpha_that_fits_no_group_of_its_weight(shape):
    """Loaded, it made the next step raise, with the state kept: the optimizer had to be rebuilt."""
    model, optimizer, state = _optimizer_and_state()
    mine = copy.deepcopy(optimizer.state_dict())
    weight = model[0].weight
    state["state"][0]["alpha"] = torch.ones(shape)
    with pytest.raises(ValueError, match=rf"parameter 0's saved alpha has shape {re.escape(str(shape))}, neither the "
                                         rf"parameter's {re.escape(str(tuple(weight.shape)))} .*nothing was loaded"):
        optimizer.load_state_dict(state)
    _assert_same(mine, optimizer.state_dict())
    state["state"][0]["alpha"] = torch.ones(1, weight.shape[1])   # one per input: loads
    optimizer.load_state_dict(state)


def test_mackay_adam_takes_a_pruned_weights_infinite_alpha():
    _, optimizer, state = _optimizer_and_state()
    state["state"][0]["alpha"] = torch.full_like(state["state"][0]["alpha"], math.inf)
    optimizer.load_state_dict(state)
    assert bool(torch.isinf(optimizer.state_dict()["state"][0]["alpha"]).all())


def test_a_pruner_state_refused_part_way_is_put_back(monkeypatch):
    """Writes after the checks (the exact-curvature sums, the channel alphas) could fail with the
    alphas already replaced and the weights zeroed."""
    model, optimizer, _ = _optimizer_and_state()
    pruner = MacKayPruner(model, optimizer, num_data=40)
    pruner.update()
    other = _net(seed=3)
    other_pruner = MacKayPruner(other, MacKayAdam(ard_param_groups(other), lr=1e-2, num_data=40, batch_size=8), num_data=40)
    saved = other_pruner.state_dict()
    first = next(iter(saved["alpha"]))
    saved["alpha"][first] = torch.full_like(saved["alpha"][first], math.inf)   # prunes all of it
    before = copy.deepcopy((pruner.state_dict(), model.state_dict()))
    real = MacKayPruner._sample_next_batch
    monkeypatch.setattr(MacKayPruner, "_sample_next_batch", lambda self: (_ for _ in ()).throw(
        RuntimeError("made to fail")))
    with pytest.raises(RuntimeError, match="made to fail"):
        pruner.load_state_dict(saved)
    monkeypatch.setattr(MacKayPruner, "_sample_next_batch", real)
    _assert_same(before, (pruner.state_dict(), model.state_dict()))


def test_the_pruner_state_carries_its_step_count():
    model, optimizer, _ = _optimizer_and_state()
    pruner = MacKayPruner(model, optimizer, num_data=40)
    for _ in range(4):
        optimizer.zero_grad()
        model(torch.randn(8, 6)).square().mean().backward()
        optimizer.step()
    assert pruner.state_dict()["steps_total"] == 4
    fresh = _net()
    again = MacKayPruner(fresh, MacKayAdam(ard_param_groups(fresh), lr=1e-2, num_data=40, batch_size=8), num_data=40)
    again.load_state_dict(pruner.state_dict())
    assert again._steps_total == 4


def test_the_exact_curvature_sums_are_checked_before_they_are_replaced():
    model = _net()
    accumulator = FisherAccumulator(model)
    with accumulator:
        model(torch.randn(8, 6)).square().sum().backward()
    before = accumulator.state_dict()
    bad = copy.deepcopy(before)
    bad["0.weight"]["sum"][0, 0] = -1.0
    with pytest.raises(ValueError, match="0.weight's sum of squared gradients must hold finite non-negative"):
        accumulator.load_state_dict(bad)
    _assert_same(before, accumulator.state_dict())


@pytest.mark.parametrize("value", [{1, 2}, 1 + 2j, b"\x00\x01", torch.device("cpu"), torch.float16,
                                   torch.Size([2, 3])])
def test_what_torch_reads_back_is_sealed_and_checked(tmp_path, value):
    """A model's extra state or an optimizer's options may hold any type torch's safe loader
    reads: the digest covers each, and a file of them round-trips."""
    path = str(tmp_path / "state.pt")
    save_sealed({"value": value, "weights": torch.arange(3.0)}, path)
    assert load_sealed(path, "state")["value"] == value
    assert payload_digest({"value": value}) != payload_digest({"value": None})


def test_a_tar_file_is_not_met_with_torchs_advice_to_load_it_unchecked(tmp_path):
    path = str(tmp_path / "old.tar")
    torch.save({"a": torch.ones(2)}, path, _use_new_zipfile_serialization=False)
    import tarfile
    archive = str(tmp_path / "archive.tar")
    with tarfile.open(archive, "w") as handle:
        handle.add(path, arcname="inside")
    with pytest.raises(CorruptFileError, match="a tar archive") as error:
        load_plain(archive, "checkpoint")
    assert "weights_only" not in str(error.value)


@pytest.mark.parametrize("edit, error, message", [
    (lambda s: s["curvature_steps"].update({"0": math.nan}), ValueError, r"state\['curvature_steps'\] must map layers"),
    (lambda s: s["curvature_steps"].update({"0": "abc"}), ValueError, r"state\['curvature_steps'\] must map layers"),
    (lambda s: s.update(steps_since_update=-3), ValueError, r"state\['steps_since_update'\] must be an integer >= 0"),
    (lambda s: s.update(steps_total="x"), ValueError, r"state\['steps_total'\] must be an integer >= 0"),
    (lambda s: s.update(history=5), TypeError, r"state\['history'\] must be a list, got int"),
    (lambda s: s.update(alpha_before_switch_off="x"), TypeError, r"state\['alpha_before_switch_off'\] must be a dict"),
    (lambda s: s["alpha"].update(zzz=torch.zeros(1)), ValueError, r"holds layers this pruner has not: \['zzz'\]"),
    (lambda s: s["curvature"]["0"].view(-1).__setitem__(0, math.inf), ValueError, "curvature of layer '0' holds inf"),
    (lambda s: s.update(exact_curvature_ranks={"rank": 2, "world_size": 2, "whole": False}), ValueError,
     "exact_curvature_ranks must be a dict from MacKayPruner.state_dict"),
    (lambda s: s.update(exact_curvature_ranks=[0, 1]), ValueError, "exact_curvature_ranks must be a dict"),
])
def test_a_damaged_pruner_state_is_refused_naming_its_field(edit, error, message):
    """Loaded as they were (a NaN step count, a layer of another model, an inf curvature that the
    next update blamed on divergence), or refused with a bare Python error naming no field."""
    model, optimizer, _ = _optimizer_and_state()
    pruner = MacKayPruner(model, optimizer, num_data=40)
    pruner.update()
    state = copy.deepcopy(pruner.state_dict())
    edit(state)
    before = copy.deepcopy(pruner.state_dict())
    with pytest.raises(error, match=message):
        pruner.load_state_dict(state)
    _assert_same(before, pruner.state_dict())
