"""What a new user's first session ran into: bad arguments accepted or failing without naming
the argument, a .tmp file left by Ctrl-C, torch's pickle-protocol warning before a refusal,
directories created by a typo, and a developer docstring as `mackay-ext --help`."""
from __future__ import annotations

import math
import os
import pickle
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import mackay_ext
from mackay_ext import (
    MacKayPruner,
    ard_param_groups,
    cli,
    densify,
    models,
    save_compressed,
    sparsify,
)
from mackay_ext._files import CorruptFileError, save_atomic
from mackay_ext.cli import args as cli_args


def small():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


def pruner(**kwargs):
    model, optimizer = small()
    return MacKayPruner(model, optimizer, num_data=100, batch_size=10, **kwargs)


# ---------------------------------------------------------------- arguments checked up front
@pytest.mark.parametrize("threshold, error", [
    ("x", TypeError), ("0.1", TypeError), (True, TypeError), ([0.1], TypeError),
    (math.nan, ValueError), (math.inf, ValueError), (-0.5, ValueError)], ids=repr)
def test_threshold_rejected_at_construction(threshold, error):
    with pytest.raises(error, match="MacKayPruner: threshold"):
        pruner(threshold=threshold)


@pytest.mark.parametrize("threshold", [0, 0.1, 1e13, np.float32(0.25)], ids=repr)
def test_threshold_numbers_accepted(threshold):
    assert pruner(threshold=threshold).threshold == float(threshold)


def test_threshold_default_stays_none():
    assert pruner().threshold is None


def test_layers_string_rejected():
    with pytest.raises(TypeError, match=r"MacKayPruner: layers must be a list .*\['02'\]"):
        pruner(layers="02")
    with pytest.raises(TypeError, match="MacKayPruner: layers"):
        pruner(layers=2)
    assert set(pruner(layers=["0"]).layers) == {"0"}


def test_model_and_optimizer_types_named():
    model, optimizer = small()
    with pytest.raises(TypeError, match="MacKayPruner: model must be a torch.nn.Module, got str"):
        MacKayPruner("model", optimizer, num_data=100, batch_size=10)
    with pytest.raises(TypeError, match=r"MacKayPruner: optimizer must be a torch.optim.Optimizer or None, got str"):
        MacKayPruner(model, "adam", num_data=100, batch_size=10)


def test_ard_param_groups_and_sparsify_name_the_model():
    with pytest.raises(TypeError, match="ard_param_groups: model must be a torch.nn.Module, got list"):
        ard_param_groups([1, 2])
    with pytest.raises(TypeError, match="ard_param_groups: is_ard must be a function"):
        ard_param_groups(small()[0], is_ard="weight")
    with pytest.raises(TypeError, match="sparsify: model must be a torch.nn.Module, got str"):
        sparsify("x")
    with pytest.raises(TypeError, match="densify: model must be a torch.nn.Module, got str"):
        densify("x")


@pytest.mark.parametrize("state, error, match", [
    ({}, KeyError, "state has no 'alpha' or 'curvature' entry"),
    ({"alpha": {}}, KeyError, "state has no 'curvature' entry"),
    (None, TypeError, "state must be a dict from MacKayPruner.state_dict\\(\\), got NoneType"),
    ([("alpha", {})], TypeError, "state must be a dict .* got list")], ids=["empty", "no-curvature", "None", "list"])
def test_load_state_dict_names_what_is_missing(state, error, match):
    with pytest.raises(error, match=f"MacKayPruner.load_state_dict: {match}"):
        pruner().load_state_dict(state)


def test_load_state_dict_round_trip_still_works():
    state = pruner().state_dict()
    state["alpha"] = {n: a + 3.0 for n, a in state["alpha"].items()}
    target = pruner()
    target.load_state_dict(state)
    for name in target.targets:
        torch.testing.assert_close(target.alpha(name), state["alpha"][name])


def test_save_compressed_checks_model_name_as_models_create_does(tmp_path):
    with pytest.raises(ValueError) as created:
        models.create("lenet-9000")
    path = tmp_path / "x.pt"
    with pytest.raises(ValueError, match="save_compressed: model_name") as saved:
        save_compressed(small()[0], str(path), model_name="lenet-9000")
    assert str(created.value) in str(saved.value)
    assert not path.exists()
    with pytest.raises(TypeError, match="save_compressed: model must be a torch.nn.Module"):
        save_compressed("model", str(path))


# ---------------------------------------------------------------- files
def test_save_atomic_interrupted_leaves_no_tmp(tmp_path, monkeypatch):
    path = str(tmp_path / "checkpoint.pt")
    save_atomic({"epoch": 1}, path)
    real_save = torch.save

    def interrupted(obj, handle):
        handle.write(b"half a checkpoint")   # the temp file exists and holds bytes
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_atomic({"epoch": 2}, path)
    monkeypatch.setattr(torch, "save", real_save)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.pt"]
    assert torch.load(path, weights_only=True) == {"epoch": 1}   # the previous file is untouched


def test_load_compressed_refuses_plain_pickle_without_torch_warning(tmp_path):
    path = tmp_path / "evil.pkl"
    with open(path, "wb") as handle:
        pickle.dump({"format": "mackay_ext.compressed.v1"}, handle, protocol=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(CorruptFileError, match="evil.pkl cannot be read"):
            mackay_ext.load_compressed(str(path))
    assert [str(w.message) for w in caught if "pickle protocol" in str(w.message)] == []


def test_save_compressed_refuses_missing_folder(tmp_path, monkeypatch):
    missing = tmp_path / "nonexistent" / "dir"
    with pytest.raises(FileNotFoundError, match=f"save_compressed: path .*{missing}.* does not exist"):
        save_compressed(small()[0], str(missing / "x.pt"))
    assert not (tmp_path / "nonexistent").exists()
    monkeypatch.chdir(tmp_path)             # a bare file name is in the current folder
    sizes = save_compressed(small()[0], "x.pt")
    assert sizes["bytes"] == os.path.getsize(tmp_path / "x.pt")


# ---------------------------------------------------------------- the command line
def test_help_describes_the_tool_not_the_module(capsys):
    with pytest.raises(SystemExit) as exited:
        cli.main(["--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    description = out.split("positional arguments")[0]
    assert cli_args.__doc__.strip() not in out
    assert "prune" in description and "evaluate" in description and "MacKay" in description
