"""mackay_ext.integrations.lightning: MacKayPruning inside lightning.pytorch.Trainer.fit()."""
import logging
import math
import re
import warnings

import pytest
import torch
from torch import nn

pl = pytest.importorskip("lightning.pytorch")

from mackay_ext import MacKayAdam
from mackay_ext.integrations.lightning import MacKayPruning
from mackay_ext.optim import ard_param_groups

NUM_DATA = 96


class TinyClassifier(pl.LightningModule):
    def __init__(self, optimizer="adam"):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(7, 17), nn.Tanh(), nn.Linear(17, 3))
        self.optimizer = optimizer

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        if self.optimizer == "mackay":
            return MacKayAdam(ard_param_groups(self), lr=1e-2, num_data=NUM_DATA, batch_size=16)
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def _loader(batch_size=16):
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(NUM_DATA, 7, generator=generator)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 1).long()   # two inputs matter, five do not
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch_size)


# float32: under precision="64-true" the weights this Lightning restores from a checkpoint differ
# from the saved ones by ~1e-8 (float32 rounding), which would hide an exact comparison
def _fit(callback, max_epochs=2, optimizer="adam", ckpt_path=None, seed=0, batch_size=16, extra_callbacks=(),
         module=None, **options):
    torch.manual_seed(seed)
    if module is None:
        module = TinyClassifier(optimizer)
    options = {"logger": False, "enable_progress_bar": False, "enable_model_summary": False,
               "enable_checkpointing": False, "deterministic": True, **options}
    trainer = pl.Trainer(max_epochs=max_epochs, accelerator="cpu", callbacks=[callback, *extra_callbacks], **options)
    trainer.fit(module, train_dataloaders=_loader(batch_size), ckpt_path=ckpt_path)
    return trainer, module


# alpha >= 2e3: |w| below ~0.02 once trained under the prior
PRUNING = {"prune": "alpha", "threshold": 2e3, "dense_ratio": 0}   # (updates from the start: short runs)


def _check_pruned(callback):
    pruner = callback.pruner
    report = pruner.report()
    assert 0 < report["kept"] < report["total"]
    for name, target in pruner.targets.items():
        pruned = (pruner.alpha(name) == math.inf).expand_as(target.param)
        assert torch.equal(target.param[pruned], torch.zeros_like(target.param[pruned]))
    return report


@pytest.mark.parametrize("optimizer", ["adam", "mackay"])
def test_fit_prunes_and_logs(optimizer, caplog):
    callback = MacKayPruning(update_every=3, update_on="step", verbose=2, **PRUNING)
    with caplog.at_level(logging.INFO):
        trainer, _ = _fit(callback, optimizer=optimizer)
    assert callback.pruner.fused == (optimizer == "mackay")
    assert callback.pruner.num_data == NUM_DATA and trainer.global_step == 12
    assert len(callback.pruner.history) == 4   # steps 3, 6, 9, 12
    report = _check_pruned(callback)
    metrics = trainer.callback_metrics
    assert float(metrics["mackay/kept_fraction"]) == pytest.approx(report["kept"] / report["total"])
    assert float(metrics["mackay/updates"]) == 4.0 and "mackay/gamma_sum" in metrics
    assert "MacKayPruning (step 12): kept" in caplog.text and "  net.2: kept" in caplog.text
    print("\n".join(line for line in caplog.text.splitlines() if "MacKayPruning" in line or "  net." in line))


def test_warmup_updates_only_move_alpha():
    """As FitConfig's warmup_updates: the first updates set alpha and prune nothing."""
    callback = MacKayPruning(update_every=3, update_on="step", warmup_updates=3, **PRUNING)
    _fit(callback)
    history = callback.pruner.history
    assert len(history) == 4 and all(h["kept"] == h["total"] for h in history[:3])
    assert history[3]["kept"] < history[3]["total"]
    with pytest.raises(ValueError, match=r"MacKayPruning: warmup_updates must be an int >= 0, got -1"):
        MacKayPruning(warmup_updates=-1)


@pytest.mark.parametrize("given, fraction", [({}, 0.9), ({"max_prune_fraction": None}, None)])
def test_one_update_prunes_at_most_the_callbacks_share_of_a_layer(recwarn, given, fraction):
    """As MacKayCallback's: by default one update prunes at most 90% of a layer's live weights."""
    callback = MacKayPruning(update_every=3, update_on="step", prune="alpha", threshold=1e-30, dense_ratio=0,
                             **given)
    _fit(callback, max_epochs=1)   # 6 steps: the second update prunes (the first sets alpha)
    assert callback.pruner.max_prune_fraction == fraction and len(callback.pruner.history) == 2
    for layer in callback.pruner.history[-1]["layers"]:
        total = layer["total"]
        expected = 1 if fraction is None else total - math.floor(fraction * total)
        assert layer["kept"] == expected, layer["name"]


class _UpdateTimes(pl.Callback):
    """When the MacKayPruning (before it in the list) ran an update: (epoch, global step)."""
    def __init__(self, callback):
        self.callback, self.times, self._seen = callback, [], 0

    def _look(self, trainer):
        if self.callback.pruner is not None and len(self.callback.pruner.history) > self._seen:
            self._seen = len(self.callback.pruner.history)
            self.times.append((trainer.current_epoch, trainer.global_step))

    def on_train_batch_end(self, trainer, *args):
        self._look(trainer)

    def on_train_epoch_end(self, trainer, pl_module):
        self._look(trainer)


@pytest.mark.parametrize("options, times", [
    ({}, [(1, 12), (2, 18), (3, 24)]),                        # max_epochs 4: 2 dense epochs
    ({"dense": 3}, [(2, 18), (3, 24)]),
    ({"dense_ratio": 0}, [(0, 6), (1, 12), (2, 18), (3, 24)]),
    ({"update_on": "step", "update_every": 4}, [(1, 12), (2, 16), (3, 20), (3, 24)]),   # 24 steps: from 12
])
def test_the_run_trains_densely_before_the_first_update(options, times):
    """By default the first half of the run (max_epochs, or its optimizer steps) has no prior."""
    callback = MacKayPruning(**{"prune": "alpha", "threshold": 2e3, **options})
    probe = _UpdateTimes(callback)
    _fit(callback, max_epochs=4, extra_callbacks=[probe])
    assert probe.times == times


def test_a_run_of_unknown_length_needs_its_dense_part_given():
    callback = MacKayPruning(**{"prune": "alpha", "threshold": 2e3})
    with pytest.raises(ValueError, match=r"MacKayPruning: dense_ratio=0.5 needs the length of the run.*pass "
                                         r"dense=<the dense part's length>"):
        _fit(callback, max_epochs=-1, max_steps=-1)
    with pytest.raises(ValueError, match=r"MacKayPruning: dense must be an int >= 0 or None, got 1.5"):
        MacKayPruning(dense=1.5)


def test_a_mackay_adam_is_checked_against_the_step_batch_not_told_a_batch_size(recwarn):
    """With a MacKayAdam from configure_optimizers, its own batch_size is the one used: the callback
    passes the pruner none (no warning that a value it gave is unused) and warns when the
    optimizer's differs from the batch one optimizer step reads (here 16 x 2 accumulated)."""
    _fit(MacKayPruning(update_every=1, update_on="step", **PRUNING), optimizer="mackay")
    # (its batch of 16 is a large share of the NUM_DATA examples: said, and not what this checks)
    assert not [w for w in recwarn.list if "MacKay" in str(w.message) and "of num_data" not in str(w.message)]
    with pytest.warns(UserWarning, match="the MacKayAdam's batch_size is 16.0, but one optimizer step of this "
                                         "Trainer reads a gradient whose curvature needs batch_size=32"):
        _fit(MacKayPruning(update_every=1, update_on="step", **PRUNING), optimizer="mackay",
             accumulate_grad_batches=2)


def test_parameters_to_prune_and_accumulation():
    model_layers = []

    class Chosen(MacKayPruning):
        def on_fit_start(self, trainer, pl_module):
            self.parameters_to_prune = [(pl_module.net[2], "weight")]
            model_layers.append(pl_module)
            super().on_fit_start(trainer, pl_module)

    callback = Chosen(update_every=1, update_on="step", **PRUNING)
    trainer, _ = _fit(callback, accumulate_grad_batches=2)
    assert list(callback.pruner.targets) == ["net.2"]
    assert callback.pruner.batch_size == 16 * 2   # the effective batch of one optimizer step
    assert trainer.global_step == 6 and len(callback.pruner.history) == 6   # per optimizer step


def test_checkpoint_resumes_to_the_same_alpha(tmp_path):
    def callback():
        return MacKayPruning(update_every=3, update_on="step", **PRUNING)

    first = callback()
    trainer, module = _fit(first)
    report = _check_pruned(first)
    path = tmp_path / "fit.ckpt"
    trainer.save_checkpoint(path)
    saved = {name: first.pruner.alpha(name).clone() for name in first.pruner.targets}

    resumed = callback()
    _, module2 = _fit(resumed, ckpt_path=str(path), seed=5)   # other initial weights
    assert len(resumed.pruner.history) == 4 and resumed.pruner.report()["kept"] == report["kept"]
    for name, alpha in saved.items():
        assert torch.equal(resumed.pruner.alpha(name), alpha)
    assert all(torch.equal(a, b) for a, b in zip(module.parameters(), module2.parameters()))

    # going on from the checkpoint prunes as the uninterrupted run does
    longer = callback()
    _fit(longer, max_epochs=3)
    continued = callback()
    _fit(continued, max_epochs=3, ckpt_path=str(path), seed=5)
    assert len(continued.pruner.history) == len(longer.pruner.history) == 6
    for name in longer.pruner.targets:
        assert torch.equal(continued.pruner.alpha(name), longer.pruner.alpha(name))


def _pruned(pruner):
    """Per layer, where alpha is +inf (the weight's shape)."""
    return {name: (pruner.alpha(name) == math.inf).expand_as(target.param).clone()
            for name, target in pruner.targets.items()}


@pytest.mark.parametrize("optimizer", ["adam", "mackay"])
@pytest.mark.parametrize("options, times", [
    ({}, [(0, 6), (1, 12), (2, 18)]),   # no dense phase from dense_ratio: the model was fitted under its alphas
    ({"dense": 2}, [(1, 12), (2, 18)]),   # a given dense length still delays the first update
])
def test_a_second_fit_of_the_same_module_goes_on_with_its_ard_state(optimizer, options, times):
    """A fine-tune stage (a new Trainer, so a new optimizer) on the same LightningModule: the
    pruner built for the new optimizer loads the previous one's state, so the pruned weights stay
    at 0 with alpha +inf, the history goes on, and the updates come from the fit's start."""
    callback = MacKayPruning(prune="alpha", threshold=2e3, **options)   # dense half of 4 epochs: updates 2 and 3 prune
    first_trainer, module = _fit(callback, max_epochs=4, optimizer=optimizer)
    _check_pruned(callback)
    first, pruned = callback.pruner, _pruned(callback.pruner)
    kept_before = [h["kept"] for h in first.history]

    probe = _UpdateTimes(callback)
    probe._seen = len(kept_before)
    trainer, _ = _fit(callback, max_epochs=3, module=module, extra_callbacks=[probe])
    second = callback.pruner
    assert second is not first and second.optimizer is trainer.optimizers[0] is not first_trainer.optimizers[0]
    assert second.fused == (optimizer == "mackay")
    assert probe.times == times
    assert [h["kept"] for h in second.history[:len(kept_before)]] == kept_before
    assert len(second.history) == len(kept_before) + len(times)
    for name, target in second.targets.items():
        assert bool((second.alpha(name) == math.inf).expand_as(target.param)[pruned[name]].all()), name
        assert not bool(target.param[pruned[name]].any()), name   # no pruned weight grew back
    assert second.report()["kept"] <= first.report()["kept"]
    assert float(trainer.callback_metrics["mackay/updates"]) == len(second.history)

    # the callback on another LightningModule: a fresh pruner, with its dense phase (of 3 epochs: 1, or dense=2)
    _, other = _fit(callback, max_epochs=3, optimizer=optimizer, seed=3)
    history = callback.pruner.history
    assert callback.pruner.model is other and len(history) == (2 if options else 3)
    assert history[0]["kept"] == history[0]["total"]   # a first update, which never prunes


def test_a_later_fit_whose_layers_changed_says_so():
    """A fine-tune stage with a new head of another shape: the previous fit's ARD state does not
    fit the new pruner, and the fit is refused with what to do, not started afresh unsaid."""
    callback = MacKayPruning(update_every=3, update_on="step", **PRUNING)
    _, module = _fit(callback)
    module.net[2] = nn.Linear(17, 4)
    with pytest.raises(ValueError, match=r"MacKayPruning: this LightningModule's previous fit left an ARD state "
                                         r"that does not fit the pruner built for this one \(.*net.2.*\): its layers "
                                         r"changed .* Pass a new MacKayPruning to start the ARD state afresh"):
        _fit(callback, module=module)
    with pytest.raises(ValueError, match="does not fit the pruner built for this one"):   # (again: not afresh)
        _fit(callback, module=module)
    fresh = MacKayPruning(update_every=3, update_on="step", **PRUNING)
    _fit(fresh, module=module)   # (the refused pruner holds no weight)
    assert len(fresh.pruner.history) == 4


def test_a_checkpoint_given_to_a_later_fit_replaces_the_carried_state(tmp_path):
    """trainer.fit(ckpt_path=...) with a callback that holds the pruner of an earlier fit of the
    same module: the checkpoint's state is the one the fit goes on with, as a resumed run."""
    callback = MacKayPruning(update_every=3, update_on="step", **PRUNING)
    trainer, module = _fit(callback)   # updates at steps 3, 6, 9, 12
    path = tmp_path / "fit.ckpt"
    trainer.save_checkpoint(path)
    _fit(callback, module=module)   # a fine-tune stage: 4 more updates
    assert len(callback.pruner.history) == 8

    _fit(callback, max_epochs=3, module=module, ckpt_path=str(path))   # steps 13 to 18: updates at 15, 18
    assert len(callback.pruner.history) == 6
    uninterrupted = MacKayPruning(update_every=3, update_on="step", **PRUNING)
    _fit(uninterrupted, max_epochs=3)
    for name in uninterrupted.pruner.targets:
        assert torch.equal(callback.pruner.alpha(name), uninterrupted.pruner.alpha(name))


def test_a_checkpoint_without_ard_state_starts_afresh(tmp_path):
    """fit(ckpt_path=...) of a checkpoint a run without MacKayPruning saved (a dense pretraining):
    the weights restored are the checkpoint's, not zeroed where the module's previous fit pruned
    (that fit's state was carried onto them, no word), and the fresh start is said."""
    torch.manual_seed(0)
    module = TinyClassifier()
    plain = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                       enable_model_summary=False, enable_checkpointing=False)
    plain.fit(module, train_dataloaders=_loader())
    path = tmp_path / "dense.ckpt"
    plain.save_checkpoint(path)
    callback = MacKayPruning(update_every=3, update_on="step", **PRUNING)
    _fit(callback, module=module)
    assert callback.pruner.report()["kept"] < callback.pruner.report()["total"]

    class Restored(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            self.zeros = sum(int((p == 0).sum()) for p in pl_module.parameters())
    restored = Restored()
    with pytest.warns(UserWarning, match="holds no MacKayPruning state .* starts afresh") as said:
        _fit(callback, max_epochs=2, module=module, ckpt_path=str(path), extra_callbacks=[restored])
    ours = [w for w in said if "holds no MacKayPruning state" in str(w.message)]
    assert ours[0].filename == __file__   # the user's trainer.fit line (not Lightning's hook dispatch)
    assert restored.zeros == 0   # the dense checkpoint's weights, none zeroed
    assert len(callback.pruner.history) == 2   # this fit's own updates, at steps 9 and 12 (resumed at 6)


def test_the_end_of_a_fit_detaches_the_pruner(tmp_path):
    """After fit the pruner's hooks are off the module: test(ckpt_path=<an earlier checkpoint>) is
    not told its weights are stale, and a later backward keeps pruned weights' gradients."""
    callback = MacKayPruning(update_every=3, update_on="step", **PRUNING)
    checkpoint = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=3, save_top_k=-1)
    trainer, module = _fit(callback, extra_callbacks=[checkpoint], enable_checkpointing=True)
    assert callback.pruner.detached and callback.pruner.report()["kept"] < callback.pruner.report()["total"]
    module.test_step = lambda batch, batch_idx: None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.test(module, dataloaders=_loader(), ckpt_path=str(tmp_path / "epoch=0-step=3.ckpt"),
                     verbose=False)
    assert not [w for w in caught if "MacKay" in str(w.message)]
    x, y = next(iter(_loader()))
    nn.functional.cross_entropy(module(x), y).backward()
    for name, target in callback.pruner.targets.items():
        pruned = (callback.pruner.alpha(name) == math.inf).expand_as(target.param)
        if pruned.any():
            assert bool(target.param.grad[pruned].ne(0).any()), name


@pytest.mark.parametrize("curvature", ["ef-batch", "ef-exact"])
def test_accumulation_estimates_what_one_batch_does(curvature):
    """2 micro-batches of 8 and one batch of 16 on the same examples give Adam the same gradient
    (Lightning divides each micro-batch's loss by 2): the curvature and alpha agree too (ef-exact
    reads each backward as half of its examples' gradients: it read a quarter of the curvature)."""
    runs = {}
    for batch_size, accumulation in ((16, 1), (8, 2)):
        callback = MacKayPruning(update_every=3, update_on="step", curvature=curvature, **PRUNING)
        trainer, _ = _fit(callback, max_epochs=1, batch_size=batch_size, accumulate_grad_batches=accumulation)
        assert trainer.global_step == 6 and callback.pruner.batch_size == 16
        runs[batch_size] = callback.pruner
    one, two = runs[16], runs[8]
    assert len(one.history) == len(two.history) == 2   # the second update reads the curvature
    for name in one.targets:
        curvature = one.curvature(name)
        assert bool((curvature > 0).any())
        torch.testing.assert_close(two.curvature(name), curvature, rtol=1e-4, atol=1e-6 * float(curvature.max()))
        torch.testing.assert_close(two.alpha(name), one.alpha(name), rtol=1e-3, atol=0)
    assert two.history[-1]["gamma_sum"] == pytest.approx(one.history[-1]["gamma_sum"], rel=1e-4)


@pytest.mark.parametrize("update_on, every_n_train_steps", [("epoch", None), ("step", None), ("epoch", 2)])
def test_monitors_find_the_metrics_from_the_first_epoch(tmp_path, update_on, every_n_train_steps):
    """ModelCheckpoint and EarlyStopping on mackay/kept_fraction with the callback's defaults: the
    dense half has no update, yet the metrics are there from the first check on (kept 1.0, 0
    updates and a sum of gamma of one a weight before the first update), at epoch ends and, for
    every_n_train_steps, batch ends."""
    seen, gamma_sums = [], []

    class _Probe(pl.Callback):   # after the MacKayPruning: what a monitor reads at each epoch end
        def on_train_epoch_end(self, trainer, pl_module):
            metrics = trainer.callback_metrics
            seen.append((float(metrics["mackay/kept_fraction"]), float(metrics["mackay/updates"])))
            gamma_sums.append(float(metrics["mackay/gamma_sum"]))

    checkpoint = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, monitor="mackay/kept_fraction",
                                              every_n_train_steps=every_n_train_steps)
    stopping = pl.callbacks.EarlyStopping(monitor="mackay/kept_fraction")
    on_gamma = pl.callbacks.EarlyStopping(monitor="mackay/gamma_sum", patience=100)
    callback = MacKayPruning(update_on=update_on, prune="alpha", threshold=2e3)
    trainer, _ = _fit(callback, max_epochs=4, enable_checkpointing=True,
                      extra_callbacks=[_Probe(), checkpoint, stopping, on_gamma])
    assert gamma_sums[0] == 170.0 and gamma_sums[-1] == pytest.approx(callback.pruner.history[-1]["gamma_sum"])
    updates = len(callback.pruner.history)
    assert trainer.current_epoch == 4 and updates == (3 if update_on == "epoch" else 13)
    assert seen[:2] == [(1.0, 0.0), (1.0, 1.0)]   # the dense half, then a first update, which never prunes
    assert seen[-1] == (pytest.approx(_check_pruned(callback)["kept"] / 170), float(updates))
    assert seen[-1][0] <= float(checkpoint.best_model_score) < 1.0


def test_sparsify_at_end_says_how_to_store_the_module(tmp_path):
    """at_end="sparsify" leaves sparse layers, whose state_dict a new module's load_from_checkpoint
    does not take: the callback says so once, and what it advises stores the module."""
    callback = MacKayPruning(update_every=2, update_on="step", at_end="sparsify", prune="alpha", threshold=10,
                             dense_ratio=0)   # (both layers past sparsify's min_sparsity=0.5)
    with pytest.warns(UserWarning, match=r"MacKayPruning\(at_end='sparsify'\): the LightningModule now has sparse "
                                         r"layers \(net.0, net.2\).*mackay_ext.save_compressed\(module, path\) and "
                                         r"load it with load_compressed\(path, model=YourModule\(\)\), or "
                                         r"mackay_ext.densify\(module\) before trainer.save_checkpoint") as said:
        trainer, module = _fit(callback)
    assert len([w for w in said if "at_end='sparsify'" in str(w.message)]) == 1
    x = _loader().dataset.tensors[0]
    expected = module(x)

    import mackay_ext
    mackay_ext.save_compressed(module, str(tmp_path / "module.pt"))
    loaded = mackay_ext.load_compressed(str(tmp_path / "module.pt"), model=TinyClassifier())
    torch.testing.assert_close(loaded(x), expected)
    trainer.save_checkpoint(tmp_path / "sparse.ckpt")
    with pytest.raises(RuntimeError, match=r"net.2.weight"):   # what the warning heads off
        TinyClassifier.load_from_checkpoint(tmp_path / "sparse.ckpt")
    mackay_ext.densify(module)
    trainer.save_checkpoint(tmp_path / "dense.ckpt")
    torch.testing.assert_close(TinyClassifier.load_from_checkpoint(tmp_path / "dense.ckpt")(x), expected)


def test_one_mackay_pruning_per_trainer():
    """A second MacKayPruning, or the same one twice, is refused before any pruner is built, with
    what to do instead; Trainer(callbacks=[...]) refuses it itself, as two stateful callbacks
    with one state_key."""
    callback = MacKayPruning(**PRUNING)
    with pytest.raises(RuntimeError, match="MacKayPruning"):
        pl.Trainer(callbacks=[callback, MacKayPruning()])

    class TwoFromTheModule(TinyClassifier):
        def configure_callbacks(self):   # (they replace the Trainer's MacKayPruning)
            return [MacKayPruning(layers=["net.0"]), MacKayPruning(layers=["net.2"])]

    message = ("MacKayPruning: one MacKayPruning per Trainer (got 2{}): a pruner covers one optimizer's weights; "
               "for a subset of layers pass parameters_to_prune= or layers= to the one callback")
    with pytest.raises(ValueError, match=re.escape(message.format(""))):
        _fit(MacKayPruning(**PRUNING), module=TwoFromTheModule())

    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_checkpointing=False, callbacks=[callback])
    trainer.callbacks.append(callback)
    with pytest.raises(ValueError, match=re.escape(message.format(" (the same callback twice)"))):
        trainer.fit(TinyClassifier(), train_dataloaders=_loader())
    assert callback.pruner is None


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"update_every must be an int >= 1, got 0"):
        MacKayPruning(update_every=0)
    with pytest.raises(ValueError, match=r"prior='penalty' is not available"):
        MacKayPruning(prior="penalty")
    with pytest.raises(ValueError, match=r"update_on must be one of \('epoch', 'step'\), got 'batch'"):
        MacKayPruning(update_on="batch")
    with pytest.raises(ValueError, match="parameters_to_prune or layers, not both"):
        MacKayPruning([], layers=["net.0"])
    with pytest.raises(ValueError, match=r"verbose must be one of \(0, 1, 2\), got 3"):
        MacKayPruning(verbose=3)
    with pytest.raises(TypeError, match=r"verbose must be one of \(0, 1, 2\), got True"):
        MacKayPruning(verbose=True)
    # pruner options are checked when the callback is built, not when fit() starts
    with pytest.raises(TypeError, match=r"MacKayPruning: unknown option 'granularty' \(did you mean 'granularity'\?\)"):
        MacKayPruning(granularty="output")
    with pytest.raises(ValueError, match="MacKayPruning: num_data must be"):
        MacKayPruning(num_data=0)
    with pytest.raises(ValueError, match="MacKayPruning: batch_size must be"):
        MacKayPruning(batch_size=-1)
    # option values that need no model, and the form of parameters_to_prune, when built too
    with pytest.raises(ValueError, match=r"MacKayPruning: rule must be one of"):
        MacKayPruning(rule="bogus")
    with pytest.raises(ValueError, match=r"MacKayPruning: threshold must be finite and >= 0"):
        MacKayPruning(threshold=-1.0)
    with pytest.raises(TypeError, match=r"\(module, parameter name\) pairs, got 1"):
        MacKayPruning([1])
    with pytest.raises(TypeError, match=r"must be a list of \(module, parameter name\) pairs, got Linear"):
        MacKayPruning(nn.Linear(2, 2))
    with pytest.raises(TypeError, match=r"\(module, parameter name\) pairs, got 'net.0'"):
        MacKayPruning(["net.0"]).on_fit_start(
            type("T", (), {"optimizers": [torch.optim.SGD([nn.Parameter(torch.ones(1))], lr=1)],
                           "train_dataloader": _loader()})(), TinyClassifier())


def test_iterable_dataset_asks_for_num_data():
    """An IterableDataset has no length: the callback cannot know N and says which argument to pass."""
    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(_loader().dataset)

    fake_trainer = type("T", (), {"optimizers": [torch.optim.SGD([nn.Parameter(torch.ones(1))], lr=1)],
                                  "train_dataloader": torch.utils.data.DataLoader(Stream(), batch_size=16),
                                  "ckpt_path": None})()
    with pytest.raises(ValueError, match=r"MacKayPruning: the training dataloader's dataset has no length "
                                         r"\(an IterableDataset\?\): pass num_data=N"):
        MacKayPruning().on_fit_start(fake_trainer, TinyClassifier())


def test_step_updates_reach_the_logger_whatever_log_every_n_steps(tmp_path):
    """Updates every 4 steps, Lightning logging every 50: each update is written to the logger."""
    import csv
    callback = MacKayPruning(update_every=4, update_on="step", **PRUNING)
    torch.manual_seed(0)
    logger = pl.loggers.CSVLogger(str(tmp_path), name="run")
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", logger=logger, log_every_n_steps=50,
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                         callbacks=[callback])
    trainer.fit(TinyClassifier(), train_dataloaders=_loader())
    rows = list(csv.DictReader(open(logger.log_dir + "/metrics.csv")))
    logged = [(int(row["step"]), float(row["mackay/updates"])) for row in rows if row.get("mackay/updates")]
    assert logged == [(4, 1.0), (8, 2.0), (12, 3.0)]
    assert float(trainer.callback_metrics["mackay/updates"]) == 3.0


@pytest.mark.parametrize("clip, algorithm, clipped", [(1e-3, "norm", True), (1e-4, "value", True),
                                                     (1e6, "norm", False), (None, None, False)])
def test_clipping_is_corrected_or_said_once(recwarn, clip, algorithm, clipped):
    """Lightning clips after on_before_optimizer_step: norm clipping's factor c becomes the
    pruner's gradient_scale for the step (the prior and the curvature in the mean loss's units);
    clipping by value, which has no one factor, is counted and said once, naming the setting."""
    callback = MacKayPruning(update_on="step", update_every=2, **PRUNING)
    scales = []

    class _Probe(pl.Callback):   # after the MacKayPruning: the scale its step will use
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            norm = float(torch.linalg.vector_norm(torch.stack(
                [p.grad.norm() for p in pl_module.parameters() if p.grad is not None])))
            scales.append((callback.pruner.gradient_scale, norm))

    _fit(callback, max_epochs=1, gradient_clip_val=clip, gradient_clip_algorithm=algorithm, extra_callbacks=[_Probe()])
    said = [w for w in recwarn if "clipped the gradient" in str(w.message)]
    assert len(said) == int(clipped and algorithm == "value")
    if said:   # at the first update, after 2 steps
        message = str(said[0].message)
        assert f"gradient_clip_val={clip:g}, gradient_clip_algorithm={algorithm!r}" in message
        assert "at 2 of the 2 optimizer steps so far" in message and "largest seen before clipping" in message
    assert callback.clipping.clipped == (callback.clipping.steps if clipped else 0) and \
        callback.clipping.steps == (6 if clip else 0)
    assert len(scales) == 6
    for scale, norm in scales:
        expected = min(1.0, clip / (norm + 1e-6)) if clip and algorithm == "norm" else 1.0
        assert scale == pytest.approx(expected, rel=1e-5)
    assert callback.clipping.corrected == (6 if clipped and algorithm == "norm" else 0)