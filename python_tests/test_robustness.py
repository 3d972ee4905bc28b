"""Holding up: a SIGKILLed `mackay-ext prune` resumes to the uninterrupted result; bf16 autocast
training with MacKayAdam on the CPU; NaN gradients and curvature never reach alpha silently."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from torch import nn

from mackay_ext import MacKayAdam, MacKayPruner, ard_param_groups, mackay_update_

ARGS = ["prune", "--quiet", "--pretrain-epochs", "8", "--rounds", "3", "--epochs", "6", "--patience", "8"]


def start(out, *extra):
    return subprocess.Popen([sys.executable, "-m", "mackay_ext.cli", *ARGS, "--out", str(out), *extra],
                            cwd=out.parent, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_sigkill_then_resume_matches_uninterrupted(tmp_path):
    reference = tmp_path / "reference"
    reference.mkdir()
    done = start(reference)
    assert done.wait(timeout=600) == 0, done.stderr.read()
    expected = json.loads((reference / "report.json").read_text())

    killed = tmp_path / "killed"
    killed.mkdir()
    process = start(killed)
    checkpoint = killed / "checkpoint.pt"
    deadline = time.time() + 120
    while not checkpoint.exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.01)
    time.sleep(0.3)  # somewhere in the middle of training
    assert process.poll() is None, "the run finished before it could be killed"
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    position = torch.load(checkpoint, weights_only=True)["position"]
    assert (position["phase"], position["round"]) != ("round", 3)  # not already finished
    (killed / "checkpoint.pt.tmp").write_bytes(b"half a checkpoint")  # a write cut short
    resumed = subprocess.run([sys.executable, "-m", "mackay_ext.cli", "prune", "--quiet", "--resume",
                              str(checkpoint), "--out", str(killed)], cwd=tmp_path,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    result = json.loads((killed / "report.json").read_text())
    for key in ("weights_kept", "test_accuracy", "test_accuracy_dense", "layers", "updates"):
        assert result[key] == expected[key], key


def test_bf16_autocast_training_on_cpu():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 4))
    optimizer = MacKayAdam(ard_param_groups(model), lr=1e-2, num_data=256, batch_size=32)
    pruner = MacKayPruner(model, optimizer, num_data=256)
    x, y = torch.randn(256, 20), torch.randint(0, 4, (256,))
    for step in range(40):
        index = torch.arange(step * 32, step * 32 + 32) % 256
        optimizer.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(x[index])
            assert logits.dtype == torch.bfloat16
            loss = nn.functional.cross_entropy(logits.float(), y[index])
        loss.backward()
        optimizer.step()
        if step in (15, 30):
            pruner.update()
    for name in pruner.layers:
        assert torch.isfinite(pruner.curvature(name)).all()
        assert not torch.isnan(pruner.alpha(name)).any()
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_nan_never_reaches_alpha():
    weight = torch.tensor([[0.5, float("nan")], [0.1, 0.2]], dtype=torch.float64)
    curvature = torch.tensor([[1.0, 1.0], [float("inf"), float("nan")]], dtype=torch.float64)
    alpha = torch.full((2, 2), 4.0, dtype=torch.float64)
    mackay_update_(weight, curvature, alpha, num_data=10)
    assert not torch.isnan(alpha).any()
    assert alpha[0, 1].item() == 4.0 and alpha[1, 1].item() == 4.0  # NaN estimate: alpha kept
    group_alpha = torch.full((2, 1), 4.0, dtype=torch.float64)  # a NaN anywhere in a group
    mackay_update_(weight.clone(), curvature, group_alpha, num_data=10)
    assert group_alpha[0].item() == 4.0 and group_alpha[1].item() == 4.0


DYING_SAVE = """
import os, signal, sys
import torch
real_save = torch.save
calls = {"n": 0}

def dying_save(obj, handle, *args, **kwargs):
    calls["n"] += 1
    if calls["n"] == int(os.environ["DIE_AT_SAVE"]):  # killed half-way through writing a checkpoint
        handle.write(b"the first bytes of a checkpoint")
        handle.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    return real_save(obj, handle, *args, **kwargs)

torch.save = dying_save
from mackay_ext.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_sigkill_while_writing_a_checkpoint(tmp_path):
    reference = tmp_path / "reference"
    reference.mkdir()
    assert start(reference).wait(timeout=600) == 0
    expected = json.loads((reference / "report.json").read_text())
    out = tmp_path / "dying"
    out.mkdir()
    dying = subprocess.run([sys.executable, "-c", DYING_SAVE, *ARGS, "--out", str(out)], cwd=tmp_path,
                           capture_output=True, text=True, timeout=600, env=dict(os.environ, DIE_AT_SAVE="6"))
    assert dying.returncode == -signal.SIGKILL
    assert (out / "checkpoint.pt.tmp").exists()                # the torn write ...
    torch.load(out / "checkpoint.pt", weights_only=True)      # ... never replaced the last good one
    resumed = subprocess.run([sys.executable, "-m", "mackay_ext.cli", "prune", "--quiet", "--resume",
                              str(out / "checkpoint.pt"), "--out", str(out)], cwd=tmp_path,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    result = json.loads((out / "report.json").read_text())
    for key in ("weights_kept", "test_accuracy", "test_accuracy_dense", "layers", "updates"):
        assert result[key] == expected[key], key


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fp16_grad_scaler_on_cuda_skips_overflow_and_keeps_state_finite():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).cuda()
    optimizer = MacKayAdam(ard_param_groups(model), lr=1e-2, num_data=512, batch_size=32)
    optimizer.ard_state(model[0].weight)["alpha"].fill_(3.0)
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0 ** 16)
    x, y = torch.randn(32, 16, device="cuda"), torch.randint(0, 4, (32,), device="cuda")
    for step in range(6):
        optimizer.zero_grad()
        with torch.autocast("cuda", dtype=torch.float16):
            loss = nn.functional.cross_entropy(model(x), y)
            if step == 3:
                loss = loss * 1e30  # overflows in fp16: inf gradients, the step must be skipped
        before = [p.detach().clone() for p in model.parameters()]
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        if step == 3:
            assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    state = optimizer.state[model[0].weight]
    assert torch.isfinite(state["curvature"]).all() and torch.isfinite(state["alpha"]).all()
    assert state["step"].item() == 5  # the skipped step does not count
