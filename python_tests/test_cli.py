"""The mackay-ext command line: the default digits run end to end, resume, evaluate, errors."""
import json
import subprocess
import sys

import pytest
import torch

from mackay_ext import data, models
from mackay_ext._checksum import payload_digest
from mackay_ext.train import FitConfig, Trainer, set_seed


def cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "mackay_ext.cli", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    result = cli("prune", "--out", str(out), "--quiet", cwd=out)
    assert result.returncode == 0, result.stderr
    return out, result


def test_default_digits_run(digits_run):
    out, result = digits_run
    report = json.loads((out / "report.json").read_text())
    assert report["model"] == "digits-mlp" and report["dataset"] == "digits"
    assert report["weights_kept"] <= 0.2 * report["weights_total"]  # at least 80% pruned
    assert report["test_accuracy"] >= report["test_accuracy_dense"] - 0.02
    assert report["compression"] == pytest.approx(report["weights_total"] / report["weights_kept"])
    assert sum(layer["kept"] for layer in report["layers"]) == report["weights_kept"]
    assert report["wall_seconds"] > 0   # how fast is a benchmark's question, not a test's
    assert report["fit_config"]["lr"] == report["settings"]["lr"] and "retrain_lr" in report["fit_config"]
    assert (out / "model.pt").exists() and (out / "checkpoint.pt").exists()
    assert "compression" in result.stdout and "weights kept" in result.stdout


def test_evaluate_saved_model(digits_run):
    out, _ = digits_run
    report = json.loads((out / "report.json").read_text())
    result = cli("evaluate", str(out / "model.pt"), cwd=out)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["test_accuracy"] == pytest.approx(report["test_accuracy"])
    assert summary["weights_kept"] <= report["weights_kept"]


def test_the_model_file_says_how_its_inputs_were_standardised(digits_run):
    """The network trained on (pixels in [0, 1] - mean) / std; neither model.pt nor report.json
    said so, and raw pixels lost accuracy without an error (new-user pass: MNIST, 97.7% -> 79.8%)."""
    from mackay_ext import load_compressed
    out, _ = digits_run
    report = json.loads((out / "report.json").read_text())
    saved = torch.load(out / "model.pt", weights_only=True)["metadata"]["input_standardisation"]
    assert saved == report["input_standardisation"]
    splits = data.load("digits")
    assert (saved["mean"], saved["std"]) == pytest.approx(splits.standardisation)
    pixels = splits.x_test * saved["std"] + saved["mean"]   # the test images as a user has them
    assert float(pixels.min()) >= -1e-6 and float(pixels.max()) <= 1 + 1e-6
    model = load_compressed(str(out / "model.pt")).eval()
    with torch.no_grad():
        accuracy = (model((pixels - saved["mean"]) / saved["std"]).argmax(1) == splits.y_test).float().mean()
    assert float(accuracy) == pytest.approx(report["test_accuracy"], abs=1e-6)


def test_evaluate_standardises_as_the_model_was_trained():
    """load() standardises with its own (seed 0) split's statistics; a run with another --seed
    trained on slightly others, which model.pt records: evaluate uses those."""
    from mackay_ext.cli.evaluate import _as_trained
    splits = data.load("digits")
    mean, std = splits.standardisation
    pixels = splits.x_test * std + mean
    trained = {"mean": mean + 0.01, "std": std * 1.1, "formula": "(x - mean) / std"}
    torch.testing.assert_close(_as_trained(splits, trained), (pixels - mean - 0.01) / (std * 1.1))
    assert _as_trained(splits, None) is splits.x_test   # an older model.pt: what load() gives


def as_images(splits):
    """The 8x8 digits as (N, 1, 8, 8) images (DigitsMLP flattens them back)."""
    def image(x):
        return x.reshape(-1, 1, 8, 8)
    return data.Splits(image(splits.x_train), splits.y_train, image(splits.x_val), splits.y_val,
                       image(splits.x_test), splits.y_test, splits.name)


@pytest.mark.parametrize("shift,curvature", [(0, "ef-batch"), (1, "ef-batch"), (0, "ef-exact"), (0, "fisher-mc")])
def test_resume_reproduces_uninterrupted_run(tmp_path, shift, curvature):
    """A run killed in its second round and resumed from its checkpoint ends bit for bit where
    the uninterrupted one does (fisher-mc: the labels it samples too)."""
    digits = data.load("digits") if shift == 0 else as_images(data.load("digits"))
    config = FitConfig(pretrain_epochs=6, rounds=3, epochs=4, batch_size=32, patience=3,
                       augment_shift=shift)

    def trainer(checkpoint, progress=None):
        set_seed(0)
        return Trainer(models.create("digits-mlp"), digits, config, checkpoint=str(checkpoint),
                       progress=progress, pruner_options={"curvature": curvature})

    uninterrupted = trainer(tmp_path / "a.pt")
    uninterrupted.run()

    class Crash(Exception):
        pass

    epochs_seen = []

    def crash_in_round_two(message):
        epochs_seen.append(message)
        if message.startswith("round r1 e2"):
            raise Crash

    with pytest.raises(Crash):
        trainer(tmp_path / "b.pt", crash_in_round_two).run()
    resumed = trainer(tmp_path / "c.pt")
    resumed.load_checkpoint(str(tmp_path / "b.pt"))
    assert resumed.position["round"] == 1
    resumed.run()
    for a, b in zip(uninterrupted.model.parameters(), resumed.model.parameters()):
        assert torch.equal(a, b)
    assert uninterrupted.pruner.report() == resumed.pruner.report()
    assert [h["val_accuracy"] for h in uninterrupted.history] == [h["val_accuracy"] for h in resumed.history]


def test_augmentation_changes_training_and_needs_images():
    images = as_images(data.load("digits"))

    def trained(shift, global_seed=0):
        set_seed(0)
        trainer = Trainer(models.create("digits-mlp"), images,
                          FitConfig(pretrain_epochs=2, rounds=1, epochs=1, augment_shift=shift))
        torch.manual_seed(global_seed)  # the offsets come from the epoch's own generator
        trainer.run()
        return [p.detach().clone() for p in trainer.model.parameters()]

    plain, shifted, again = trained(0), trained(1), trained(1, global_seed=123)
    assert all(torch.equal(a, b) for a, b in zip(shifted, again))
    assert not all(torch.equal(a, b) for a, b in zip(plain, shifted))
    with pytest.raises(ValueError, match="augment_shift needs images"):
        Trainer(models.create("digits-mlp"), data.load("digits"), FitConfig(augment_shift=1))
    with pytest.raises(ValueError, match="augment_shift must be an int >= 0"):
        Trainer(models.create("digits-mlp"), images, FitConfig(augment_shift=-1))


def test_cli_resume_finished_checkpoint(digits_run, tmp_path):
    out, _ = digits_run
    result = cli("prune", "--resume", str(out / "checkpoint.pt"), "--out", str(tmp_path), "--quiet",
                 cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    first = json.loads((out / "report.json").read_text())
    second = json.loads((tmp_path / "report.json").read_text())
    assert second["weights_kept"] == first["weights_kept"]
    assert second["test_accuracy"] == first["test_accuracy"]


def test_a_checkpoint_without_a_checksum_is_said_once_in_the_commands_own_words(digits_run, tmp_path):
    """An older version's checkpoint (no digest) resumed: Python's warning format named a line of
    the library and printed its source under it, twice (the command and the Trainer each read
    the file)."""
    out, _ = digits_run
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    del state["digest"]
    torch.save(state, tmp_path / "checkpoint.pt")
    result = cli("prune", "--resume", str(tmp_path / "checkpoint.pt"), "--quiet", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    said = [line for line in result.stderr.splitlines() if "carries no checksum" in line]
    assert len(said) == 1 and said[0].startswith("mackay-ext: warning: checkpoint ")
    assert "Warning:" not in result.stderr and "load_sealed(" not in result.stderr


@pytest.mark.parametrize("edit", ["unknown-model", "alpha-shape", "damaged"])
def test_cli_resume_damaged_checkpoint_fails_in_one_line_before_training(digits_run, tmp_path, edit):
    """Damage is found by the checkpoint's digest; a deliberate edit (its digest made again)
    by the checks behind it."""
    out, _ = digits_run
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    digest = state.pop("digest")
    if edit == "unknown-model":
        state["cli_settings"]["model"] = "no-such-model"
        expected = "names the model 'no-such-model', which this version of mackay_ext does not have"
    elif edit == "alpha-shape":
        name = next(iter(state["pruner"]["alpha"]))
        state["pruner"]["alpha"][name] = torch.zeros(3, 3)
        expected = f"alpha of layer '{name}' has shape (3, 3)"
    else:
        next(iter(state["model"].values())).view(-1)[0] += 1
        expected = "its contents do not match the checksum saved with them"
    state["digest"] = digest if edit == "damaged" else payload_digest(state)
    torch.save(state, tmp_path / "checkpoint.pt")
    result = cli("prune", "--resume", str(tmp_path / "checkpoint.pt"), "--quiet", cwd=tmp_path)
    assert result.returncode != 0
    assert expected in result.stderr and "Traceback" not in result.stderr


def test_out_that_cannot_be_created_is_an_argument_error(tmp_path, monkeypatch, capsys):
    from mackay_ext import cli

    def refuse(path, exist_ok=False):
        raise PermissionError(1, "Operation not permitted", path)
    monkeypatch.setattr("mackay_ext.cli.settings.os.makedirs", refuse)   # as /proc refuses even root
    with pytest.raises(SystemExit) as exit:
        cli.main(["prune", "--out", str(tmp_path / "run")])
    assert exit.value.code == 2
    assert f"--out {tmp_path / 'run'}: the directory cannot be created (Operation not permitted)" in \
        capsys.readouterr().err


NO_CUDA = not torch.cuda.is_available()


@pytest.mark.parametrize("args,message", [
    (["prune", "--epochs", "-1"], "argument --epochs: expected a whole number >= 1, got -1"),
    (["prune", "--epochs", "1.5"], "argument --epochs: expected a whole number >= 1, got '1.5'"),
    (["prune", "--pretrain-epochs", "0"], "argument --pretrain-epochs: expected a whole number >= 1"),
    (["prune", "--rounds", "0"], "argument --rounds: expected a whole number >= 1, got 0"),
    (["prune", "--batch-size", "0"], "argument --batch-size: expected a whole number >= 1, got 0"),
    (["prune", "--patience", "-2"], "argument --patience: expected a whole number >= 1, got -2"),
    (["prune", "--update-every", "0"], "argument --update-every: expected a whole number >= 1"),
    (["prune", "--lr", "nan"], "argument --lr: expected a finite number > 0, got nan"),
    (["prune", "--lr", "inf"], "argument --lr: expected a finite number > 0, got inf"),
    (["prune", "--lr", "0"], "argument --lr: expected a finite number > 0, got 0"),
    (["prune", "--lr", "fast"], "argument --lr: expected a finite number > 0, got 'fast'"),
    (["prune", "--threshold", "-1"], "argument --threshold: expected a finite number >= 0, got -1"),
    (["prune", "--threshold", "nan"], "argument --threshold: expected a finite number >= 0, got nan"),
    (["prune", "--seed", "-3"], "argument --seed: expected a whole number >= 0, got -3"),
    (["prune", "--out", ""], "argument --out: expected a path, got ''"),   # it ran into ./mackay-run
    (["prune", "--data-dir", " "], "argument --data-dir: expected a path, got ' '"),
    (["prune", "--resume", ""], "argument --resume: expected a path, got ''"),
    (["prune", "--mac-price", "-0.001"], "argument --mac-price: expected a finite number >= 0, got -0.001"),
    (["prune", "--mac-price", "inf"], "argument --mac-price: expected a finite number >= 0, got inf"),
    (["prune", "--mac-price-ramp", "0"], "argument --mac-price-ramp: expected a whole number >= 1, got 0"),
    (["prune", "--mac-price-ramp", "2.5"], "argument --mac-price-ramp: expected a whole number >= 1, got '2.5'"),
    (["prune", "--max-prune-fraction", "0"], "argument --max-prune-fraction: expected a number in (0, 1], got 0"),
    (["prune", "--max-prune-fraction", "half"], "argument --max-prune-fraction: expected a number in (0, 1], got 'half'"),
    (["prune", "--channel-prior", "norm-scale"],
     "--channel-prior norm-scale places a channel group's prior: it needs --granularity channel, got weight"),
    (["prune", "--channel-prior", "scale"], "invalid choice"),
    (["prune", "--curvature-every", "0"], "argument --curvature-every: expected a whole number >= 1, got 0"),
    (["prune", "--curvature-every", "4"], "--curvature-every samples the ef-exact or fisher-mc curvature"),
    (["prune", "--model", "alexnet"], "invalid choice"),
    (["prune", "--granularity", "blocks"], "invalid choice"),
    (["prune", "--augment-shift", "2"], "--augment-shift needs an image dataset; digits"),
    (["prune", "--augment-shift", "-1"], "argument --augment-shift: expected a whole number >= 0, got -1"),
    (["prune", "--out", "{file}"], "--out {file} is a file; expected a directory"),
    (["prune", "--out", "{file}/run"], "{file} is a file, so the directory cannot be created"),
    (["prune", "--model", "lenet-300-100", "--dataset", "digits"],
     "--dataset digits: lenet-300-100 expects inputs of shape (1, 28, 28) (as in mnist), digits gives (64,)"),
    (["prune", "--model", "lenet-5-caffe", "--dataset", "cifar10"],
     "lenet-5-caffe expects inputs of shape (1, 28, 28) (as in mnist), cifar10 gives (3, 32, 32)"),
    (["prune", "--model", "resnet-20", "--dataset", "digits"],
     "resnet-20 expects inputs of shape (3, 32, 32) (as in cifar10), digits gives (64,)"),
    (["prune", "--data-dir", "data"], "--data-dir: the digits dataset comes with scikit-learn"),
    (["prune", "--download"], "--download fetches MNIST only; digits"),
    (["prune", "--model", "resnet-20", "--download"], "--download fetches MNIST only; cifar10"),
    (["prune", "--update-every", "3"], "--update-every applies to --schedule in-run only"),
    pytest.param(["prune", "--device", "cuda"], "--device cuda: no CUDA device",
                 marks=pytest.mark.skipif(not NO_CUDA, reason="a CUDA device is present")),
    (["frobnicate"], "invalid choice"),
    ([], "required"),
])
def test_bad_arguments_exit_2_before_any_data_is_loaded(tmp_path, monkeypatch, capsys, args, message):
    from mackay_ext import cli

    def no_loading(*args, **kwargs):
        raise AssertionError("the data was loaded before the flags were checked")
    monkeypatch.setattr(cli.datasets, "load", no_loading)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "file").write_text("a file, not a directory")
    file = str(tmp_path / "file")
    with pytest.raises(SystemExit) as exit:
        cli.main([arg.format(file=file) for arg in args])
    err = capsys.readouterr().err
    assert exit.value.code == 2
    assert "usage:" in err and message.format(file=file) in err
    assert not (tmp_path / "mackay-run").exists()


def test_every_flag_has_help_and_the_recipes_show_each_models_default():
    from mackay_ext import cli
    parser = cli._parser()
    for command, sub in parser.subcommands.items():
        for action in sub._actions:
            assert action.help, f"{command} {'/'.join(action.option_strings) or action.dest} has no help"
    prune_help = {a.dest: a.help for a in parser.subcommands["prune"]._actions}
    for key in ("pretrain_epochs", "rounds", "epochs", "batch_size", "lr"):
        for model, recipe in cli.RECIPES.items():
            assert f"{model} {recipe[key]:g}" in prune_help[key], (key, model)
        assert f"other models {cli.GENERIC_RECIPE[key]:g}" in prune_help[key]
    text = parser.subcommands["prune"].format_help()  # argparse's %-formatting accepts every text
    assert "--pretrain-epochs" in text and "lenet-300-100 20" in text


def test_missing_data_says_where_it_looked(tmp_path):
    result = cli("prune", "--model", "lenet-300-100", "--data-dir", str(tmp_path / "none"), cwd=tmp_path)
    assert result.returncode == 1
    assert str(tmp_path / "none") in result.stderr and "--download" in result.stderr


def test_corrupt_checkpoint_is_reported(tmp_path):
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    result = cli("prune", "--resume", str(tmp_path / "bad.pt"), "--out", str(tmp_path), cwd=tmp_path)
    assert result.returncode == 1 and "cannot be read" in result.stderr


def test_curvature_every_reaches_the_pruner_and_the_checkpoint(tmp_path):
    result = cli("prune", "--curvature", "ef-exact", "--curvature-every", "3", "--pretrain-epochs", "1",
                 "--rounds", "1", "--epochs", "1", "--out", str(tmp_path), "--quiet", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["settings"]["curvature_every"] == 3
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert state["pruner"]["settings"]["curvature_every"] == 3


def test_max_prune_fraction_reaches_the_pruner_and_the_checkpoint(tmp_path):
    result = cli("prune", "--max-prune-fraction", "0.25", "--threshold", "1e6", "--pretrain-epochs", "1",
                 "--rounds", "2", "--epochs", "1", "--out", str(tmp_path), "--quiet", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["settings"]["max_prune_fraction"] == 0.25
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert state["pruner"]["settings"]["max_prune_fraction"] == 0.25
    pruning = [update for update in state["pruner"]["history"] if not update["layers"][0]["warmup"]]
    assert pruning and all(layer["limited"] > 0 for layer in pruning[0]["layers"])
    for layer in pruning[0]["layers"]:            # the threshold picks every weight; a quarter go
        assert layer["total"] - layer["kept"] == layer["total"] // 4


def test_channel_prior_reaches_the_pruner_and_the_checkpoint(tmp_path):
    """digits' MLP has no BatchNorm: norm-scale keeps every group's prior on its members, says
    so in the report's channel notes, and is saved with the run."""
    result = cli("prune", "--granularity", "channel", "--channel-prior", "norm-scale", "--pretrain-epochs", "1",
                 "--rounds", "1", "--epochs", "1", "--out", str(tmp_path), "--quiet", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["settings"]["channel_prior"] == "norm-scale"
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert state["pruner"]["settings"]["channel_prior"] == "norm-scale"
    notes = state["pruner"]["history"][-1]["channel"]["notes"]
    assert any("no group passes through a BatchNorm" in note for note in notes), notes


def test_mac_price_reaches_the_pruner_and_the_checkpoint(tmp_path):
    """--mac-price with --granularity filter: the pruner prices groups (the checkpoint's pruner
    settings and the run's settings carry the price); a digits run of a few epochs."""
    result = cli("prune", "--mac-price", "0.01", "--mac-price-ramp", "2", "--granularity", "filter",
                 "--pretrain-epochs", "2", "--rounds", "1", "--epochs", "2", "--out", str(tmp_path), "--quiet",
                 cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["settings"]["mac_price"] == 0.01 and report["settings"]["mac_price_ramp"] == 2
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert state["pruner"]["settings"]["mac_price"] == 0.01
    assert state["pruner"]["settings"]["mac_price_ramp"] == 2
    priced = [layer.get("priced_out") for update in state["pruner"]["history"] for layer in update["layers"]]
    assert any(count for count in priced if count), "no group was priced out"


def test_one_run_at_a_time_per_out_folder(tmp_path):
    """Two runs into one --out wrote the same checkpoint.pt.tmp: one died with a raw
    FileNotFoundError. A lock held by a live run is named; one a killed run left is taken over."""
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / ".mackay-ext.lock").write_text(str(holder.pid))
        flags = ("prune", "--out", str(tmp_path), "--pretrain-epochs", "1", "--rounds", "1", "--epochs", "1",
                 "--quiet")
        result = cli(*flags, cwd=tmp_path)
        assert result.returncode == 1
        assert f"another mackay-ext prune (process {holder.pid}) is writing into {tmp_path}" in result.stderr
        assert not (tmp_path / "checkpoint.pt").exists()
    finally:
        holder.kill()
        holder.wait()
    result = cli(*flags, cwd=tmp_path)   # the holder is gone: its lock is stale
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "report.json").exists() and not (tmp_path / ".mackay-ext.lock").exists()


@pytest.mark.parametrize("argv, criterion", [
    (["--rule", "paper"], "alpha"), (["--rule", "paper", "--prune", "snr"], "snr"),
    ([], "snr"), (["--rule", "em"], "snr")])
def test_the_prune_criterion_defaults_to_alpha_under_the_papers_rule(argv, criterion):
    """--rule paper's gamma = 1 leaves every group's snr near 1 (MacKayPruner says so): its
    default criterion is alpha at 1e13, the paper's; snr elsewhere, and what is typed is kept."""
    from mackay_ext.cli.args import _given_flags, _parser
    from mackay_ext.cli.settings import _settings
    parser = _parser()
    args = parser.parse_args(["prune", *argv])
    assert _settings(args, _given_flags(["prune", *argv], args), parser)["prune"] == criterion
    if argv[:2] == ["--rule", "paper"] and len(argv) == 2:   # snr's threshold scale without --prune
        args = parser.parse_args(["prune", *argv, "--threshold", "0.05"])
        with pytest.raises(SystemExit):
            _settings(args, _given_flags(["prune", *argv, "--threshold", "0.05"], args), parser)
