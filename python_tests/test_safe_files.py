"""Every file mackay_ext reads is loaded with weights_only=True: a crafted pickle runs nothing.

One payload per entry point (load_compressed, `mackay-ext evaluate`, `mackay-ext prune --resume`,
Trainer.load_checkpoint); each must fail with one clear error and leave no trace of its code.
"""
from __future__ import annotations

import os
import signal

import pytest
import torch

import mackay_ext
from mackay_ext import _files, cli
from mackay_ext._files import CorruptFileError, UnsafeFileError, load_plain


class Payload:
    """Unpickling calls os.system(...), which would create `marker`."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def crafted(tmp_path, name="evil.pt"):
    marker = tmp_path / "PWNED"
    path = tmp_path / name
    # the shape of a real file, with the payload inside: the check must come before any use
    torch.save({"format": "mackay_ext.compressed.v1", "model_name": "digits-mlp",
                "cli_settings": {}, "payload": Payload(marker)}, path)
    return str(path), marker


def test_load_compressed_refuses_code(tmp_path):
    path, marker = crafted(tmp_path)
    with pytest.raises(UnsafeFileError, match="nothing in it was run"):
        mackay_ext.load_compressed(path)
    assert not marker.exists()


def test_cli_evaluate_refuses_code(tmp_path, capsys):
    path, marker = crafted(tmp_path)
    assert cli.main(["evaluate", path]) == 1
    err = capsys.readouterr().err
    assert "refused" in err and "Traceback" not in err and err.count("\n") == 1
    assert not marker.exists()


def test_cli_resume_refuses_code(tmp_path, capsys):
    path, marker = crafted(tmp_path, "checkpoint.pt")
    assert cli.main(["prune", "--resume", path, "--out", str(tmp_path / "out"), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "refused" in err and "Traceback" not in err
    assert not marker.exists()


def test_trainer_checkpoint_refuses_code(tmp_path):
    from mackay_ext.train import FitConfig, Trainer
    path, marker = crafted(tmp_path)
    data = mackay_ext.data.load("digits", seed=0)
    trainer = Trainer(mackay_ext.models.create("digits-mlp"), data, FitConfig(backend="torch"))
    with pytest.raises(UnsafeFileError):
        trainer.load_checkpoint(path)
    assert not marker.exists()


def test_what_the_package_writes_loads_safely(tmp_path):
    """Checkpoints and compressed models hold only plain types: they load with weights_only."""
    from mackay_ext.train import FitConfig, Trainer
    data = mackay_ext.data.load("digits", seed=0)
    checkpoint = str(tmp_path / "checkpoint.pt")
    config = FitConfig(pretrain_epochs=1, rounds=1, epochs=1, backend="torch")
    trainer = Trainer(mackay_ext.models.create("digits-mlp"), data, config, checkpoint=checkpoint)
    trainer.run()
    state = torch.load(checkpoint, weights_only=True)
    assert state["position"]["phase"] == "round"
    model = mackay_ext.sparsify(trainer.model, trainer.optimizer, min_sparsity=0.0)
    mackay_ext.save_compressed(model, str(tmp_path / "m.pt"), model_name="digits-mlp")
    assert torch.load(str(tmp_path / "m.pt"), weights_only=True)["model_name"] == "digits-mlp"


def test_truncated_and_missing_files(tmp_path):
    good = tmp_path / "good.pt"
    torch.save({"a": torch.ones(1000)}, good)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(good.read_bytes()[:300])
    with pytest.raises(CorruptFileError, match="corrupt or truncated"):
        load_plain(str(cut), "checkpoint")
    (tmp_path / "text.pt").write_text("hello, not a torch file")
    with pytest.raises(CorruptFileError, match=r"not a torch file \(its first bytes are neither a zip archive's "
                                               r"nor a pickle's\)"):   # it said "(104)", a byte's code
        load_plain(str(tmp_path / "text.pt"), "checkpoint")
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_plain(str(tmp_path / "absent.pt"), "checkpoint")
    with pytest.raises(IsADirectoryError):
        load_plain(str(tmp_path), "checkpoint")


def test_ctrl_c_during_a_checkpoint_write_waits_for_the_write(tmp_path, monkeypatch):
    """torch.save turns a KeyboardInterrupt raised inside its writer into a RuntimeError
    ("enforce fail at inline_container.cc", a crash to the CLI); save_atomic holds Ctrl-C until
    the file is written and renamed, then raises KeyboardInterrupt, and Python's handler is back."""
    real_save = torch.save

    def save_interrupted(obj, handle):
        os.kill(os.getpid(), signal.SIGINT)   # Ctrl-C in the middle of the write
        real_save(obj, handle)

    monkeypatch.setattr(_files.torch, "save", save_interrupted)
    path = tmp_path / "checkpoint.pt"
    # Python's own handler, as in a terminal (a background job, as CI's is, starts with SIGINT ignored)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            _files.save_atomic({"w": torch.arange(5.0)}, str(path))
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, previous)
    monkeypatch.undo()
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.arange(5.0))
    assert not (tmp_path / "checkpoint.pt.tmp").exists()


def test_a_nest_of_shared_or_self_holding_lists_is_refused_at_once(tmp_path):
    """A 13 kB file of lists each holding the previous one twice loads in a millisecond but
    unfolds into 2**60 entries: the view check (and the digest after it) never finished, in
    every loader. A list that holds itself gave a bare RecursionError."""
    nest = ["x"]
    for _ in range(60):
        nest = [nest, nest]
    torch.save({"metadata": nest}, tmp_path / "nest.pt")
    with pytest.raises(_files.CorruptFileError, match=r"unfolds into more than 10,000,000 entries"):
        _files.load_plain(str(tmp_path / "nest.pt"), "checkpoint")
    loop = [1]
    loop.append(loop)
    torch.save({"x": loop}, tmp_path / "loop.pt")
    with pytest.raises(_files.CorruptFileError, match=r"holds a list that contains itself"):
        _files.load_plain(str(tmp_path / "loop.pt"), "checkpoint")
    shared = (0.9, 0.999)   # torch's optimizers share one betas tuple between param groups
    torch.save({"groups": [{"betas": shared}, {"betas": shared}]}, tmp_path / "shared.pt")
    assert _files.load_plain(str(tmp_path / "shared.pt"), "checkpoint")["groups"][1]["betas"] == shared


def test_a_pipe_is_refused_and_a_planted_link_at_the_temporary_name_is_not_written_through(tmp_path):
    """A named pipe blocked every loader for good; save_atomic wrote through a symlink planted
    at <path>.tmp, overwriting its target, and left <path> a link to it."""
    pipe = tmp_path / "pipe.pt"
    os.mkfifo(pipe)
    with pytest.raises(_files.CorruptFileError, match=r"is not a regular file \(a pipe, socket or device\)"):
        _files.load_plain(str(pipe), "checkpoint")
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    (tmp_path / "out.pt.tmp").symlink_to(victim)
    _files.save_atomic({"w": torch.ones(2)}, str(tmp_path / "out.pt"))
    assert victim.read_text() == "keep me"
    assert not (tmp_path / "out.pt").is_symlink()
    assert torch.equal(_files.load_plain(str(tmp_path / "out.pt"), "checkpoint")["w"], torch.ones(2))
