"""What a run says after its fine-tuning (prior off) and when a resume asks for more than the
checkpoint can still do; one pruner per weight."""
import copy
import json
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import mackay_ext


def cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "mackay_ext.cli", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=600)


def _trained_pruner():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 4))
    optimizer = mackay_ext.MacKayAdam(model.parameters(), lr=1e-2, num_data=500, batch_size=50)
    pruner = mackay_ext.MacKayPruner(model, optimizer, num_data=500)
    x, y = torch.randn(50, 12), torch.randint(0, 4, (50,))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for update in range(3):
            for _ in range(20):
                optimizer.zero_grad()
                F.cross_entropy(model(x), y).backward()
                optimizer.step()
            pruner.update()
    return model, optimizer, pruner


def test_switch_off_prior_keeps_the_alphas_it_switched_off():
    model, optimizer, pruner = _trained_pruner()
    before = {name: pruner.alpha(name).clone() for name in pruner.targets}
    assert any(bool((a[torch.isfinite(a)] > 0).any()) for a in before.values())
    pruner.switch_off_prior()
    pruner.switch_off_prior()   # twice in a row: the alphas of the first call stay
    for name, alpha in before.items():
        assert torch.equal(pruner.alpha_before_switch_off[name], alpha.cpu())
        now = pruner.alpha(name)
        assert bool((now[torch.isfinite(now)] == 0).all())
    layer = pruner.report()["layers"][0]
    assert layer["alpha"] == {"min": 0.0, "p5": 0.0, "p50": 0.0, "p95": 0.0, "max": 0.0}
    finite = before[layer["name"]][torch.isfinite(before[layer["name"]])].double()
    assert layer["alpha_before_switch_off"]["min"] == pytest.approx(float(finite.min()))
    assert layer["alpha_before_switch_off"]["max"] == pytest.approx(float(finite.max()))

    pruner.detach()
    fresh_optimizer = mackay_ext.MacKayAdam(model.parameters(), lr=1e-2, num_data=500, batch_size=50)
    restored = mackay_ext.MacKayPruner(model, fresh_optimizer, num_data=500)
    restored.load_state_dict(pruner.state_dict())
    for name, alpha in before.items():
        assert torch.equal(restored.alpha_before_switch_off[name], alpha.cpu())


def test_a_second_pruner_on_the_same_weights_is_refused_until_the_first_detaches():
    model, optimizer, pruner = _trained_pruner()
    with pytest.raises(ValueError, match=r"layers '0', '2' already have a prior from another MacKayPruner"):
        mackay_ext.MacKayPruner(model, optimizer, num_data=500)
    other = torch.optim.Adam(model.parameters())
    with pytest.raises(ValueError, match="Call that pruner's detach"):
        mackay_ext.MacKayPruner(model, other, num_data=500, batch_size=50)
    assert mackay_ext.attached_pruners(model) == [pruner]
    pruner.detach()
    assert mackay_ext.attached_pruners(model) == []
    replacement = mackay_ext.MacKayPruner(model, optimizer, num_data=500)
    assert mackay_ext.attached_pruners(model) == [replacement]
    # the detached one cannot touch the weights the replacement now holds
    before = [p.detach().clone() for p in model.parameters()]
    for call in (pruner.update, pruner.apply_masks):
        with pytest.raises(RuntimeError, match=r"MacKayPruner\.\w+: this pruner was detached"):
            call()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert pruner.report()["total"] == replacement.report()["total"]   # still readable


def test_a_mackay_adams_prior_outlives_detach_until_switched_off():
    """MacKayAdam's state holds the alphas its steps apply: after detach they stay (a state saved
    then resumes them), and switch_off_prior() on the detached pruner ends the prior on the kept
    weights (the same steps as on a copy whose finite alphas were zeroed by hand), the pruned
    held at 0."""
    model, optimizer, pruner = _trained_pruner()
    alphas = {name: pruner.alpha(name).clone() for name in pruner.targets}
    assert any(bool((a[torch.isfinite(a)] > 0).any()) for a in alphas.values())
    assert any(bool(torch.isinf(a).any()) for a in alphas.values())
    twin_model, twin_optimizer = copy.deepcopy((model, optimizer))   # the prior switched off by hand
    for param in twin_model.parameters():
        if "alpha" in twin_optimizer.state.get(param, {}):
            alpha = twin_optimizer.ard_state(param)["alpha"]
            alpha.masked_fill_(torch.isfinite(alpha), 0.0)
    pruner.detach()
    saved = copy.deepcopy(optimizer.state_dict())   # (as torch.save writes it then)
    pruner.switch_off_prior()
    assert all(torch.equal(pruner.alpha_before_switch_off[name], alphas[name]) for name in alphas)
    x, y = torch.randn(50, 12), torch.randint(0, 4, (50,))
    for net, adam in ((model, optimizer), (twin_model, twin_optimizer)):
        for _ in range(5):
            adam.zero_grad()
            F.cross_entropy(net(x), y).backward()
            adam.step()
    for param, twin in zip(model.parameters(), twin_model.parameters()):
        torch.testing.assert_close(param, twin, rtol=0, atol=0)
    for name, target in pruner.targets.items():
        assert not bool(target.param[torch.isinf(alphas[name]).expand_as(target.param)].any())
    resumed = mackay_ext.MacKayAdam(model.parameters(), lr=1e-2, num_data=500, batch_size=50)
    resumed.load_state_dict(saved)
    replacement = mackay_ext.MacKayPruner(model, resumed, num_data=500)
    assert all(torch.equal(replacement.alpha(name), alphas[name]) for name in alphas)


def test_pruners_on_different_layers_of_one_model_coexist():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    optimizer = torch.optim.Adam(model.parameters())
    first = mackay_ext.MacKayPruner(model, optimizer, num_data=100, batch_size=10, layers=["0"])
    second = mackay_ext.MacKayPruner(model, optimizer, num_data=100, batch_size=10, layers=["2"])
    assert set(mackay_ext.attached_pruners(model)) == {first, second}
    with pytest.raises(ValueError, match=r"^MacKayPruner: layers '0', '2' already have"):
        mackay_ext.MacKayPruner(model, optimizer, num_data=100, batch_size=10)


def test_a_dropped_pruner_frees_its_weights():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    optimizer = mackay_ext.MacKayAdam(model.parameters(), num_data=100, batch_size=10)
    mackay_ext.MacKayPruner(model, optimizer, num_data=100)
    optimizer = mackay_ext.MacKayAdam(model.parameters(), num_data=100, batch_size=10)
    # the first pruner lives only in a cycle with the first optimizer: it is garbage
    mackay_ext.MacKayPruner(model, optimizer, num_data=100)


@pytest.fixture(scope="module")
def finetuned_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("finetuned")
    result = cli("prune", "--out", str(out), "--quiet", "--pretrain-epochs", "3", "--rounds", "1",
                 "--epochs", "2", "--finetune-epochs", "1", cwd=out)
    assert result.returncode == 0, result.stderr
    return out, result


def test_a_finetuned_run_reports_the_alphas_it_pruned_with(finetuned_run):
    out, result = finetuned_run
    assert (out / "log_alpha_hist.png").exists()
    assert "* before the fine-tuning" in result.stdout
    rows = [line for line in result.stdout.splitlines() if line.rstrip().endswith("*")]
    assert rows and all("0.00e+00..0.00e+00" not in row for row in rows)


@pytest.mark.parametrize("flags,message", [
    (["--rounds", "3"], "--rounds cannot change this run any more: the pruning is over"),
    (["--epochs", "5"], "--epochs cannot change this run any more: the pruning is over"),
])
def test_resume_of_a_finetuned_run_refuses_more_rounds(finetuned_run, tmp_path, flags, message):
    out, _ = finetuned_run
    result = cli("prune", "--resume", str(out / "checkpoint.pt"), "--out", str(tmp_path), "--quiet", *flags,
                 cwd=tmp_path)
    assert result.returncode == 2
    assert message in result.stderr
    assert not (tmp_path / "report.json").exists()


def test_resume_of_a_finished_paper_run_with_more_rounds_prunes_more(tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    common = ["--quiet", "--pretrain-epochs", "3", "--epochs", "2"]
    result = cli("prune", "--out", str(first), "--rounds", "1", *common, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    result = cli("prune", "--resume", str(first / "checkpoint.pt"), "--out", str(second), "--rounds", "3",
                 "--quiet", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "resuming with --rounds 3" in result.stderr
    before = json.loads((first / "report.json").read_text())
    after = json.loads((second / "report.json").read_text())
    assert len(after["updates"]) == len(before["updates"]) + 2
    result = cli("prune", "--resume", str(second / "checkpoint.pt"), "--out", str(tmp_path / "c"),
                 "--epochs", "4", "--quiet", cwd=tmp_path)
    assert result.returncode == 2 and "every round has run (add rounds with --rounds)" in result.stderr
    result = cli("prune", "--resume", str(second / "checkpoint.pt"), "--out", str(tmp_path / "c"),
                 "--pretrain-epochs", "9", "--quiet", cwd=tmp_path)
    assert result.returncode == 2 and "the dense pretraining is over" in result.stderr
