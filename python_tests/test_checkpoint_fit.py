"""Trainer.load_checkpoint names a file that is not a checkpoint of this run's network and
training set (mackay_ext.checkpoint_fit), before it reads anything into the model."""
import pytest
import torch
from torch import nn

from mackay_ext import save_compressed
from mackay_ext.data import Splits
from mackay_ext.train import FitConfig, Trainer


def _splits(train=40, seed=0, width=6):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(train + 20, width, generator=generator)
    y = (x[:, 0] > 0).long()
    return Splits(x[:train], y[:train], x[train:train + 10], y[train:train + 10], x[train + 10:],
                  y[train + 10:], name="mine")


def _net(hidden=5, width=6):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, 2))


CONFIG = FitConfig(pretrain_epochs=1, rounds=1, epochs=1, batch_size=8)


@pytest.fixture()
def checkpoint(tmp_path):
    path = str(tmp_path / "checkpoint.pt")
    trainer = Trainer(_net(), _splits(), CONFIG, checkpoint=path)
    trainer.save_checkpoint()
    return path


def test_the_run_own_network_and_data_resume(checkpoint):
    trainer = Trainer(_net(), _splits(), CONFIG)
    trainer.load_checkpoint(checkpoint)
    assert trainer.optimizer.param_groups[0]["num_data"] == trainer.pruner.num_data == 40


@pytest.mark.parametrize("data, message", [
    (_splits(train=30), "was saved by a run on 40 training examples of shape \\(6,\\); this Trainer's "
                        "training split has 30 of shape \\(6,\\). N enters every precision update"),
    (_splits(seed=1), "was saved by a run on another training set of the same size \\(40 examples"),
])
def test_another_training_set_is_refused(checkpoint, data, message):
    """The pruner took the new N, the optimizer kept the saved one, and the run went on."""
    trainer = Trainer(_net(), data, CONFIG)
    with pytest.raises(ValueError, match=message):
        trainer.load_checkpoint(checkpoint)
    assert trainer.optimizer.param_groups[0]["num_data"] == trainer.pruner.num_data == len(data.x_train)


def _older(checkpoint: str, path) -> str:
    """The checkpoint as versions before the training-set summary wrote it (no summary, no digest)."""
    from mackay_ext._checksum import DIGEST_KEY
    state = torch.load(checkpoint, weights_only=True)
    del state["data"], state[DIGEST_KEY]
    torch.save(state, path)
    return str(path)


def test_an_older_checkpoint_is_checked_by_its_n_and_says_what_cannot_be(checkpoint, tmp_path):
    """It held no summary and resumed on a set of another size with two N (the optimizer's saved
    one, the pruner's new one), and on another set of its size with no word."""
    older = _older(checkpoint, tmp_path / "older.pt")
    trainer = Trainer(_net(), _splits(train=30), CONFIG)
    with pytest.warns(UserWarning, match="before checkpoints recorded the training set"), \
            pytest.raises(ValueError, match=r"was saved by a run on 40 training examples; this Trainer's training "
                                            r"split has 30 of shape \(6,\)"):
        trainer.load_checkpoint(older)
    assert trainer.optimizer.param_groups[0]["num_data"] == trainer.pruner.num_data == 30
    trainer = Trainer(_net(), _splits(seed=1), CONFIG)
    with pytest.warns(UserWarning, match="whether this is the run's own training set cannot be checked beyond "
                                         "its size"):
        trainer.load_checkpoint(older)
    assert trainer.optimizer.param_groups[0]["num_data"] == trainer.pruner.num_data == 40


@pytest.mark.parametrize("written, message", [
    (2, r"written by a later mackay_ext \(pruner state format 2; this version reads up to 1\)"),
    ("1", r"the state's format must be a whole number >= 0, got '1'"),
])
def test_a_later_versions_state_is_refused_before_it_is_read(checkpoint, tmp_path, written, message):
    """A pruner state (alone, or in a checkpoint) of a later format would be misread: an earlier
    version that did not know a key resumed a later version's run to another result, no word."""
    from mackay_ext._checksum import DIGEST_KEY, payload_digest
    trainer = Trainer(_net(), _splits(), CONFIG)
    state = trainer.pruner.state_dict()
    assert state["format"] == 1
    with pytest.raises(ValueError, match=message):
        trainer.pruner.load_state_dict(dict(state, format=written))
    del state["format"]   # written before the format was kept: read as format 0
    trainer.pruner.load_state_dict(state)
    saved = torch.load(checkpoint, weights_only=True)
    saved["pruner"]["format"] = written
    saved[DIGEST_KEY] = payload_digest({k: v for k, v in saved.items() if k != DIGEST_KEY})
    torch.save(saved, tmp_path / "later.pt")
    with pytest.raises(ValueError, match=message):
        trainer.load_checkpoint(str(tmp_path / "later.pt"))


def test_another_network_is_named_before_the_phase_lengths(checkpoint):
    """It failed on the phase lengths first, then with torch's raw state_dict message."""
    config = FitConfig(pretrain_epochs=3, rounds=1, epochs=1, batch_size=8)
    with pytest.raises(ValueError, match=r"saved by a run of another network: 0.bias is \(5,\) there, "
                                         r"\(9,\) in this Trainer's model"):
        Trainer(_net(hidden=9), _splits(), config).load_checkpoint(checkpoint)


def test_a_compressed_model_or_a_state_dict_is_named(tmp_path):
    model = _net()
    save_compressed(model, str(tmp_path / "model.pt"))
    trainer = Trainer(_net(), _splits(), CONFIG)
    with pytest.raises(ValueError, match="is a compressed model written by save_compressed, not a training "
                                         "checkpoint: load it with mackay_ext.load_compressed"):
        trainer.load_checkpoint(str(tmp_path / "model.pt"))
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    with pytest.raises(ValueError, match="is not a checkpoint written by Trainer.save_checkpoint \\(it lacks "
                                         "model, optimizer, pruner"):
        trainer.load_checkpoint(str(tmp_path / "weights.pt"))
