"""The table's recipes in the product: mackay_ext.recipes, the Trainer phases they need, and
`mackay-ext prune --recipe NAME` / `--granularity channel`."""
import dataclasses
import json
import subprocess
import sys
import warnings

import pytest
import torch

import mackay_ext
from mackay_ext import recipes
from mackay_ext.train import FitConfig, Trainer

from test_data import fake_mnist


def cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "mackay_ext.cli", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("name", sorted(recipes.RECIPES))
def test_every_recipe_builds_a_trainer(name):
    recipe = recipes.get(name)
    blank = torch.zeros(4, 1, 28, 28)
    labels = torch.zeros(4, dtype=torch.long)
    data = mackay_ext.data.Splits(blank, labels, blank, labels, blank, labels, "mnist")
    options = dict(recipe.pruner)
    if options.get("mac_price"):   # priced units are traced on example inputs (the CLI passes two)
        options["example_inputs"] = blank[:2]
    trainer = Trainer(mackay_ext.models.create(recipe.model), data, recipe.fit_config(), pruner_options=options)
    assert trainer.config.update_every_steps == recipes.UPDATE_EVERY_STEPS
    assert trainer.config.augment_shift == 2 and trainer.config.finetune_epochs > 0
    # four examples make every batch of four, whatever the recipe's batch_size: B of h = B g^2
    assert {group["batch_size"] for group in trainer.optimizer.param_groups} == {4}


def test_unknown_recipe_lists_the_others():
    with pytest.raises(ValueError, match="unknown recipe 'lenet'; recipes: lenet-300-100-group"):
        recipes.get("lenet")


def tiny_images(n=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=g)
    y = (x.mean((1, 2, 3)) > 0).long()
    return mackay_ext.data.Splits(x, y, x[:32], y[:32], x[:32], y[:32], "tiny")


def test_in_run_steps_warmup_and_finetune_phases():
    """Updates every K steps, the first `warmup_updates` prune nothing, then fine-tuning with the
    prior off holds the pruned weights at 0 while the kept ones train; best weights kept."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 32), torch.nn.ReLU(),
                                torch.nn.Linear(32, 2))
    config = FitConfig(schedule="in-run", pretrain_epochs=2, epochs=6, update_every_steps=3,
                       warmup_updates=2, finetune_epochs=3, finetune_lr=1e-3, lr_schedule="cosine",
                       batch_size=16, retrain_lr=5e-3, backend="torch", patience=100)
    trainer = Trainer(model, tiny_images(), config, pruner_options=dict(threshold=0.5))
    trainer.run()
    history = trainer.pruner.history
    assert len(history) == 6 * 6 // 3                 # 6 steps an epoch, an update every 3
    assert history[0]["kept"] == history[1]["kept"] == history[0]["total"]   # warm-up updates
    assert history[-1]["kept"] < history[-1]["total"]
    phases = [record["phase"] for record in trainer.history]
    assert phases == ["pretrain"] * 2 + ["round"] * 6 + ["finetune"] * 3
    for name, target in trainer.pruner.targets.items():
        alpha = trainer.pruner.alpha(name)
        assert set(alpha.unique().tolist()) <= {0.0, float("inf")}       # prior off, pruned held
        assert (target.param[(alpha == float("inf")).expand_as(target.param)] == 0).all()
    assert trainer.position["phase"] == "done"


@pytest.fixture(scope="module")
def mnist_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("mnist")
    fake_mnist(str(directory), n_train=600, n_test=100)
    return directory


def test_cli_recipe_runs_the_recipe(mnist_dir, tmp_path):
    result = cli("prune", "--recipe", "lenet-300-100-weight", "--data-dir", str(mnist_dir),
                 "--pretrain-epochs", "1", "--epochs", "2", "--finetune-epochs", "1",
                 "--out", str(tmp_path / "run"), "--quiet", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    settings = report["settings"]
    assert settings["recipe"] == "lenet-300-100-weight" and settings["model"] == "lenet-300-100"
    assert settings["augment_shift"] == 2 and settings["finetune_epochs"] == 1
    assert settings["threshold"] == recipes.get("lenet-300-100-weight").pruner["threshold"]


def test_cli_priced_recipe_prices_units_and_finetunes_with_smaller_shifts(mnist_dir, tmp_path):
    result = cli("prune", "--recipe", "lenet-300-100-priced", "--data-dir", str(mnist_dir),
                 "--pretrain-epochs", "1", "--epochs", "2", "--finetune-epochs", "1",
                 "--out", str(tmp_path / "run"), "--quiet", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    settings = report["settings"]
    assert settings["mac_price"] == 0.03 and settings["mac_price_ramp"] == 40
    assert settings["granularity"] == "filter"
    # 2 epochs of 600 images are 10 steps, no update (one every 430): the run says so, not just "1.0x"
    assert report["weights_kept"] == report["weights_total"] and report["updates"] == []
    assert any("nothing was pruned: 0 precision update(s) ran (every 430 optimizer steps; the first 5 only "
               "move alpha)" in w for w in report["warnings"])
    assert "warning: nothing was pruned" in result.stderr


@pytest.mark.parametrize("flag_shift, finetune_shift", [(2, 1), (1, 1), (0, 0)])
def test_the_cli_caps_a_recipes_finetune_shift_at_augment_shift(flag_shift, finetune_shift):
    from mackay_ext.cli.settings import _fit_config
    settings = dict(recipe="lenet-300-100-priced", pretrain_epochs=1, epochs=1, batch_size=8, lr=1e-3,
                    patience=5, seed=0, backend="torch", augment_shift=flag_shift, finetune_epochs=1)
    assert _fit_config(settings).finetune_augment_shift == finetune_shift
    settings["recipe"] = "lenet-300-100-weight"   # a recipe without its own fine-tune shifts
    assert _fit_config(settings).finetune_augment_shift is None


def test_the_cli_lr_scales_every_phase_of_a_recipe():
    """--lr moved the pretraining's rate alone: the pruning phase (2e-3 in lenet-5-caffe-weight)
    and the fine-tune kept theirs, so a diverged run's 'try a smaller --lr' reran at the same rate."""
    from mackay_ext.cli.settings import _fit_config
    settings = dict(recipe="lenet-5-caffe-weight", pretrain_epochs=1, epochs=1, batch_size=8, lr=1e-3,
                    patience=5, seed=0, backend="torch", augment_shift=2, finetune_epochs=1)
    recipe = recipes.get("lenet-5-caffe-weight").config
    same = _fit_config(settings)
    assert (same.lr, same.retrain_lr, same.finetune_lr) == (recipe.lr, recipe.retrain_lr, recipe.finetune_lr)
    halved = _fit_config(dict(settings, lr=5e-4))
    assert (halved.lr, halved.retrain_lr, halved.finetune_lr) == pytest.approx(
        (recipe.lr / 2, recipe.retrain_lr / 2, recipe.finetune_lr / 2))


@pytest.mark.parametrize("flag", [["--model", "digits-mlp"], ["--granularity", "input"],
                                  ["--schedule", "paper"], ["--rounds", "7"]])
def test_cli_recipe_refuses_flags_it_sets(tmp_path, flag):
    result = cli("prune", "--recipe", "lenet-5-caffe-weight", *flag, "--out", str(tmp_path), cwd=tmp_path)
    assert result.returncode == 2
    assert f"--recipe lenet-5-caffe-weight sets {flag[0]}" in result.stderr


def test_cli_refuses_rounds_for_the_in_run_schedule(tmp_path):
    """--rounds has no effect on --schedule in-run: refused, not recorded as if it were used."""
    result = cli("prune", "--schedule", "in-run", "--rounds", "5", "--out", str(tmp_path), cwd=tmp_path)
    assert result.returncode == 2
    assert "--rounds counts the rounds of --schedule paper; --schedule in-run has none" in result.stderr


def test_cli_channel_granularity(tmp_path):
    result = cli("prune", "--granularity", "channel", "--pretrain-epochs", "3", "--rounds", "1",
                 "--epochs", "3", "--out", str(tmp_path / "run"), "--quiet", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["settings"]["granularity"] == "channel"
    evaluated = cli("evaluate", str(tmp_path / "run" / "model.pt"), cwd=tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr
    assert json.loads(evaluated.stdout)["test_accuracy"] == pytest.approx(report["test_accuracy"])


def test_mnist32_and_a_cifar_network_with_one_channel(tmp_path):
    """Issue 13's evidence runs: MNIST zero-padded to 32x32 through a CIFAR ResNet built for one
    input channel; the model file rebuilds itself (channels, dataset) for evaluate."""
    directory = tmp_path / "mnist"
    fake_mnist(str(directory), n_train=300, n_test=60)
    splits = mackay_ext.data.load("mnist32", str(directory))
    plain = mackay_ext.data.load("mnist", str(directory))
    assert splits.x_train.shape[1:] == (1, 32, 32) and splits.name == "mnist32"
    border = splits.x_train[:, :, :2, :].flatten()
    assert torch.allclose(border, border.min().expand_as(border))      # background all round

    def unit(t):  # standardisation differs with the border: compare up to scale and offset
        return (t - t.min()) / (t.max() - t.min())
    assert torch.allclose(unit(splits.x_train[:, :, 2:-2, 2:-2]), unit(plain.x_train), atol=1e-5)
    result = cli("prune", "--model", "resnet-20", "--dataset", "mnist32", "--data-dir", str(directory),
                 "--pretrain-epochs", "1", "--rounds", "1", "--epochs", "1", "--out",
                 str(tmp_path / "run"), "--quiet", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    evaluated = cli("evaluate", str(tmp_path / "run" / "model.pt"), "--data-dir", str(directory),
                    cwd=tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr
    summary = json.loads(evaluated.stdout)
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert summary["dataset"] == "mnist32"
    assert summary["test_accuracy"] == pytest.approx(report["test_accuracy"])


@pytest.mark.parametrize("field, value, message", [
    ("retrain_lr", -1e-3, "retrain_lr must be a finite number >= 0, got -0.001"),
    ("finetune_lr", float("nan"), "finetune_lr must be a finite number >= 0"),
    ("batch_size", 32.5, "batch_size must be an integer >= 1, got 32.5"),
    ("lr_decay", 2.0, r"lr_decay \(the plateau schedule's factor\) must be in \(0, 1\), got 2.0"),
    ("lr_decay", 0.0, "lr_decay"),
    ("update_every", 0, "update_every must be an integer >= 1"),
    ("patience", -1, "patience must be an integer >= 0"),
    ("seed", 1.5, "seed must be an integer, got 1.5")])   # (it failed in manual_seed, naming no field)
def test_fit_config_values_are_checked_when_the_trainer_is_built(field, value, message):
    """A bad value is named at once, not when its phase starts (a negative retrain_lr used to run
    the whole dense phase first, then fail naming MacKayAdam's lr)."""
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 2))
    with pytest.raises(ValueError, match=f"fit: {message}"):
        Trainer(model, tiny_images(), FitConfig(**{field: value}))


def test_splits_built_by_hand_are_checked_when_the_trainer_is_built():
    """A Splits with more labels than inputs trained silently; float labels, integer images and an
    empty training split failed inside torch or named MacKayAdam's num_data."""
    x, y = torch.randn(10, 3), torch.randint(0, 2, (10,))
    model = torch.nn.Linear(3, 2)
    for splits, message in [
            (mackay_ext.data.Splits(x, torch.randint(0, 2, (12,)), x, y, x, y, "a"),
             "data train split has 10 inputs but 12 labels"),
            (mackay_ext.data.Splits(x, y, x, y.float(), x, y, "b"), "data.y_val must be a 1-D tensor of integer"),
            (mackay_ext.data.Splits(x, y, x, y, x.long(), y, "c"), "data.x_test must be floating point"),
            (mackay_ext.data.Splits(x[:0], y[:0], x, y, x, y, "d"), "the train split is empty"),
            (mackay_ext.data.Splits(x, y, x, y, x, y - 1, "e"), "data.y_test holds the label -1"),
            # int32 labels passed, then stopped at cross_entropy's "expected target dtype to be Long"
            (mackay_ext.data.Splits(x, y.int(), x, y, x, y, "f"),
             r"data.y_train must hold int64 class indices, got torch.int32: pass data.y_train.long\(\)")]:
        with pytest.raises(ValueError, match=message):
            Trainer(model, splits, FitConfig())


@pytest.mark.parametrize("outputs,got", [(2, r"shape \(10, 2\)"), ("flat", r"shape \(10,\)")])
def test_a_model_with_fewer_outputs_than_classes_is_named_at_the_first_batch(outputs, got):
    """Labels past the model's outputs stopped training with cross_entropy's bare IndexError
    ("Target 3 is out of bounds"); the first batch now names the outputs and the labels."""
    x, y = torch.randn(10, 3), torch.arange(10) % 4
    model = (torch.nn.Linear(3, 2) if outputs == 2
             else torch.nn.Sequential(torch.nn.Linear(3, 1), torch.nn.Flatten(0)))
    splits = mackay_ext.data.Splits(x, y, x, y, x, y, "four-class")
    trainer = Trainer(model, splits, FitConfig(pretrain_epochs=1, batch_size=10, backend="torch"))
    with pytest.raises(ValueError, match=r"logits of shape \(batch, classes\) with at least 4 classes "
                                         rf"\(data four-class's labels go up to 3\), got {got}"):
        trainer.run()


def test_fit_names_pruner_option_typos_and_inputs_of_another_dtype():
    """pruner_options={'granulrity': ...} failed with MacKayPruner's bare unexpected-keyword
    error, num_data with "multiple values"; float64 inputs to a float32 model with torch's "mat1
    and mat2 must have the same dtype", naming neither the data nor the model."""
    x, y = torch.randn(10, 3), torch.arange(10) % 2
    splits = mackay_ext.data.Splits(x, y, x, y, x, y, "two-class")
    with pytest.raises(TypeError, match=r"fit: unknown option 'granulrity' \(did you mean 'granularity'\?\)"):
        Trainer(torch.nn.Linear(3, 2), splits, FitConfig(), pruner_options={"granulrity": "input"})
    with pytest.raises(TypeError, match="fit: num_data is set by fit itself"):
        Trainer(torch.nn.Linear(3, 2), splits, FitConfig(), pruner_options={"num_data": 5})
    double = mackay_ext.data.Splits(x.double(), y, x.double(), y, x.double(), y, "double")
    trainer = Trainer(torch.nn.Linear(3, 2), double, FitConfig(pretrain_epochs=1, batch_size=10, backend="torch"))
    with pytest.raises(RuntimeError) as raised:
        trainer.run()
    assert "the training inputs are torch.float64 and the model's weights torch.float32" in "".join(
        getattr(raised.value, "__notes__", []))


@pytest.mark.parametrize("budget, says", [
    (dict(epochs=4, update_every=4), r"makes 1 precision update\(s\) \(epochs=4 with update_every=4\)"),
    (dict(epochs=1, update_every_steps=100), r"makes 0 precision update\(s\) \(1 optimizer steps"),
    (dict(epochs=2, update_every_steps=1, warmup_updates=2), r"makes 2 precision update\(s\)")])
def test_an_in_run_phase_too_short_to_prune_is_warned_about(budget, says):
    """The in-run schedule prunes at its updates after the warm-up ones: too few epochs for one
    more returned the dense network as the pruned one, with no word (the paper schedule warns
    for rounds=0)."""
    x, y = torch.randn(10, 3), torch.arange(10) % 2
    splits = mackay_ext.data.Splits(x, y, x, y, x, y, "two-class")
    with pytest.warns(UserWarning, match=says + ".*nothing will be pruned"):
        Trainer(torch.nn.Linear(3, 2), splits, FitConfig(schedule="in-run", batch_size=10, **budget))
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # one more update prunes: no warning
        warnings.filterwarnings("ignore", message="MacKayPruner: batch_size")   # (10 of 10 examples: said)
        Trainer(torch.nn.Linear(3, 2), splits, FitConfig(schedule="in-run", batch_size=10, epochs=5, update_every=2))


def test_resume_refuses_a_config_that_makes_another_run(tmp_path):
    """A checkpoint loaded into a Trainer whose FitConfig differs in what the run trains on or in
    which order (seed, batch size, shifts, schedule) is refused, naming each field and both values;
    phase lengths and learning rates may change, as the CLI's --resume allows."""
    config = FitConfig(schedule="in-run", pretrain_epochs=1, epochs=1, update_every_steps=3,
                       batch_size=16, backend="torch", seed=0, finetune_epochs=1)
    checkpoint = str(tmp_path / "run.pt")

    def trainer(**changes):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 8), torch.nn.ReLU(),
                                    torch.nn.Linear(8, 2))
        return Trainer(model, tiny_images(), dataclasses.replace(config, **changes),
                       pruner_options=dict(threshold=0.5), checkpoint=checkpoint)

    first = trainer()
    first.run()
    with pytest.raises(ValueError, match=r"batch_size=16 in the checkpoint, 32 here; seed=0 in the "
                                         r"checkpoint, 1 here.*only pretrain_epochs, rounds"):
        trainer(seed=1, batch_size=32).load_checkpoint(checkpoint)
    with pytest.raises(ValueError, match="augment_shift=0 in the checkpoint, 1 here"):
        trainer(augment_shift=1).load_checkpoint(checkpoint)
    with pytest.raises(ValueError, match="finetune_epochs cannot change this run any more: the run is over"):
        trainer(finetune_epochs=2).load_checkpoint(checkpoint)
    resumed = trainer(lr=3e-3, retrain_lr=2e-3, patience=7)
    resumed.load_checkpoint(checkpoint)
    assert resumed.position == first.position and resumed.history == first.history


def test_resume_applies_a_changed_lr_and_lr_decay_and_refuses_lengths_it_is_past(tmp_path):
    """load_checkpoint: a new lr for the phase the checkpoint is in scales the saved one (decays so
    far kept) and a new lr_decay becomes the plateau factor; a phase length the checkpoint is past
    (pretraining epochs after the pretraining) is refused, not silently ignored."""
    config = FitConfig(pretrain_epochs=4, rounds=1, epochs=1, batch_size=32, patience=10, backend="torch")
    checkpoint = str(tmp_path / "run.pt")

    class Stop(Exception):
        pass

    def trainer(stop_after=None, **changes):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 8), torch.nn.ReLU(),
                                    torch.nn.Linear(8, 2))

        def progress(message):
            if stop_after and message.startswith(stop_after):
                raise Stop
        return Trainer(model, tiny_images(), dataclasses.replace(config, **changes),
                       pruner_options=dict(threshold=0.5), checkpoint=checkpoint, progress=progress)

    with pytest.raises(Stop):
        trainer("pretrain r0 e2").run()
    saved_lr = torch.load(checkpoint, weights_only=True)["optimizer"]["param_groups"][0]["lr"]
    resumed = trainer(lr=5e-3, lr_decay=0.5)
    resumed.load_checkpoint(checkpoint)
    assert resumed.optimizer.param_groups[0]["lr"] == pytest.approx(saved_lr * 5)
    assert resumed.lr_scheduler.factor == 0.5
    history = resumed.run()
    assert history[2]["phase"] == "pretrain" and history[2]["lr"] >= saved_lr * 5 * 0.5
    with pytest.raises(ValueError, match="pretrain_epochs cannot change this run any more: the dense "
                                         "pretraining is over; start a new run"):
        trainer(pretrain_epochs=8).load_checkpoint(checkpoint)


@pytest.mark.parametrize("stop_after", ["pretrain r0 e2", "round r0 e3", "finetune r1 e2"])
def test_recipe_schedule_resumes_as_if_never_stopped(tmp_path, stop_after):
    """Stopped after any epoch of any phase (cosine lr, steps-based updates, fine-tuning), a
    resumed run ends with the uninterrupted run's weights and precisions."""
    config = FitConfig(schedule="in-run", pretrain_epochs=3, epochs=4, update_every_steps=3,
                       warmup_updates=1, finetune_epochs=3, finetune_lr=2e-3, lr_schedule="cosine",
                       batch_size=16, retrain_lr=5e-3, backend="torch", patience=100)

    def model():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 16), torch.nn.ReLU(),
                                   torch.nn.Linear(16, 2))

    whole = Trainer(model(), tiny_images(), config, pruner_options=dict(threshold=0.5))
    whole.run()

    class Stop(Exception):
        pass

    def progress(message):
        if message.startswith(stop_after):
            raise Stop
    checkpoint = str(tmp_path / "checkpoint.pt")
    first = Trainer(model(), tiny_images(), config, pruner_options=dict(threshold=0.5),
                    checkpoint=checkpoint, progress=progress)
    with pytest.raises(Stop):
        first.run()
    second = Trainer(model(), tiny_images(), config, pruner_options=dict(threshold=0.5),
                     checkpoint=checkpoint)
    second.load_checkpoint(checkpoint)
    second.run()
    for a, b in zip(whole.model.state_dict().values(), second.model.state_dict().values()):
        assert torch.equal(a, b)
    for name in whole.pruner.targets:
        assert torch.equal(whole.pruner.alpha(name), second.pruner.alpha(name))


@pytest.mark.parametrize("finetune_shift", [None, 1, 0])
def test_the_finetune_can_shift_less(monkeypatch, finetune_shift):
    """FitConfig.finetune_augment_shift: the fine-tune's shifts, the other phases keeping
    augment_shift (None: the fine-tune keeps it too)."""
    import mackay_ext.train as train_module
    calls = []

    def recording_shift(images, max_shift, **kwargs):
        calls.append((trainer.position["phase"], max_shift))
        return images
    monkeypatch.setattr(train_module, "random_shift", recording_shift)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    config = FitConfig(schedule="in-run", pretrain_epochs=1, epochs=2, update_every_steps=3, finetune_epochs=2,
                       batch_size=16, backend="torch", augment_shift=2, finetune_augment_shift=finetune_shift)
    trainer = Trainer(model, tiny_images(), config, pruner_options=dict(threshold=0.5))
    trainer.run()
    shifts = {phase: {s for p, s in calls if p == phase} for phase in ("pretrain", "round", "finetune")}
    assert shifts["pretrain"] == shifts["round"] == {2}
    assert shifts["finetune"] == {2: {2}, 1: {1}, 0: set()}[2 if finetune_shift is None else finetune_shift]


def test_a_bad_finetune_shift_is_named():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 2))
    with pytest.raises(ValueError, match="finetune_augment_shift must be an int >= 0, got -1"):
        Trainer(model, tiny_images(), FitConfig(finetune_augment_shift=-1))
    with pytest.raises(ValueError, match=r"finetune_augment_shift must be smaller than the images, \(8, 8\) pixels, got 8"):
        Trainer(model, tiny_images(), FitConfig(finetune_augment_shift=8))
    with pytest.raises(ValueError, match=r"augment_shift must be smaller than the images"):
        Trainer(model, tiny_images(), FitConfig(augment_shift=50))
    flat = mackay_ext.data.Splits(*(torch.randn(8, 64), torch.zeros(8, dtype=torch.long)) * 3, "flat")
    with pytest.raises(ValueError, match="finetune_augment_shift needs images"):
        Trainer(torch.nn.Linear(64, 2), flat, FitConfig(finetune_augment_shift=1))


def test_a_state_that_is_not_finite_never_replaces_the_last_good_checkpoint(tmp_path):
    """The loss can stay finite while B g^2 overflows: the epoch's checkpoint was written with inf
    curvature, named the last good one, and every resume from it diverged again at any lr."""
    x, y = torch.randn(20, 3), torch.arange(20) % 2
    splits = mackay_ext.data.Splits(x, y, x, y, x, y, "two-class")
    checkpoint = tmp_path / "run.pt"
    trainer = Trainer(torch.nn.Linear(3, 2), splits, FitConfig(pretrain_epochs=1, batch_size=10, backend="torch"),
                      checkpoint=str(checkpoint))
    trainer.pretrain()
    before = checkpoint.read_bytes()
    trainer.optimizer.ard_state(trainer.model.weight)["curvature"].fill_(float("inf"))
    with pytest.raises(mackay_ext.NonFiniteError, match=r"non-finite values in weight \(curvature\): training has "
                                                        r"diverged; the checkpoint .*run.pt was not overwritten"):
        trainer.save_checkpoint()
    assert checkpoint.read_bytes() == before
