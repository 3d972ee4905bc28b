"""mackay-ext prune says so when pruning cost much of the dense accuracy, and where the pruner
had to keep a layer's strongest group."""
from types import SimpleNamespace

import pytest

from mackay_ext.cli.prune import ACCURACY_LOSS_WARNING, _accuracy_loss_warning


def trainer(dense, history=()):
    return SimpleNamespace(dense_test_accuracy=dense, pruner=SimpleNamespace(history=list(history), prune="snr"))


def test_a_small_loss_says_nothing():
    assert _accuracy_loss_warning(trainer(0.95), 0.95 - 0.98 * ACCURACY_LOSS_WARNING) is None
    assert _accuracy_loss_warning(trainer(0.95), 0.97) is None
    assert _accuracy_loss_warning(trainer(None), 0.10) is None   # no dense figure to compare with


def test_a_collapse_names_the_points_lost_and_the_emptied_layers():
    history = [{"layers": [{"name": "fc1"}, {"name": "fc2"}]},
               {"layers": [{"name": "fc1", "kept_strongest": True}, {"name": "fc2"}]},
               {"skipped": True},
               {"layers": [{"name": "conv", "kept_strongest": True}, {"name": "fc1", "kept_strongest": True}]}]
    warning = _accuracy_loss_warning(trainer(0.9164, history), 0.0836)
    assert "lost 83.3 points" in warning and "91.64% dense -> 8.36%" in warning
    assert "layer(s) conv, fc1 " in warning and "--threshold" in warning


def test_a_loss_without_emptied_layers_still_warns():
    warning = _accuracy_loss_warning(trainer(0.99, [{"layers": [{"name": "fc1"}]}]), 0.90)
    assert "lost 9.0 points" in warning and "layer(s)" not in warning


@pytest.mark.parametrize("criterion, more, less", [("snr", "raise", "lower"), ("alpha", "lower", "raise")])
def test_the_warnings_turn_the_threshold_the_way_that_helps(criterion, more, less):
    """With snr (the default) a larger threshold prunes more, with alpha a smaller one: the
    'nothing was pruned' warning said 'lower --threshold' for both (under snr, pruning less)."""
    from mackay_ext.cli.prune import _nothing_pruned_warning
    from mackay_ext.train import FitConfig
    run = SimpleNamespace(config=FitConfig(), pruner=SimpleNamespace(prune=criterion, history=[{}]),
                          dense_test_accuracy=0.98)
    assert _nothing_pruned_warning(run, 10, 10).endswith(f"{more} --threshold")
    assert f"Prune less per update ({less} --threshold)" in _accuracy_loss_warning(run, 0.5)
