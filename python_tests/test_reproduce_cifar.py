"""bench/reproduce_cifar.py and mackay_ext.recipes_cifar: the smoke run (synthetic CIFAR-format
pickles, and mnist32) writes every row with the promised fields, conv MACs agree with a count made
by hand from the surviving widths, the recipes encode the paper's protocol, and removed channels
stay removed through fine-tuning. The figures of a smoke run mean nothing."""
import json
import os
import subprocess
import sys

import pytest
import torch
from test_data import SHARED_MNIST, fake_mnist
from torch import nn

from mackay_ext import models, recipes_cifar
from mackay_ext.data import Splits
from mackay_ext.train import FitConfig, Trainer

BENCH = os.path.join(os.path.dirname(__file__), "..", "bench")
SCRIPT = os.path.join(BENCH, "reproduce_cifar.py")
sys.path.insert(0, BENCH)
import reproduce_cifar

METHODS = {"dense", "paper", "mackay", "channel", "weight", "magnitude (global L1)",
           "magnitude (global L1) at weight's count"}


def run_script(out, *args, check=True):
    result = subprocess.run([sys.executable, SCRIPT, "--smoke", "--out", str(out), "--quiet", *args],
                            capture_output=True, text=True, timeout=600, check=False)
    if check:
        assert result.returncode == 0, result.stderr
    return result


@pytest.fixture(scope="module")
def cifar_smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("cifar")
    run_script(out, "--models", "resnet-20", "vgg-d6", "--seeds", "0")
    return out


def resnet_conv_macs(widths, in_channels=3, depth=20):
    """Conv MACs of a CIFAR ResNet (32x32 input) from its conv widths in model order, counted by hand:
    stem, then conv1 / conv2 of every block; a block's conv1 reads the residual stream."""
    n = (depth - 2) // 6
    stream = widths[0]
    macs = 32 * 32 * widths[0] * in_channels * 9
    size, i = 32, 1
    for stage in range(3):
        for block in range(n):
            if stage and not block:
                size //= 2
            inner, out = widths[i], widths[i + 1]
            macs += size * size * inner * stream * 9 + size * size * out * inner * 9
            stream, i = out, i + 2
    return macs


def test_every_row_and_field(cifar_smoke):
    rows = json.loads((cifar_smoke / "cifar_smoke.json").read_text())
    for model in ("resnet-20", "vgg-d6 (width 1/8)"):
        measured = {r["method"]: r for r in rows if r["model"] == model and r["source"] == "measured"}
        assert set(measured) == METHODS
        for row in measured.values():
            assert row["dataset"] == "cifar10" and row["seeds"] == [0]
            assert 0 <= row["test_error"] <= 100 and 0 < row["weights_kept"] <= 100
            assert 0 < row["conv_macs_kept"] <= 100 and row["wall_seconds"] > 0
            assert "threads" in row["hardware"] and row["conv_channels"]
            assert row["per_seed"][0]["classes"] == 10
            seed = row["per_seed"][0]
            assert seed["weights_kept"] == pytest.approx(100 * seed["kept"] / seed["total"])
            assert seed["conv_macs_kept"] == pytest.approx(100 * seed["conv_macs"] / seed["conv_macs_dense"])
        assert measured["dense"]["weights_kept"] == 100 and measured["dense"]["conv_macs_kept"] == 100
        # each magnitude baseline keeps exactly as many weights as its MacKay row of the seed
        assert measured["magnitude (global L1)"]["per_seed"][0]["kept"] == measured["mackay"]["per_seed"][0]["kept"]
        assert (measured["magnitude (global L1) at weight's count"]["per_seed"][0]["kept"]
                == measured["weight"]["per_seed"][0]["kept"])
    resnet = [r for r in rows if r["model"] == "resnet-20" and r["source"] == "measured"]
    for row in resnet:   # conv MACs of the shrunk network against a count from its widths
        seed = row["per_seed"][0]
        assert seed["conv_macs"] == resnet_conv_macs(seed["conv_channels"])
        assert seed["conv_macs_dense"] == resnet_conv_macs([16] * 7 + [32] * 6 + [64] * 6)
    vgg_dense = next(r for r in rows if r["model"] == "vgg-d6 (width 1/8)" and r["method"] == "dense")
    assert vgg_dense["conv_channels"] == [8, 8, 16, 16, 32, 32, 32, 64, 64, 64, 64, 64, 64]
    assert vgg_dense["linear_inputs"] == [64, 64]
    published = [r for r in rows if r["source"] != "measured"]
    assert {r["model"] for r in published} == {"vgg-d6"}   # only the measured architectures
    assert any("Table 4" in r["source"] and r["weights_kept"] == 15.57 for r in published)
    assert any("Molchanov" in r["source"] for r in published)


def test_markdown(cifar_smoke):
    text = (cifar_smoke / "cifar_smoke.md").read_text()
    assert "Smoke run" in text and "| model | method | test error % | weights kept % | conv MACs kept %" in text
    assert text.count("| resnet-20 |") == 7 and text.count("| vgg-d6 (width 1/8) |") == 7
    assert "Width-scaled to fit the CPU budget: vgg-d6 (width 1/8)" in text
    assert "Hardware:" in text and "no flips" in text and "not a claim about CIFAR" not in text


def test_mnist32_smoke_says_what_it_checks(tmp_path):
    data_dir = SHARED_MNIST
    if not os.path.isdir(data_dir):
        data_dir = str(tmp_path / "mnist")
        fake_mnist(data_dir, n_train=300, n_test=80)
    run_script(tmp_path, "--dataset", "mnist32", "--data-dir", data_dir, "--models", "vgg-d6", "--seeds", "0")
    text = (tmp_path / "mnist32_smoke.md").read_text()
    assert "not a claim about CIFAR" in text
    assert "(≤5% weights within 0.1 points of dense)" in text   # the target, with its verdict
    rows = json.loads((tmp_path / "mnist32_smoke.json").read_text())
    measured = [r for r in rows if r["source"] == "measured"]
    assert {r["dataset"] for r in measured} == {"mnist32"}
    assert all(r["conv_channels"][0] == 8 for r in measured)   # 1 input channel, width 1/8
    assert any(r["dataset"] == "cifar10" and "Table 4" in r["source"] for r in rows if r["source"] != "measured")


def test_cifar100_smoke(tmp_path):
    run_script(tmp_path, "--dataset", "cifar100", "--models", "vgg-d6", "--seeds", "0")
    rows = json.loads((tmp_path / "cifar100_smoke.json").read_text())
    measured = [r for r in rows if r["source"] == "measured"]
    assert len(measured) == 7 and all(r["per_seed"][0]["classes"] == 100 for r in measured)
    published = [r for r in rows if r["source"] != "measured"]
    assert [(r["test_error"], r["weights_kept"]) for r in published] == [(29.91, 100.0), (28.81, 42.05)]


def test_bad_data_dir_is_named(tmp_path):
    missing = tmp_path / "no-cifar"
    result = run_script(tmp_path, "--data-dir", str(missing), "--models", "resnet-20", check=False)
    assert result.returncode == 1 and f"CIFAR-10 directory {missing} not found" in result.stderr
    result = run_script(tmp_path, "--vgg-width", "0", check=False)
    assert result.returncode == 2 and "--vgg-width must be a positive divisor" in result.stderr


def test_verdicts_and_published_rows():
    row = {"dataset": "mnist32", "architecture": "resnet-56", "method": "channel", "test_error": 0.6,
           "conv_macs_kept": 49.0, "weights_kept": 60.0, "wall_seconds": 10.0}
    assert reproduce_cifar.verdict(row, dense_error=0.5).startswith("met")
    assert reproduce_cifar.verdict(row, dense_error=0.45).startswith("NOT met")   # 0.15 points worse
    assert reproduce_cifar.verdict(dict(row, conv_macs_kept=51.0), 0.6).startswith("NOT met")
    assert reproduce_cifar.verdict(dict(row, dataset="cifar10"), 0.6) == ""
    assert reproduce_cifar.verdict(dict(row, method="magnitude (global L1)"), 0.6) == ""
    slow = dict(row, architecture="resnet-20", wall_seconds=3700.0)
    assert reproduce_cifar.verdict(slow, 0.6) == "NOT met (CPU wall < 60 min)"
    published = reproduce_cifar.published_rows("mnist32", {"resnet-56"})
    assert {r["dataset"] for r in published} == {"cifar10"}
    ours = next(r for r in published if "Table 6" in r["source"] and r["method"] != "dense")
    assert (ours["test_error"], ours["weights_kept"], ours["conv_macs_kept"]) == (6.70, 46.98, 53.11)
    depgraph = next(r for r in published if "DepGraph" in r["source"])
    assert depgraph["conv_macs_kept"] == pytest.approx(46.95, abs=0.01)
    assert depgraph["test_error"] == pytest.approx(6.23)
    assert [r["test_error"] for r in reproduce_cifar.published_rows("cifar100", {"vgg-d6"})] == [29.91, 28.81]


# ------------------------------------------------------------------------------- recipes
def test_recipes_encode_the_paper_protocol():
    for model in recipes_cifar.MODELS:
        paper = recipes_cifar.get(f"{model}-paper")
        config = paper.config
        assert paper.dataset == "cifar10" and config.schedule == "paper" and config.batch_size == 128
        assert config.lr_schedule == "plateau" and config.lr_decay == 0.9
        assert config.retrain_lr == (1e-3 if model.startswith("resnet") else 1e-4)
        assert paper.pruner["rule"] == "paper" and paper.pruner["granularity"] == "filter"
        # pruned once the group's rms weight is at most one Adam step (snr cannot fire with gamma = 1)
        assert paper.pruner["prune"] == "alpha"
        assert paper.pruner["threshold"] == pytest.approx(1 / config.retrain_lr ** 2)
        assert paper.pruner["ard_layers"] == ("block-inner" if model.startswith("resnet") else "all")
        mackay, channel = recipes_cifar.get(f"{model}-mackay"), recipes_cifar.get(f"{model}-channel")
        assert mackay.pruner["rule"] == channel.pruner["rule"] == "mackay"
        assert mackay.pruner["prune"] == channel.pruner["prune"] == "snr"
        assert mackay.pruner["ard_layers"] == paper.pruner["ard_layers"]
        assert channel.pruner["granularity"] == "channel" and channel.pruner["ard_layers"] == "all"
        # the MacKay methods thin a layer over several updates; the paper's rule has no such limit
        assert mackay.pruner["max_prune_fraction"] == channel.pruner["max_prune_fraction"] == 0.5
        assert "max_prune_fraction" not in paper.pruner
        # weight: one alpha per weight of every layer, updates twice as often (the cap's floor)
        weight = recipes_cifar.get(f"{model}-weight")
        assert weight.pruner["granularity"] == "weight" and weight.pruner["ard_layers"] == "all"
        assert weight.pruner["rule"] == "mackay" and weight.pruner["max_prune_fraction"] == 0.5
        for dataset in ("cifar10", "mnist32"):
            every = {m: recipes_cifar.for_run(model, m, dataset).config.update_every_steps
                     for m in ("mackay", "weight")}
            assert every["weight"] == every["mackay"] // 2 > 0
        assert recipes_cifar.for_run(model, "paper", "cifar100") is paper
        assert recipes_cifar.for_run(model, "paper", "mnist32").name == f"{model}-paper-mnist32"
    assert recipes_cifar.get("resnet-56-paper").config.rounds == 4   # + the warm-up round: the paper's 5


def test_snr_hardly_prunes_under_the_paper_rule():
    """Why the paper preset prunes on alpha: with gamma = 1 a group's snr is at least
    |w|^2 / (|w|^2 + eps), so it falls below a threshold t < 1 only once |w|^2 < t eps / (1 - t)."""
    from mackay_ext import ops
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(64, 9, generator=generator) * torch.logspace(-6, 0, 64)[:, None]
    curvature = torch.rand(64, 9, generator=generator) * torch.logspace(-6, 2, 64)[:, None]
    assert float(weight.pow(2).sum(1).min()) > 1e-14          # 100 eps and more
    alpha = torch.zeros(64, 1)
    stats = ops.mackay_update_(weight, curvature, alpha, num_data=50000.0, rule="paper", prune="snr",
                               threshold=0.5, eps=1e-16, backend="torch")
    assert int(stats.num_pruned) == 0 and torch.isfinite(alpha).all()
    tiny = torch.full((1, 9), 1e-10)                            # |w|^2 = 9e-20, below eps
    stats = ops.mackay_update_(tiny, torch.ones(1, 9), torch.zeros(1, 1), num_data=50000.0, rule="paper",
                               prune="snr", threshold=0.05, eps=1e-16, backend="torch")
    assert int(stats.num_pruned) == 1


def test_recipe_errors():
    with pytest.raises(ValueError, match="unknown CIFAR recipe 'resnet-57-paper'; recipes: .*resnet-56-paper"):
        recipes_cifar.get("resnet-57-paper")
    with pytest.raises(ValueError, match="for_run: method must be one of"):
        recipes_cifar.for_run("resnet-20", "magnitude", "cifar10")
    with pytest.raises(ValueError, match="for_run: dataset must be"):
        recipes_cifar.for_run("resnet-20", "paper", "svhn")
    with pytest.raises(ValueError, match="resnet-20-channel prunes coupled channel groups.*example_inputs"):
        recipes_cifar.pruner_options(recipes_cifar.get("resnet-20-channel"), models.create("resnet-20"))


def tiny_data(n=64, channels=3, classes=10):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(n, channels, 32, 32, generator=generator)
    y = torch.randint(0, classes, (n,), generator=generator)
    return Splits(x, y, x[:16], y[:16], x[:16], y[:16], "cifar10")


def test_pruner_options_put_ard_where_the_paper_does():
    data = tiny_data()
    model = models.create("resnet-20")
    options = recipes_cifar.pruner_options(recipes_cifar.get("resnet-20-paper"), model)
    expected = [f"layer{stage}.{block}.conv1" for stage in (1, 2, 3) for block in range(3)]
    assert options["layers"] == expected and "ard_layers" not in options
    trainer = Trainer(model, data, FitConfig(pretrain_epochs=0), pruner_options=options)
    assert sorted(trainer.pruner.targets) == sorted(expected)
    assert set(trainer.pruner.granularity.values()) == {"filter"}
    vgg = models.create("vgg-d6")
    vgg_options = recipes_cifar.pruner_options(recipes_cifar.get("vgg-d6-mackay"), vgg)
    assert "layers" not in vgg_options   # every conv and Linear
    channel = recipes_cifar.pruner_options(recipes_cifar.get("resnet-20-channel"), model, data.x_train[:2])
    assert channel["granularity"] == "channel" and channel["example_inputs"].shape == (2, 3, 32, 32)


# ----------------------------------------------------------------------- channel removal
@pytest.fixture
def one_thread():
    """Tiny tensors: threads only cost here (and on a busy CI machine, a lot)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_removed_channels_stay_removed_through_finetuning(one_thread):
    """A pruned block filter leaves its BatchNorm shift feeding conv2; remove_dead_channels zeroes
    the whole channel (and its Adam moments), so after fine-tuning it is still exactly zero and
    shrink cuts it out; the layer's last live channel is never removed."""
    torch.manual_seed(0)
    data = tiny_data(n=32)
    model = models.create("resnet-20")
    recipe = recipes_cifar.get("resnet-20-mackay")
    trainer = Trainer(model, data, recipe.fit_config(pretrain_epochs=1, epochs=0, finetune_epochs=0,
                                                     batch_size=16),
                      pruner_options=recipes_cifar.pruner_options(recipe, model))
    trainer.pretrain()
    block = model.layer1[0]
    with torch.no_grad():
        block.conv1.weight[:3] = 0                 # three pruned filters of layer1.0.conv1
        block.bn1.bias[:3] = 0.5                    # whose BatchNorm shift still reaches conv2
        model.layer2[1].conv1.weight.zero_()        # every filter of another layer pruned
    groups = reproduce_cifar.trace_coupling(model, data.x_train[:2]).groups
    cut = reproduce_cifar.remove_dead_channels(trainer, groups)
    cut_members = {repr(m) for g in cut for m in g.members}
    assert {"layer1.0.conv2.weight[in 0]", "layer1.0.bn1.bias[1]", "layer1.0.conv2.weight[in 2]"} <= cut_members
    assert sum(1 for g in cut if any(m.name == "layer2.1.conv1.weight" for m in g.members)) == 31  # one spared
    assert not block.conv2.weight[:, :3].any() and not block.bn1.bias[:3].any()
    trainer.finetune(1, 1e-3)
    assert all(g.is_zero(model) for g in cut)
    model.eval()
    small = reproduce_cifar.shrink(model, data.x_train[:2])
    assert small.layer1[0].conv1.out_channels == 13 and small.layer2[1].conv1.out_channels == 1
    torch.testing.assert_close(small(data.x_test), model(data.x_test), atol=1e-4, rtol=1e-4)
    assert isinstance(small.layer1[0].conv2, nn.Conv2d) and small.layer1[0].conv2.in_channels == 13


def test_a_stopped_run_resumes_where_it_stopped(cifar_smoke, tmp_path):
    """Rows the table has are kept as they are; the missing ones are trained from the cached dense
    network, and come out as the uninterrupted run made them."""
    import shutil
    shutil.copytree(cifar_smoke, tmp_path, dirs_exist_ok=True)
    assert os.listdir(tmp_path / "cifar_cache")   # a dense network per model and seed
    whole = json.loads((tmp_path / "cifar_smoke.json").read_text())
    stopped = [dict(row) for row in whole if not (row.get("architecture") == "resnet-20" and row["method"] in
                                                  ("channel", "magnitude (global L1)"))]
    (tmp_path / "cifar_smoke.json").write_text(json.dumps(stopped))
    run_script(tmp_path, "--models", "resnet-20", "--seeds", "0")
    resumed = json.loads((tmp_path / "cifar_smoke.json").read_text())

    def by_key(rows):
        return {(r["model"], r["method"]): r for r in rows if r["source"] == "measured"}
    before, after = by_key(whole), by_key(resumed)
    assert before.keys() == after.keys()
    for key, row in before.items():
        if key[0].startswith("resnet-20") and key[1] in ("channel", "magnitude (global L1)"):
            new = after[key]["per_seed"][0]
            assert new["wall_seconds"] != row["per_seed"][0]["wall_seconds"]   # trained again
            for field in ("test_error", "kept", "conv_macs", "conv_channels"):
                assert new[field] == row["per_seed"][0][field], (key, field)
        else:
            assert after[key]["per_seed"] == row["per_seed"]   # untouched, not retrained
    # nothing left to do: the table stays as it is
    run_script(tmp_path, "--models", "resnet-20", "vgg-d6", "--seeds", "0")
    again = by_key(json.loads((tmp_path / "cifar_smoke.json").read_text()))
    assert {key: row["per_seed"] for key, row in again.items()} == {key: row["per_seed"] for key, row in after.items()}


def test_fresh_trains_again(tmp_path):
    run_script(tmp_path, "--models", "resnet-20", "--seeds", "0")
    first = json.loads((tmp_path / "cifar_smoke.json").read_text())
    run_script(tmp_path, "--models", "resnet-20", "--seeds", "0", "--fresh")
    second = json.loads((tmp_path / "cifar_smoke.json").read_text())
    walls = [[r["per_seed"][0]["wall_seconds"] for r in rows if r["source"] == "measured"] for rows in (first, second)]
    assert len(walls[0]) == 7 and all(a != b for a, b in zip(*walls))


def test_methods_and_merge_split_a_table_over_processes(cifar_smoke, tmp_path):
    """--methods makes only the rows named (and the dense one); --merge puts tables made in other
    folders together, the merged rows replacing those of the same model, method and seed."""
    import shutil
    whole = json.loads((cifar_smoke / "cifar_smoke.json").read_text())
    main, side = tmp_path / "main", tmp_path / "side"
    for folder in (main, side):
        shutil.copytree(cifar_smoke / "cifar_cache", folder / "cifar_cache")
    run_script(main, "--models", "resnet-20", "--seeds", "0", "--methods", "paper")
    run_script(side, "--models", "resnet-20", "--seeds", "0", "--methods", "mackay", "magnitude")

    def methods(folder):
        rows = json.loads((folder / "cifar_smoke.json").read_text())
        return {r["method"]: r for r in rows if r["source"] == "measured"}
    assert set(methods(main)) == {"dense", "paper"}
    assert set(methods(side)) == {"dense", "mackay", "magnitude (global L1)"}
    run_script(main, "--merge", str(side / "cifar_smoke.json"))
    merged = methods(main)
    assert set(merged) == {"dense", "paper", "mackay", "magnitude (global L1)"}
    reference = {r["method"]: r for r in whole if r["source"] == "measured" and r["architecture"] == "resnet-20"}
    for method, row in merged.items():   # the split run makes the rows the whole run made
        for field in ("test_error", "kept", "conv_macs", "conv_channels"):
            assert row["per_seed"][0][field] == reference[method]["per_seed"][0][field], (method, field)
    assert len(merged["dense"]["per_seed"]) == 1        # replaced, not doubled
    assert "rows merged from runs split over processes" in (main / "cifar_smoke.md").read_text()


def test_magnitude_alone_needs_the_mackay_row(tmp_path):
    result = subprocess.run([sys.executable, SCRIPT, "--smoke", "--out", str(tmp_path), "--models", "resnet-20",
                             "--seeds", "0", "--methods", "magnitude (global L1)", "--quiet"],
                            capture_output=True, text=True)
    assert result.returncode != 0 and "add mackay to --methods" in result.stderr
    result = subprocess.run([sys.executable, SCRIPT, "--smoke", "--out", str(tmp_path), "--models", "resnet-20",
                             "--seeds", "0", "--methods", "magnitude-weight", "--quiet"],
                            capture_output=True, text=True)
    assert result.returncode != 0 and "add weight to --methods" in result.stderr


def test_merge_of_a_missing_file_is_named(tmp_path):
    result = subprocess.run([sys.executable, SCRIPT, "--smoke", "--out", str(tmp_path), "--merge",
                             str(tmp_path / "nowhere.json")], capture_output=True, text=True)
    assert result.returncode == 2 and "nowhere.json: no such file" in result.stderr
