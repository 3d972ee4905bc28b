"""`mackay-ext` for a real user: progress in a log and on a terminal, Ctrl-C, --resume against its
checkpoint, divergence, evaluate's errors and plots. Every run is tiny (digits, one epoch a phase)."""
from __future__ import annotations

import ast
import io
import json
import os
import pickle
import queue
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

from mackay_ext import cli, data
from mackay_ext._checksum import load_sealed, save_sealed
from mackay_ext._files import load_plain
from mackay_ext._validate import NonFiniteError
from mackay_ext.train import Trainer

from test_data import fake_mnist

TINY = ["--pretrain-epochs", "1", "--rounds", "1", "--epochs", "1"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A finished tiny run: checkpoint.pt, model.pt, report.json."""
    out = tmp_path_factory.mktemp("tiny")
    assert cli.main(["prune", *TINY, "--quiet", "--out", str(out)]) == 0
    return out


def copy_of(tiny_run, tmp_path, name="copy"):
    """The tiny run's checkpoint alone in a directory of its own."""
    directory = tmp_path / name
    directory.mkdir()
    shutil.copy(tiny_run / "checkpoint.pt", directory / "checkpoint.pt")
    return directory / "checkpoint.pt"


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.strip()]


class Terminal(io.StringIO):
    def isatty(self):
        return True


# ------------------------------------------------------------------------------------ progress
def test_progress_is_a_line_per_epoch_and_update_when_not_a_terminal(tmp_path, capsys):
    assert cli.main(["prune", *TINY, "--out", str(tmp_path)]) == 0
    lines = capsys.readouterr().err.splitlines()
    epochs = [line for line in lines if " e1: loss " in line]
    updates = [line for line in lines if "] update: kept " in line]
    assert any("pretrain r0 e1: loss" in line for line in epochs)
    assert any("round r0 e1: loss" in line for line in epochs)
    assert updates, lines
    for line in epochs + updates:  # seconds since the start: a log says when
        assert line.startswith("[") and " s] " in line
        float(line[1:line.index(" s] ")])
    assert "\r" not in "".join(lines)  # no redrawn bars in a log


def test_quiet_prints_no_progress(tmp_path, capsys):
    assert cli.main(["prune", *TINY, "--quiet", "--out", str(tmp_path)]) == 0
    assert capsys.readouterr().err == ""


def test_a_terminal_gets_tqdm_bars(tmp_path, monkeypatch):
    pytest.importorskip("tqdm")
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert cli.main(["prune", *TINY, "--out", str(tmp_path)]) == 0
    text = terminal.getvalue()
    assert "batch/s" in text or "s/batch" in text          # tqdm's rate, in the unit we gave it
    assert "\r" in text and "pretrain r0 e1: loss" in text  # bars redrawn in place, epoch lines kept


def test_progress_unit(monkeypatch):
    pytest.importorskip("tqdm")
    terminal = Terminal()
    progress = cli._Progress(quiet=False, stream=terminal)
    for batch in range(7):
        progress.batch(batch, 7)
    progress.line("pretrain r0 e1: loss 1.0")
    text = terminal.getvalue()
    assert "/7 [" in text and "batch/s" in text and text.endswith("pretrain r0 e1: loss 1.0\n")
    assert progress.bar is None  # closed before the line, so the line is not drawn over

    quiet = Terminal()
    progress = cli._Progress(quiet=True, stream=quiet)
    progress.batch(0, 3)
    progress.line("nothing")
    assert quiet.getvalue() == ""

    monkeypatch.setitem(sys.modules, "tqdm", None)  # tqdm missing: plain lines on a terminal too
    terminal = Terminal()
    progress = cli._Progress(quiet=False, stream=terminal)
    progress.batch(0, 3)
    progress.line("update: kept 5/10")
    assert terminal.getvalue().endswith(" s] update: kept 5/10\n") and "\r" not in terminal.getvalue()


# ------------------------------------------------------------------------------------ Ctrl-C
def run_cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "mackay_ext.cli", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=600)


def test_ctrl_c_says_how_to_resume_and_the_command_works(tmp_path):
    out = tmp_path / "run"
    process = subprocess.Popen(
        [sys.executable, "-m", "mackay_ext.cli", "prune", "--pretrain-epochs", "100000",
         "--patience", "100000", "--rounds", "1", "--epochs", "1", "--out", str(out)],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        # a shell's background job (`.ci/run &`) ignores SIGINT, and a Python started with SIGINT
        # ignored never installs KeyboardInterrupt: give the run the disposition a terminal gives
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in process.stderr] + [lines.put(None)],
                     daemon=True).start()
    try:
        seen, deadline = [], time.monotonic() + 300
        while not any("pretrain r0 e2:" in line for line in seen):  # epoch 1's checkpoint is written
            try:  # the lines arrive while the run goes on: flushed, though stderr is a pipe
                line = lines.get(timeout=max(deadline - time.monotonic(), 0.01))
            except queue.Empty:
                pytest.fail(f"no progress line for epoch 2 within 300 s; stderr so far: {seen}")
            assert line is not None, f"the run ended early: {seen}"
            seen.append(line)
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=120) == 130
    finally:
        if process.poll() is None:
            process.kill()
    err = []
    while (line := lines.get(timeout=30)) is not None:
        err.append(line)
    err = "".join(err)
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    messages = [line for line in err.splitlines() if line.startswith("mackay-ext:")]
    checkpoint = str(out / "checkpoint.pt")
    assert messages == [f"mackay-ext: interrupted; the last checkpoint is {checkpoint}; resume with: "
                        f"mackay-ext prune --resume {shlex.quote(checkpoint)}"]
    command = shlex.split(messages[0].split("resume with: ")[1])
    assert command[0] == "mackay-ext"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    resumed = run_cli(*command[1:], "--pretrain-epochs", "2", "--quiet", cwd=elsewhere)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming with --pretrain-epochs 2 (the checkpoint's run had 100000)" in resumed.stderr
    assert (out / "report.json").exists() and not (elsewhere / "mackay-run").exists()


def interrupt_at_save(monkeypatch, number, error):
    """Trainer.save_checkpoint raises `error` at its `number`-th call, before writing."""
    real, calls = Trainer.save_checkpoint, []

    def save(self):
        calls.append(1)
        if len(calls) == number:
            raise error
        real(self)
    monkeypatch.setattr(Trainer, "save_checkpoint", save)


def main_catching_ctrl_c(argv):
    """cli.main; a KeyboardInterrupt it lets through fails the test instead of ending pytest."""
    try:
        return cli.main(argv)
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C escaped mackay-ext as a KeyboardInterrupt (a traceback for the user)")


def test_ctrl_c_before_the_first_checkpoint(tmp_path, monkeypatch, capsys):
    interrupt_at_save(monkeypatch, 1, KeyboardInterrupt())
    assert main_catching_ctrl_c(["prune", *TINY, "--quiet", "--out", str(tmp_path)]) == 130
    assert error_lines(capsys.readouterr().err) == [
        "mackay-ext: interrupted; no checkpoint was written yet, so there is nothing to resume"]


def test_ctrl_c_of_a_resumed_run_before_it_saved_points_at_its_start(tiny_run, tmp_path,
                                                                      monkeypatch, capsys):
    checkpoint = copy_of(tiny_run, tmp_path)
    out = tmp_path / "out"
    interrupt_at_save(monkeypatch, 1, KeyboardInterrupt())
    assert main_catching_ctrl_c(["prune", "--resume", str(checkpoint), "--rounds", "3", "--out",
                                 str(out), "--quiet"]) == 130
    err = error_lines(capsys.readouterr().err)
    assert err[-1] == (f"mackay-ext: interrupted; the last checkpoint is {checkpoint}; resume with: "
                       f"mackay-ext prune --resume {checkpoint} --out {out}")


# ------------------------------------------------------------------------------------ divergence
def test_divergence_is_one_line_with_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    interrupt_at_save(monkeypatch, 2, NonFiniteError("the loss is nan at round 0 epoch 1"))
    assert cli.main(["prune", *TINY, "--quiet", "--out", str(tmp_path)]) == 1
    checkpoint = str(tmp_path / "checkpoint.pt")
    command = f"mackay-ext prune --resume {checkpoint} --lr 0.0001"
    assert error_lines(capsys.readouterr().err) == [
        f"mackay-ext: training diverged: the loss is nan at round 0 epoch 1; the last good checkpoint "
        f"is {checkpoint}; try a smaller --lr (this run: 0.001): {command}"]
    assert load_plain(checkpoint, "checkpoint")["position"]["phase"] == "pretrain"
    monkeypatch.undo()
    assert cli.main(shlex.split(command)[1:] + ["--quiet"]) == 0  # the suggestion runs as written
    final = load_plain(checkpoint, "checkpoint")
    assert final["cli_settings"]["lr"] == 1e-4
    assert all(group["lr"] <= 1e-4 for group in final["optimizer"]["param_groups"])


def test_divergence_before_any_checkpoint(tmp_path, monkeypatch, capsys):
    interrupt_at_save(monkeypatch, 1, NonFiniteError("a gradient is inf"))
    assert cli.main(["prune", *TINY, "--quiet", "--lr", "0.5", "--out", str(tmp_path)]) == 1
    assert error_lines(capsys.readouterr().err) == [
        "mackay-ext: training diverged: a gradient is inf; no checkpoint was written before it; "
        "try a smaller --lr than 0.5"]


def test_a_model_that_turns_nan_stops_the_run(tmp_path, monkeypatch, capsys):
    """A forward that turns NaN: the trainer raises NonFiniteError and the run stops with one
    line and exit 1, never a traceback and never a report of a NaN network as a success."""
    from mackay_ext import models
    real_create = models.create

    def poisoned(name, num_classes=10):
        model = real_create(name, num_classes)
        calls = []

        def hook(module, inputs, output):
            calls.append(1)
            return output * float("nan") if len(calls) > 40 else output
        model.register_forward_hook(hook)
        return model
    monkeypatch.setattr(cli.models, "create", poisoned)
    assert cli.main(["prune", *TINY, "--quiet", "--out", str(tmp_path)]) == 1
    err = error_lines(capsys.readouterr().err)
    assert len(err) == 1 and err[0].startswith("mackay-ext: training diverged: "), err
    assert "try a smaller --lr" in err[0]


# ------------------------------------------------------------------------------------ resume
def test_resume_writes_next_to_the_checkpoint(tiny_run, tmp_path, monkeypatch):
    checkpoint = copy_of(tiny_run, tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert cli.main(["prune", "--resume", str(checkpoint), "--quiet"]) == 0
    assert (checkpoint.parent / "report.json").exists() and (checkpoint.parent / "model.pt").exists()
    assert not (elsewhere / "mackay-run").exists()


@pytest.mark.parametrize("flags,message", [
    (["--model", "lenet-300-100"], "--model lenet-300-100 (the checkpoint's run has digits-mlp)"),
    (["--granularity", "input"], "--granularity input (the checkpoint's run has weight)"),
    (["--prune", "alpha"], "--prune alpha (the checkpoint's run has snr)"),
    (["--threshold", "0.1"], "--threshold 0.1 (the checkpoint's run has the default)"),
    (["--batch-size", "64"], "--batch-size 64 (the checkpoint's run has 32)"),
    (["--seed", "1", "--backend", "torch"], "--seed 1 (the checkpoint's run has 0); --backend torch"),
    (["--data-dir", "x"], "--data-dir: the digits dataset comes with scikit-learn"),
])
def test_resume_refuses_flags_that_contradict_the_checkpoint(tiny_run, tmp_path, monkeypatch, capsys,
                                                             flags, message):
    monkeypatch.setattr(cli.datasets, "load", lambda *a, **k: pytest.fail("data loaded"))
    with pytest.raises(SystemExit) as exit:
        cli.main(["prune", "--resume", str(copy_of(tiny_run, tmp_path)), *flags])
    err = capsys.readouterr().err
    assert exit.value.code == 2 and "usage: mackay-ext prune" in err and message in err


def test_resume_accepts_the_checkpoints_own_values_silently(tiny_run, tmp_path, capsys):
    checkpoint = copy_of(tiny_run, tmp_path)
    assert cli.main(["prune", "--resume", str(checkpoint), "--model", "digits-mlp", "--batch-size",
                     "32", "--rounds", "1", "--lr", "0.001", "--quiet"]) == 0
    assert capsys.readouterr().err == ""


def test_resume_honours_more_rounds_and_says_so(tiny_run, tmp_path, capsys):
    checkpoint = copy_of(tiny_run, tmp_path)
    assert cli.main(["prune", "--resume", str(checkpoint), "--rounds", "2", "--quiet"]) == 0
    assert error_lines(capsys.readouterr().err) == [
        "mackay-ext: resuming with --rounds 2 (the checkpoint's run had 1)"]
    before = json.loads((tiny_run / "report.json").read_text())
    after = json.loads((checkpoint.parent / "report.json").read_text())
    assert after["settings"]["rounds"] == 2 and len(after["updates"]) > len(before["updates"])
    assert load_plain(str(checkpoint), "checkpoint")["cli_settings"]["rounds"] == 2


def test_resume_refuses_fewer_rounds_than_have_run(tiny_run, tmp_path, capsys):
    """A new user's --resume --rounds 1 of a 2-round run killed in its second round finished at
    once, and report.json called it a 1-round run with 2 pruning updates."""
    checkpoint = copy_of(tiny_run, tmp_path)
    assert cli.main(["prune", "--resume", str(checkpoint), "--rounds", "2", "--quiet"]) == 0
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit:
        cli.main(["prune", "--resume", str(checkpoint), "--rounds", "1"])
    err = capsys.readouterr().err
    assert exit.value.code == 2
    assert "--rounds cannot change this run any more: 2 pruning rounds have run or begun, more than 1" in err


@pytest.mark.parametrize("round_index, updated, rounds, late", [
    (2, True, 1, True),     # killed in round 2, after its update: 2 rounds begun
    (2, False, 1, False),   # round 1 over, round 2 not begun: a 1-round run ends there
    (2, True, 2, False),
    (1, True, 1, False),
])
def test_late_rounds_on_resume(round_index, updated, rounds, late):
    from mackay_ext.train import late_length_changes
    position = {"phase": "round", "round": round_index, "epoch": 0, "updated": updated}
    found, _ = late_length_changes({"rounds": 3}, {"rounds": rounds, "schedule": "paper"}, position)
    assert (found == ["rounds"]) == late


def test_a_new_run_into_an_out_holding_another_is_refused_until_overwrite(tiny_run, tmp_path, capsys,
                                                                            monkeypatch):
    """A new run into a used --out silently replaced its run (a resumable checkpoint too), and a
    kill left the two runs' files mixed. It is refused, naming --resume and --overwrite; with
    --overwrite the old run's files go before the new run starts."""
    out = tmp_path / "used"
    shutil.copytree(tiny_run, out)
    before = (out / "report.json").read_bytes()
    for argv in (["prune", *TINY, "--seed", "1", "--out", str(out)],
                 ["prune", "--resume", str(copy_of(tiny_run, tmp_path)), "--out", str(out)]):
        with pytest.raises(SystemExit) as exit:
            cli.main(argv)
        err = capsys.readouterr().err
        assert exit.value.code == 2, argv
        assert f"--out {out} holds another run (checkpoint.pt, report.json, model.pt" in err
        assert f"mackay-ext prune --resume {out / 'checkpoint.pt'}" in err and "--overwrite" in err
    assert (out / "report.json").read_bytes() == before
    with monkeypatch.context() as patch:   # killed at once: no file of the old run is left
        patch.setattr(Trainer, "run", lambda self: (_ for _ in ()).throw(KeyboardInterrupt))
        assert cli.main(["prune", *TINY, "--seed", "1", "--quiet", "--overwrite", "--out", str(out)]) == 130
    assert not any((out / name).exists() for name in ("checkpoint.pt", "report.json", "model.pt"))
    assert cli.main(["prune", *TINY, "--seed", "1", "--quiet", "--overwrite", "--out", str(out)]) == 0
    assert json.loads((out / "report.json").read_text())["settings"]["seed"] == 1


@pytest.mark.parametrize("kind", ["model", "trainer", "list"])
def test_resume_from_a_file_that_is_not_a_cli_checkpoint(tiny_run, tmp_path, capsys, kind):
    path = tmp_path / f"{kind}.pt"
    if kind == "model":
        shutil.copy(tiny_run / "model.pt", path)
        message = f"--resume {path} is a compressed model (what `mackay-ext evaluate` reads), not a "
        message += "checkpoint"
    elif kind == "trainer":
        torch.save({"model": {}, "optimizer": {}, "position": {}}, path)
        message = "checkpoint of mackay_ext.train.Trainer without the command line's settings"
    else:
        torch.save([1, 2, 3], path)
        message = "is not a checkpoint written by mackay-ext prune"
    with pytest.raises(SystemExit) as exit:
        cli.main(["prune", "--resume", str(path)])
    err = capsys.readouterr().err
    assert exit.value.code == 2 and message in err and "Traceback" not in err


# ------------------------------------------------------------------------------------ evaluate
def test_evaluate_on_a_dataset_of_another_shape(tiny_run, tmp_path, capsys):
    mnist = tmp_path / "mnist"
    fake_mnist(str(mnist))
    for data_dir in (mnist, tmp_path / "absent"):  # refused before the data is read
        with pytest.raises(SystemExit) as exit:
            cli.main(["evaluate", str(tiny_run / "model.pt"), "--dataset", "mnist", "--data-dir",
                      str(data_dir)])
        err = capsys.readouterr().err
        assert exit.value.code == 2 and "Traceback" not in err
        assert "digits-mlp expects inputs of shape (64,) (as in digits), mnist gives (1, 28, 28)" in err


@pytest.mark.parametrize("keep", [0, 10, 0.5, -10])
def test_evaluate_truncated_model_is_one_line(tiny_run, tmp_path, capsys, keep):
    whole = (tiny_run / "model.pt").read_bytes()
    keep = int(len(whole) * keep) if isinstance(keep, float) else keep % len(whole)
    path = tmp_path / "model.pt"
    path.write_bytes(whole[:keep])
    assert cli.main(["evaluate", str(path)]) == 1
    err = error_lines(capsys.readouterr().err)
    assert len(err) == 1 and err[0].startswith(f"mackay-ext: compressed model {path} cannot be read")


def test_evaluate_names_what_the_file_is(tiny_run, tmp_path, capsys):
    assert cli.main(["evaluate", str(tiny_run / "checkpoint.pt")]) == 1
    assert "is a training checkpoint, not a compressed model" in capsys.readouterr().err
    payload = load_plain(str(tiny_run / "model.pt"), "compressed model")
    torch.save(dict(payload, model_name="alexnet"), tmp_path / "other.pt")
    assert cli.main(["evaluate", str(tmp_path / "other.pt")]) == 1
    assert "holds a model named 'alexnet'" in capsys.readouterr().err
    assert cli.main(["evaluate", str(tmp_path / "missing.pt")]) == 1
    assert error_lines(capsys.readouterr().err) == [
        f"mackay-ext: compressed model {tmp_path / 'missing.pt'}: no such file"]


def test_input_shapes_are_the_loaders(tmp_path):
    assert data.load("digits").input_shape == cli.INPUT_SHAPES["digits"]
    fake_mnist(str(tmp_path / "mnist"))
    assert data.load("mnist", str(tmp_path / "mnist")).input_shape == cli.INPUT_SHAPES["mnist"]
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(tmp_path / name, "wb") as handle:
            pickle.dump({b"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8),
                         b"labels": rng.integers(0, 10, 4).tolist()}, handle)
    assert data.load("cifar10", str(tmp_path)).input_shape == cli.INPUT_SHAPES["cifar10"]
    for name in ("train", "test"):
        with open(tmp_path / name, "wb") as handle:
            pickle.dump({b"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8),
                         b"fine_labels": rng.integers(0, 100, 4).tolist()}, handle)
    assert data.load("cifar100", str(tmp_path)).input_shape == cli.INPUT_SHAPES["cifar100"]
    assert set(cli.INPUT_SHAPES) == set(data.DATASETS)


# ------------------------------------------------------------------------------------ plots
def test_plots_missing_matplotlib_says_how_to_get_them(tiny_run, tmp_path, monkeypatch, capsys):
    checkpoint = copy_of(tiny_run, tmp_path)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    assert cli.main(["prune", "--resume", str(checkpoint), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert (f"plots skipped: matplotlib is not installed; `pip install matplotlib`, then "
            f"`mackay-ext prune --resume {checkpoint}` writes them") in out
    assert not (checkpoint.parent / "kept_per_layer.png").exists()
    monkeypatch.undo()
    pytest.importorskip("matplotlib")
    assert cli.main(["prune", "--resume", str(checkpoint), "--quiet"]) == 0  # as the line says
    assert (checkpoint.parent / "kept_per_layer.png").exists()
    assert "plots skipped" not in capsys.readouterr().out


def test_tqdm_and_matplotlib_are_installed_with_the_package():
    tree = ast.parse(open(os.path.join(ROOT, "setup.py")).read())
    requires = next(keyword.value for node in ast.walk(tree) if isinstance(node, ast.Call)
                    for keyword in node.keywords if keyword.arg == "install_requires")
    names = {ast.literal_eval(element).split(">")[0].split("=")[0] for element in requires.elts}
    assert {"tqdm", "matplotlib"} <= names


def test_resume_from_a_checkpoint_that_does_not_fit_its_model(tiny_run, tmp_path, capsys):
    checkpoint = copy_of(tiny_run, tmp_path)
    state = load_sealed(str(checkpoint), "checkpoint")
    del state["model"]["1.weight"]
    save_sealed(state, str(checkpoint))   # an edit, its digest made again
    assert cli.main(["prune", "--resume", str(checkpoint), "--quiet"]) == 1
    err = error_lines(capsys.readouterr().err)
    assert len(err) == 1 and err[0].startswith(f"mackay-ext: checkpoint {checkpoint} does not fit "
                                               "the digits-mlp it names: ")
    assert "1.weight" in err[0]
