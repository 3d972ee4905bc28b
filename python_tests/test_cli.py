"""The mackay-ext command line: the default digits run end to end, resume, evaluate, errors."""
import json
import subprocess
import sys

import pytest
import torch

from mackay_ext import data, models
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
    assert report["wall_seconds"] < 60
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


def test_resume_reproduces_uninterrupted_run(tmp_path):
    digits = data.load("digits")
    config = FitConfig(pretrain_epochs=6, rounds=3, epochs=4, batch_size=32, patience=3)

    def trainer(checkpoint, progress=None):
        set_seed(0)
        return Trainer(models.create("digits-mlp"), digits, config, checkpoint=str(checkpoint),
                       progress=progress)

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


def test_cli_resume_finished_checkpoint(digits_run, tmp_path):
    out, _ = digits_run
    result = cli("prune", "--resume", str(out / "checkpoint.pt"), "--out", str(tmp_path), "--quiet",
                 cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    first = json.loads((out / "report.json").read_text())
    second = json.loads((tmp_path / "report.json").read_text())
    assert second["weights_kept"] == first["weights_kept"]
    assert second["test_accuracy"] == first["test_accuracy"]


@pytest.mark.parametrize("args,message", [
    (["prune", "--epochs", "-1"], "--epochs must be positive"),
    (["prune", "--model", "alexnet"], "invalid choice"),
    (["prune", "--granularity", "blocks"], "invalid choice"),
    (["frobnicate"], "invalid choice"),
    ([], "required"),
])
def test_bad_arguments_exit_2(tmp_path, args, message):
    result = cli(*args, cwd=tmp_path)
    assert result.returncode == 2
    assert "usage:" in result.stderr and message in result.stderr


def test_missing_data_says_where_it_looked(tmp_path):
    result = cli("prune", "--model", "lenet-300-100", "--data-dir", str(tmp_path / "none"), cwd=tmp_path)
    assert result.returncode == 1
    assert str(tmp_path / "none") in result.stderr and "--download" in result.stderr


def test_corrupt_checkpoint_is_reported(tmp_path):
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    result = cli("prune", "--resume", str(tmp_path / "bad.pt"), "--out", str(tmp_path), cwd=tmp_path)
    assert result.returncode == 1 and "cannot read checkpoint" in result.stderr
