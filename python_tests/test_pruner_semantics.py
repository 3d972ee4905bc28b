"""What an update does, predictably (issue 15 items 2-4): a stable prior with any optimizer, NaN
surfaced, a warm-up first update, no pruning without training in between, no empty layer."""
import math
import re
import warnings

import pytest
import torch
from conftest import pruner_step, train_steps
from torch import nn

import mackay_ext
from mackay_ext import MacKayAdam, MacKayPruner, NonFiniteError, ard_param_groups
from mackay_ext.train import FitConfig, Trainer


def digits_as_mnist():
    """scikit-learn's digits, upsampled to MNIST's 28 x 28 and flattened (LeNet-300-100 input)."""
    data = mackay_ext.data.load("digits", seed=0)
    images = data.x_train.reshape(-1, 1, 8, 8)
    x = nn.functional.interpolate(images, size=(28, 28), mode="bilinear", align_corners=False)
    return x.flatten(1), data.y_train


def sgd_steps(model, optimizer, x, y, steps, pruner=None, update_every=None, batch=64):
    losses = []
    for step in range(steps):
        index = torch.arange(step * batch, (step + 1) * batch) % len(x)
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(x[index]), y[index])
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        if update_every and (step + 1) % update_every == 0:
            pruner.update()
    return losses


def test_sgd_momentum_is_stable_and_prunes():
    """torch.optim.SGD(momentum=0.9) on LeNet-300-100, 200 steps, an update every 50: finite
    losses and pruning (with the prior in the gradient the loss was NaN after one update: alpha
    reached 1e14, and SGD diverges once lr * alpha / N > 2)."""
    torch.manual_seed(0)
    model = mackay_ext.models.create("lenet-300-100")
    x, y = digits_as_mnist()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    pruner = MacKayPruner(model, optimizer, num_data=len(x), batch_size=64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        sgd_steps(model, optimizer, x, y, 200)              # pretraining: the prior is off
        losses = sgd_steps(model, optimizer, x, y, 200, pruner, update_every=50)
    assert all(math.isfinite(v) for v in losses)
    report = pruner.report()
    assert len(pruner.history) == 4 and 0 < report["kept"] < report["total"]  # pruning happened
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_proximal_step_contracts_any_alpha():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    pruner = MacKayPruner(model, optimizer, num_data=10, batch_size=2)
    pruner.alpha("0").fill_(1e30)                       # lr * alpha / N = 5e28
    before = model[0].weight.detach().clone()
    model(torch.randn(2, 5)).sum().backward()
    grad = model[0].weight.grad.clone()
    optimizer.step()
    # SGD's step, then w / (1 + s alpha / N) with s = lr / (1 - momentum)
    expected = (before - 0.5 * grad) / (1 + 0.5 / 0.1 * 1e30 / 10)
    torch.testing.assert_close(model[0].weight.detach(), expected, rtol=1e-6, atol=0)
    assert torch.isfinite(model[0].weight).all()


def test_nan_gradient_surfaces_in_update():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    optimizer = MacKayAdam(ard_param_groups(model), lr=1e-3, num_data=100, batch_size=4)
    pruner = MacKayPruner(model, optimizer, num_data=100)
    nn.functional.cross_entropy(model(torch.randn(4, 6)), torch.tensor([0, 1, 2, 0])).backward()
    model[0].weight.grad[0, 0] = float("nan")           # one NaN entry ...
    optimizer.step()
    alpha_before = pruner.alpha("2").clone()
    with pytest.raises(NonFiniteError, match=r"non-finite values in 0 \(weight\)"):
        pruner.update()                                 # ... is never reported as "kept"
    assert torch.equal(pruner.alpha("2"), alpha_before)  # nothing changed, no layer half-updated
    pruner.detach()
    skipping = MacKayPruner(model, optimizer, num_data=100, on_nonfinite="skip")
    with pytest.warns(RuntimeWarning, match="non-finite"):
        report = skipping.update()
    assert report["skipped"] and report["nonfinite"] == ["0 (weight)", "0 (curvature)"]
    assert skipping.history[-1]["skipped"]


def test_trainer_stops_on_nonfinite_loss_and_keeps_last_checkpoint(tmp_path):
    data = mackay_ext.data.load("digits", seed=0)
    model = mackay_ext.models.create("digits-mlp")
    checkpoint = str(tmp_path / "checkpoint.pt")
    config = FitConfig(pretrain_epochs=3, rounds=1, epochs=1, backend="torch")
    trainer = Trainer(model, data, config, checkpoint=checkpoint)
    calls = {"n": 0}
    forward = model.forward
    batches = -(-len(data.x_train) // config.batch_size)

    def poisoned(x):                                    # NaN from the 2nd epoch's 3rd batch on
        calls["n"] += model.training
        out = forward(x)
        return out * float("nan") if calls["n"] > batches + 2 else out
    model.forward = poisoned
    with pytest.raises(NonFiniteError, match=r"training loss is nan \(pretraining, epoch 2, batch 3\)"):
        trainer.run()
    saved = torch.load(checkpoint, weights_only=True)
    assert saved["position"]["epoch"] == 1                # the last good epoch's checkpoint
    assert all(torch.isfinite(v).all() for v in saved["model"].values())


def trained_pruner(granularity="weight", steps=30, **options):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 4))
    optimizer = MacKayAdam(ard_param_groups(model), lr=1e-2, num_data=256, batch_size=32)
    pruner = MacKayPruner(model, optimizer, num_data=256, granularity=granularity, **options)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(256, 20, generator=g)
    y = (x[:, :4]).argmax(1)                             # only 4 inputs matter

    def train(n):
        for step in range(n):
            index = torch.arange(step * 32, (step + 1) * 32) % 256
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x[index]), y[index]).backward()
            optimizer.step()
    train(steps)
    return model, optimizer, pruner, train


def test_first_update_is_a_warmup_and_back_to_back_updates_do_not_prune():
    model, optimizer, pruner, train = trained_pruner("input", steps=100, threshold=0.5)
    first = pruner.update()
    assert all(layer["warmup"] for layer in first["layers"]) and first["kept"] == first["total"]
    with pytest.warns(RuntimeWarning, match="no optimizer step since the previous update"):
        second = pruner.update()
    assert second["kept"] == second["total"] and "nothing pruned" in second["notes"][0]
    train(200)
    third = pruner.update()
    assert not any(layer["warmup"] for layer in third["layers"])
    assert third["kept"] < third["total"]                # pruning starts after training


def test_paper_schedule_with_one_round_prunes():
    data = mackay_ext.data.load("digits", seed=0)
    model = mackay_ext.models.create("digits-mlp")
    trainer = mackay_ext.train.fit(model, data, FitConfig(pretrain_epochs=5, rounds=1, epochs=5,
                                                          backend="torch"))
    assert len(trainer.pruner.history) == 2               # the warm-up, then one pruning round
    assert trainer.pruner.report()["kept"] < trainer.pruner.report()["total"]
    # fit leaves no hook behind: a second fit on the same model starts from the pruned weights
    assert mackay_ext.attached_pruners(model) == []
    kept = trainer.pruner.report()["kept"]
    again = mackay_ext.train.fit(model, data, FitConfig(pretrain_epochs=0, rounds=1, epochs=2, backend="torch"))
    assert again.pruner.report()["kept"] <= kept


@pytest.mark.parametrize("allow", [False, True])
def test_a_layer_never_loses_every_group_unless_allowed(allow):
    model, optimizer, pruner, train = trained_pruner("output", allow_empty_layers=allow)
    pruner.update()                                      # warm-up
    train(5)
    # nothing determined: all prunable (a curvature of exactly 0 would mark a layer no data reached)
    optimizer.ard_state(model[2].weight)["curvature"].fill_(1e-30)
    strongest = int(model[2].weight.detach().square().sum(1).argmax())
    before = model[2].weight.detach().clone()
    if allow:
        report = pruner.update()
        assert report["layers"][1]["groups_kept"] == 0 and (model[2].weight == 0).all()
        return
    with pytest.warns(RuntimeWarning, match=r"every group of 2 .* strongest group is kept"):
        report = pruner.update()
    layer = report["layers"][1]
    assert layer["groups_kept"] == 1 and layer["kept_strongest"]
    assert torch.equal(model[2].weight[strongest], before[strongest])
    assert math.isfinite(float(pruner.alpha("2")[strongest]))
    assert (model[2].weight[torch.arange(4) != strongest] == 0).all()
    # the layer stays at its strongest group: later updates report it, and warn no more (every
    # update warned again, "pruned 0.0% ... would have emptied 1 layer", burying a real collapse)
    train(5)
    optimizer.ard_state(model[2].weight)["curvature"].fill_(1e-30)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = pruner.update()
    assert report["layers"][1]["kept_strongest"] and report["layers"][1]["groups_kept"] == 1


@pytest.mark.parametrize("norm", [True, False])
def test_a_collapse_of_a_batchnorm_network_pruned_per_weight_names_the_norms(norm):
    """Per-weight ARD on a Conv1d net with BatchNorm kept 1 of 2,560 weights of a conv before a
    norm, and the warning's way out (channel_prior='norm-scale') reads as if it applied to
    granularity='channel' only: it now says why the norms matter per weight too."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(1, 8, 3), *([nn.BatchNorm1d(8)] if norm else []), nn.ReLU(),
                          nn.Flatten(), nn.Linear(8 * 10, 3))
    optimizer = MacKayAdam(ard_param_groups(model), lr=1e-2, num_data=64, batch_size=16)
    pruner = MacKayPruner(model, optimizer, num_data=64)
    x, y = torch.randn(16, 1, 12), torch.arange(16) % 3

    def step():
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    step()
    pruner.update()   # the warm-up: alpha from the curvature
    step()
    for layer in (model[0], model[-1]):   # nothing determined: every weight prunable
        optimizer.ard_state(layer.weight)["curvature"].fill_(1e-30)
    with pytest.warns(RuntimeWarning, match="this update pruned") as caught:
        pruner.update()
    said = " ".join(str(w.message) for w in caught)
    assert ("This network has normalisation layers (BatchNorm, InstanceNorm or GroupNorm): the weights of a "
            "layer before one are scale-free" in said) == norm


def test_resumed_pruner_knows_it_was_trained():
    model, optimizer, pruner, train = trained_pruner(threshold=0.5)
    pruner.update()
    train(100)
    state = pruner.state_dict()
    pruner.detach()
    fresh = MacKayPruner(model, optimizer, num_data=256, threshold=0.5)
    fresh.load_state_dict(state)
    report = fresh.update()                               # as the uninterrupted pruner would
    assert report["kept"] < report["total"] and not report["notes"]


@pytest.mark.parametrize("value", [0, -3, float("nan"), float("inf"), True, "100", torch.ones(2)])
def test_num_data_rejects(value):
    model = nn.Sequential(nn.Linear(3, 2))
    with pytest.raises((ValueError, TypeError), match="num_data"):
        MacKayPruner(model, torch.optim.SGD(model.parameters(), lr=0.1), num_data=value, batch_size=2)
    with pytest.raises((ValueError, TypeError), match="num_data"):
        MacKayAdam(model.parameters(), num_data=value)


def test_num_data_accepts_numpy_and_tensor_counts():
    numpy = pytest.importorskip("numpy")
    model = nn.Sequential(nn.Linear(3, 2))
    for value in (numpy.int64(5000), numpy.float32(5000.0), torch.tensor(5000)):
        pruner = MacKayPruner(model, torch.optim.SGD(model.parameters(), lr=0.1), num_data=value,
                              batch_size=numpy.int32(32))
        assert pruner.num_data == 5000.0 and pruner.batch_size == 32.0
        pruner.detach()
        assert MacKayAdam(model.parameters(), num_data=value).param_groups[0]["num_data"] == 5000.0


@pytest.mark.parametrize("granularity", ["output", "channel"])
def test_em_rule_starts_where_an_input_is_always_zero(granularity):
    """An always-zero input (MNIST's border pixels) has h = 0: em from alpha = 0 gave those
    groups an infinite Sigma_ii, alpha stayed 0 and the layer was in warm-up for ever."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    optimizer = MacKayAdam(ard_param_groups(model), lr=1e-2, num_data=200, batch_size=20)
    extra = {"example_inputs": (torch.randn(2, 6),)} if granularity == "channel" else {}
    pruner = MacKayPruner(model, optimizer, num_data=200, rule="em", granularity=granularity, **extra)
    x, y = torch.randn(20, 6), torch.randint(0, 3, (20,))
    x[:, 0] = 0.0                                         # input 0 never fires
    reports = []
    for _ in range(3):
        for _ in range(10):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
        reports.append(pruner.update())
    first = reports[0]["layers"][0]
    assert first["warmup"] and not reports[1]["layers"][0]["warmup"]
    alpha = pruner.channel.alpha if granularity == "channel" else pruner.alpha("0")
    assert bool((alpha > 0).all())                        # every group has a prior now
    assert reports[-1]["kept"] > 0.5 * reports[-1]["total"]   # and the data still hold most of them


def test_proximal_step_of_float64_weights_is_formed_in_float64():
    """alpha is stored in float32; the factor 1 / (1 + s alpha / N) on a float64 weight is
    formed in float64 (it was rounded to float32: 7e-8 off)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4)).double()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    pruner = MacKayPruner(model, optimizer, num_data=50, batch_size=10)
    pruner.alpha("0").fill_(1.2345678)
    before = model[0].weight.detach().clone()
    model(torch.randn(10, 5, dtype=torch.float64)).sum().backward()
    grad = model[0].weight.grad.clone()
    optimizer.step()
    alpha = pruner.alpha("0").double()   # the float32 value, exactly
    expected = (before - 0.1 * grad) / (1 + 0.1 * alpha / 50)
    torch.testing.assert_close(model[0].weight.detach(), expected, rtol=1e-14, atol=0)


class _IdleHead(nn.Module):
    """A second head forward does not use yet (used from `use_head2 = True` on)."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.head2 = nn.Linear(12, 24), nn.Linear(24, 3), nn.Linear(24, 3)
        self.use_head2 = False

    def forward(self, x):
        h = torch.relu(self.a(x))
        return self.b(h) + (self.head2(h) if self.use_head2 else 0)


@pytest.mark.parametrize("optimizer_kind", ["mackay", "adam"])
@pytest.mark.parametrize("curvature", ["ef-batch", "ef-exact"])
def test_a_layer_no_data_reached_is_left_as_it_is_and_said_once(optimizer_kind, curvature):
    """An idle head got a prior, was pruned to its strongest weight (destroying its
    initialisation) and warned about as 'the network would no longer depend on its input'."""
    torch.manual_seed(0)
    model = _IdleHead()
    initial = model.head2.weight.detach().clone()
    optimizer = (MacKayAdam(ard_param_groups(model), lr=1e-2, num_data=256, batch_size=16)
                 if optimizer_kind == "mackay" else torch.optim.Adam(model.parameters(), lr=1e-2))
    pruner = MacKayPruner(model, optimizer, num_data=256, threshold=0.5, curvature=curvature,
                          **({} if optimizer_kind == "mackay" else {"batch_size": 16}))

    def train(steps):
        for _ in range(steps):
            x = torch.randn(16, 12)
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), (x[:, 0] > 0).long() + (x[:, 1] > 0).long()).backward()
            optimizer.step()

    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        for _ in range(3):
            train(30)
            report = pruner.update()
    about_head2 = [w for w in said if "head2" in str(w.message)]
    assert len(about_head2) == 1 and "no data has reached it" in str(about_head2[0].message)
    layers = {layer["name"]: layer for layer in report["layers"]}
    assert layers["head2"]["without_data"] and layers["head2"]["kept"] == layers["head2"]["total"]
    assert torch.equal(model.head2.weight.detach(), initial) and not bool(pruner.alpha("head2").any())
    assert any(note.startswith("head2: no data has reached it") for note in report["notes"])
    assert layers["a"]["kept"] < layers["a"]["total"]   # the layers data reached are pruned as before
    model.use_head2 = True   # from now on the head sees data: it is updated like any layer
    train(30)
    report = pruner.update()
    assert "without_data" not in {layer["name"]: layer for layer in report["layers"]}["head2"]
    assert bool(pruner.alpha("head2").any())
    # a continual learner's second task leaves the first task's head (b) untouched: its alphas
    # and weights stay (ef-batch's h still held the first task's, and pruned on)
    alpha_b, weight_b = pruner.alpha("b").clone(), model.b.weight.detach().clone()
    for _ in range(30):
        x = torch.randn(16, 12)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model.head2(torch.relu(model.a(x))), (x[:, 2] > 0).long()).backward()
        optimizer.step()
    report = pruner.update()
    assert {layer["name"]: layer for layer in report["layers"]}["b"].get("without_data")
    assert torch.equal(pruner.alpha("b"), alpha_b) and torch.equal(model.b.weight.detach(), weight_b)


def test_emptying_a_bare_parameter_is_not_worded_as_a_layer_losing_its_input():
    """A learned positional table (an nn.Parameter of a module, not a layer's weight) about to lose
    every entry was said to leave 'the network no longer depending on its input there'."""
    class Positional(nn.Module):
        def __init__(self):
            super().__init__()
            self.pos = nn.Parameter(torch.randn(1, 6, 4))
            self.head = nn.Linear(4, 3)

        def forward(self, x):
            return self.head((x + self.pos).mean(1))

    torch.manual_seed(0)
    model = Positional()
    optimizer = MacKayAdam(ard_param_groups(model), lr=1e-2, num_data=100, batch_size=8)
    # (a (1, ...) table is left out as a bias unless named: test_position_embeddings_...)
    pruner = MacKayPruner(model, optimizer, num_data=100, layers=["pos", "head"])
    x, y = torch.randn(8, 6, 4), torch.randint(0, 3, (8,))
    for _ in range(3):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    pruner.update()                                      # warm-up
    optimizer.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()
    optimizer.ard_state(model.pos)["curvature"].fill_(1e-30)   # nothing determined: all prunable
    with pytest.warns(RuntimeWarning, match=r"every group of pos .*\(none of it would be left\)") as caught:
        pruner.update()
    assert not any("no longer depend" in str(w.message) and "pos" in str(w.message) for w in caught)


def test_another_optimizer_stepping_the_weights_leaves_pruned_ones_at_zero():
    """After MacKayAdam's ARD phase a new user fine-tuned with a fresh torch SGD: nothing held the
    pruned weights (MacKayAdam's step did), 1,576 of them grew back, and report() still counted
    them pruned. Any optimizer's step of the pruner's weights now re-zeroes them, and update()
    says that the curvature was not read there."""
    model, optimizer, pruner, train = trained_pruner(threshold=0.5)
    pruner.update()
    train(30)
    pruner.update()
    pruned = {name: pruner.alpha(name) == math.inf for name in pruner.targets}
    assert any(bool(mask.any()) for mask in pruned.values())
    pruner.switch_off_prior()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = torch.randn(64, 20), torch.randint(0, 4, (64,))
    for _ in range(5):
        sgd.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        sgd.step()
    for name, mask in pruned.items():
        assert (pruner.weight(name)[mask.expand_as(pruner.weight(name))] == 0).all()
    nonzero = sum(int(pruner.weight(name).count_nonzero()) for name in pruner.targets)
    assert pruner.report()["kept"] >= nonzero
    with pytest.warns(RuntimeWarning, match=r"another optimizer stepped its weights \(SGD 5 step\(s\)\).*"
                                            r"detach\(\) this pruner and build a new one"):
        pruner.update()
    unrelated = torch.optim.SGD([nn.Parameter(torch.ones(3))], lr=0.1)   # holds none of its weights
    unrelated.zero_grad()
    unrelated.param_groups[0]["params"][0].sum().backward()
    unrelated.step()
    assert pruner.foreign_steps == {}


def test_a_new_optimizer_stepping_under_the_prior_is_said_at_its_first_step():
    """A notebook user re-ran the optimizer cell to change the lr (a second MacKayAdam on the
    same model, the pruner on the first): three epochs trained without the prior, told only at
    the next update. Said at the first such step, once; not after switch_off_prior() (the
    fine-tune recipe above)."""
    model, optimizer, pruner, train = trained_pruner()
    pruner.update()
    second = MacKayAdam(ard_param_groups(model), lr=1e-3, num_data=pruner.num_data, batch_size=64)
    x, y = torch.randn(64, 20), torch.randint(0, 4, (64,))

    def step():
        second.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        second.step()
    with pytest.warns(RuntimeWarning, match=r"MacKayAdam.step\(\) moved weights whose prior this pruner applies "
                                            r"through the optimizer it was built with") as caught:
        step()
    assert caught[0].filename == __file__
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        step()
    model, optimizer, pruner, train = trained_pruner()
    pruner.update()
    pruner.switch_off_prior()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sgd.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        sgd.step()


def test_an_update_before_any_training_step_says_alpha_comes_from_the_weights_alone():
    """update() at the top of the first epoch (before any step) set alpha from the random
    initial weights (gamma = 1 everywhere) without a word, and the next update pruned against
    that data-free prior (424 of 4,224 weights kept where 1,682 otherwise). From a pretrained
    network that is the paper's warm-up, so it is said, not refused; after a step it is not."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 4))
    optimizer = MacKayAdam(ard_param_groups(model), lr=1e-2, num_data=256, batch_size=32)
    pruner = MacKayPruner(model, optimizer, num_data=256)
    with pytest.warns(RuntimeWarning, match=r"no curvature yet \(no training step since the pruner was built\): "
                                            r"alpha is set from the weights alone"):
        report = pruner.update()
    assert all(layer["warmup"] for layer in report["layers"]) and report["kept"] == report["total"]
    weight = model[0].weight.detach()
    assert torch.allclose(pruner.alpha("0"), 1 / weight.double().square().float(), rtol=1e-5)
    x, y = torch.randn(32, 20), torch.randint(0, 4, (32,))
    optimizer.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        pruner.update()


def test_lbfgs_is_refused_with_the_reason():
    model = nn.Linear(4, 2)
    with pytest.raises(ValueError, match=r"torch.optim.LBFGS is not supported: its step runs a line search"):
        MacKayPruner(model, torch.optim.LBFGS(model.parameters()), num_data=10, batch_size=2)


def test_recurrent_cells_take_group_granularities_and_a_fallback_is_said_when_built():
    """GRUCell / LSTMCell / RNNCell fell back to one alpha per weight under 'input' (nn.GRU got
    one per input), said only in the update's notes; a layer a granularity does not apply to is
    now named in a warning when the pruner is built."""
    model = nn.ModuleDict({"cell": nn.LSTMCell(5, 6), "rnn": nn.GRU(5, 6), "pair": nn.Bilinear(3, 3, 2)})
    optimizer = MacKayAdam(ard_param_groups(model), lr=1e-2, num_data=64, batch_size=8)
    with pytest.warns(UserWarning, match=r"granularity='input' does not apply to pair, which get one alpha per weight"):
        pruner = MacKayPruner(model, optimizer, num_data=64, granularity="input")
    assert tuple(pruner.alpha("cell.weight_ih").shape) == (1, 5) == tuple(pruner.alpha("rnn.weight_ih_l0").shape)
    assert tuple(pruner.alpha("cell.weight_hh").shape) == (1, 6)
    assert tuple(pruner.alpha("pair").shape) == (2, 3, 3)


def test_lazy_layers_are_named_and_attention_key_biases_are_left_out_with_the_reason():
    """A lazy layer before its first forward gave torch's "Can't access the shape of an
    uninitialized parameter", naming no layer; nn.MultiheadAttention's bias_k / bias_v (shape
    (1, 1, E)) got a prior, though a zeroed one still takes part in the softmax."""
    lazy = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.LazyLinear(3))
    with pytest.raises(ValueError, match=r"ard_param_groups: 2.weight, 2.bias not initialised yet .* run one batch"):
        ard_param_groups(lazy)
    with pytest.raises(ValueError, match=r"MacKayPruner: 2.weight, 2.bias not initialised yet"):
        MacKayPruner(lazy, torch.optim.SGD(lazy[0].parameters(), lr=0.1), num_data=64, batch_size=8)
    attention = nn.MultiheadAttention(8, 2, add_bias_kv=True)
    optimizer = MacKayAdam(ard_param_groups(attention), lr=1e-2, num_data=64, batch_size=8)
    pruner = MacKayPruner(attention, optimizer, num_data=64)
    excluded = {entry["name"]: entry["reason"] for entry in pruner.report()["excluded"]}
    assert "bias_k" not in pruner.targets and "bias_v" not in pruner.targets
    assert "still take part in the softmax" in excluded["bias_k"] and "bias_v" in excluded


class _TokensWithPositions(nn.Module):
    """A ViT's stem as timm writes it: a class token and position embeddings, (1, ...) parameters
    of the model itself, added to the patch tokens."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(6, 8)
        self.cls_token = nn.Parameter(torch.randn(1, 1, 8))
        self.pos_embed = nn.Parameter(torch.randn(1, 5, 8))
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        tokens = torch.cat([self.cls_token.expand(len(x), -1, -1), self.proj(x)], 1) + self.pos_embed
        return self.head(tokens[:, 0])


def test_position_embeddings_and_class_tokens_are_left_out_as_biases():
    """Broadcast over the batch and added to the activations, they are biases (zeros there save no
    work); a prior on them emptied them in a timm ViT. Named in layers=, they get one."""
    model = _TokensWithPositions()
    pruner = MacKayPruner(model, torch.optim.AdamW(model.parameters()), num_data=64, batch_size=8)
    excluded = {entry["name"]: entry["reason"] for entry in pruner.report()["excluded"]}
    assert set(pruner.targets) == {"proj", "head"}
    assert "a (1, 5, 8) parameter of a _TokensWithPositions, shaped as a position embedding" in excluded["pos_embed"]
    assert "no prior unless named in layers=" in excluded["cls_token"]
    pruner.detach()
    named = MacKayPruner(model, torch.optim.AdamW(model.parameters()), num_data=64, batch_size=8,
                         layers=["pos_embed", "head"])
    assert set(named.targets) == {"pos_embed", "head"}
    # a convolution with one output channel, (1, C, k, k), is a layer's weight: it keeps its prior
    conv = nn.Sequential(nn.Conv2d(3, 1, 3), nn.Flatten())
    assert "0" in MacKayPruner(conv, torch.optim.SGD(conv.parameters(), lr=0.1), num_data=64, batch_size=8).targets


@pytest.mark.parametrize("wrap", ["compile", "ddp-like"])
def test_a_state_saved_under_a_wrapper_names_the_prefix_on_load(wrap):
    """A pruner built on torch.compile(model) (or DDP(model)) names its layers '_orig_mod.0'
    ('module.0'); loading its state into one on the bare model says so, not just a KeyError."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    if wrap == "compile":
        wrapped = torch.compile(model, backend="eager")   # (never called: nothing compiles)
    else:
        wrapped = torch.nn.Module()
        wrapped.module = model
    saved = MacKayPruner(wrapped, torch.optim.Adam(model.parameters()), num_data=10, batch_size=2)
    state = saved.state_dict()
    saved.detach()
    pruner = MacKayPruner(model, torch.optim.Adam(model.parameters()), num_data=10, batch_size=2)
    prefix = "_orig_mod." if wrap == "compile" else "module."
    with pytest.raises(KeyError, match=rf"no alpha for layers \['0', '2'\] \(the state holds {prefix}0, {prefix}2: "
                                       r"the same layers under a wrapper's prefix.*on the unwrapped model"):
        pruner.load_state_dict(state)


def test_a_state_of_another_model_and_an_optimizer_of_another_model_are_named():
    """A new user's mistakes: a pruner state from another architecture (it said only which
    layers lacked an alpha), an optimizer built for another model (it listed every weight as 'not
    trained by the optimizer'), and the model and optimizer swapped (the optimizer's repr, many
    lines, in the message)."""
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    other = torch.nn.ModuleDict({"emb": torch.nn.Embedding(7, 3), "head": torch.nn.Linear(6, 2)})
    state = MacKayPruner(other, torch.optim.Adam(other.parameters()), num_data=10, batch_size=2).state_dict()
    pruner = MacKayPruner(mlp, torch.optim.Adam(mlp.parameters()), num_data=10, batch_size=2)
    with pytest.raises(KeyError, match=r"no alpha for layers \['0', '2'\] \(the state's layers are emb, head: "
                                       r"a state from another model\?\)"):
        pruner.load_state_dict(state)
    with pytest.raises(ValueError, match=r"the optimizer trains none of this model's weights: was it built for "
                                         r"another model, or for a copy of this one"):
        MacKayPruner(mlp, torch.optim.Adam(other.parameters()), num_data=10, batch_size=2)
    with pytest.raises(TypeError, match=r"model must be a torch.nn.Module, got Adam Adam \( Parameter Group 0"):
        MacKayPruner(torch.optim.Adam(mlp.parameters()), mlp, num_data=10, batch_size=2)


@pytest.mark.parametrize("optimizer_kind", ["adam", "sgd"])
def test_a_layer_frozen_mid_run_is_left_alone_and_a_layer_added_later_is_named(optimizer_kind):
    """A new user froze a layer mid-run under a torch optimizer: the prior's proximal step went on
    shrinking its weights (SGD: median 41% in 50 steps) and the next update pruned them, with no
    word. And a layer added with add_param_group trained without a prior, in no list."""
    import torch.nn.functional as F
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    optimizer = (torch.optim.Adam(model.parameters(), lr=1e-2) if optimizer_kind == "adam"
                 else torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    pruner = MacKayPruner(model, optimizer, num_data=64, batch_size=16)
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))

    def steps(count):
        for _ in range(count):
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()

    steps(20)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner.update()
        steps(20)
        pruner.update()
    model[2].weight.requires_grad_(False)
    frozen = model[2].weight.detach().clone()
    steps(20)
    assert torch.equal(model[2].weight, frozen)
    with pytest.warns(RuntimeWarning, match=r"its requires_grad is False now \(frozen after the pruner was built\)"):
        report = pruner.update()
    assert torch.equal(model[2].weight, frozen)
    assert any(note.startswith("2: its requires_grad is False now") for note in report["notes"])
    extra = torch.nn.Linear(3, 3)
    model.append(extra)
    optimizer.add_param_group({"params": [extra.weight]})
    with pytest.warns(UserWarning, match=r"3.weight is trained by the optimizer, but added after the pruner was built"):
        excluded = pruner.report()["excluded"]
    assert {"name": "3.weight", "reason": mackay_ext.pruner.ADDED_LATER} in excluded


def test_layers_left_out_by_choice_are_not_said_to_be_added_later():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    optimizer = torch.optim.Adam(model.parameters())
    pruner = MacKayPruner(model, optimizer, num_data=64, batch_size=16, layers=["0"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        excluded = pruner.report()["excluded"]
    assert not any("added after" in entry["reason"] for entry in excluded)


class BagOfWords(nn.Module):
    def __init__(self, sparse: bool):
        super().__init__()
        self.embedding = nn.Embedding(50, 8, sparse=sparse)
        self.head = nn.Linear(8, 3)

    def forward(self, tokens):
        return self.head(self.embedding(tokens).mean(1))


def updates_warnings(pruner, model, optimizers, tokens, labels):
    """The messages of the warnings two updates give after a few steps of every optimizer."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            for _ in range(3):
                for optimizer in optimizers:
                    optimizer.zero_grad()
                nn.functional.cross_entropy(model(tokens), labels).backward()
                for optimizer in optimizers:
                    optimizer.step()
            pruner.update()
    return [str(w.message) for w in caught if "in neither the optimizer" in str(w.message)]


@pytest.mark.parametrize("sparse", [True, False])
def test_weights_trained_by_another_optimizer_without_a_pruner_are_said_once(sparse):
    """A new user's SparseAdam embedding beside Adam for the rest: the embedding was listed in
    report()["excluded"] only, never pruned, with no word. Said once, at the first update (a
    second pruner for the second optimizer may come after the first is built)."""
    torch.manual_seed(0)
    model = BagOfWords(sparse)
    tokens, labels = torch.randint(0, 50, (8, 5)), torch.randint(0, 3, (8,))
    embedding_optimizer = (torch.optim.SparseAdam if sparse else torch.optim.Adam)([model.embedding.weight])
    head_optimizer = torch.optim.Adam(model.head.parameters())
    pruner = MacKayPruner(model, head_optimizer, num_data=64, batch_size=8)
    said = updates_warnings(pruner, model, [embedding_optimizer, head_optimizer], tokens, labels)
    assert len(said) == 1 and said[0].startswith("MacKayPruner.update: embedding.weight takes gradients")
    assert ("SparseAdam" in said[0]) == sparse
    if sparse:
        return
    pruner.detach()   # a pruner for each optimizer: nothing to say
    model = BagOfWords(sparse)
    embedding_optimizer = torch.optim.Adam([model.embedding.weight])
    head_optimizer = torch.optim.Adam(model.head.parameters())
    head_pruner = MacKayPruner(model, head_optimizer, num_data=64, batch_size=8)
    embedding_pruner = MacKayPruner(model, embedding_optimizer, num_data=64, batch_size=8)
    assert updates_warnings(head_pruner, model, [embedding_optimizer, head_optimizer], tokens, labels) == []
    assert list(embedding_pruner.targets) == ["embedding"]


class Distilled(nn.Module):
    """A student trained under a teacher run without gradients, with an EMA copy of the student."""

    def __init__(self):
        super().__init__()
        self.student = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
        self.teacher = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
        self.ema = torch.optim.swa_utils.AveragedModel(self.student)

    def forward(self, x):
        with torch.no_grad():
            target = self.teacher(x).softmax(-1)
        return self.student(x), target


def test_weights_no_backward_reaches_are_not_said_uncovered():
    """A teacher run under no_grad and an EMA copy (AveragedModel) require gradients but take none:
    they were said to be trained by another optimizer without a pruner."""
    torch.manual_seed(0)
    model = Distilled()
    optimizer = torch.optim.Adam(model.student.parameters())
    pruner = MacKayPruner(model, optimizer, num_data=64, batch_size=8)
    x = torch.randn(8, 6)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            for _ in range(3):
                optimizer.zero_grad()
                logits, target = model(x)
                nn.functional.cross_entropy(logits, target).backward()
                optimizer.step()
                model.ema.update_parameters(model.student)
            pruner.update()
    assert not [w for w in caught if "in neither the optimizer" in str(w.message)]
    assert sorted(pruner.targets) == ["student.0", "student.2"]


def test_an_optimizer_state_loaded_with_another_num_data_is_said_and_refused_until_they_agree():
    """optimizer.load_state_dict takes the saved param groups' settings: a new user's MacKayAdam,
    loaded from a run on 5,000 examples after the pruner (num_data=100) was built, applied the
    prior with N = 5,000 while the pruner re-estimated alpha with 100, with no word."""
    def build(num_data):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
        return model, MacKayAdam(ard_param_groups(model), lr=1e-2, num_data=num_data, batch_size=16)
    saved_model, saved_optimizer = build(5000)
    saved_model(torch.randn(16, 8)).sum().backward()
    saved_optimizer.step()
    model, optimizer = build(100)
    pruner = MacKayPruner(model, optimizer, num_data=100)
    with pytest.warns(RuntimeWarning, match=r"num_data=100, but MacKayAdam's param group 0 now applies the prior "
                                            r"with num_data=5000") as caught:
        optimizer.load_state_dict(saved_optimizer.state_dict())
    assert caught[0].filename == __file__   # the user's line, not torch's wrapper
    x, y = torch.randn(16, 8), torch.randint(0, 3, (16,))
    for _ in range(3):
        pruner_step(pruner, model, optimizer, x, y)
    with pytest.raises(ValueError, match=r"update: .*optimizer.param_groups\[0\]\['num_data'\] = 100 after loading"):
        pruner.update()
    for group in optimizer.param_groups:
        group["num_data"] = 100
    pruner.update()
    same, same_optimizer = build(100)
    pruner = MacKayPruner(same, same_optimizer, num_data=100)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        same_optimizer.load_state_dict(optimizer.state_dict())   # the same N: nothing to say


def test_layers_are_named_or_given_as_their_weight_everywhere():
    """A new user's prune_entries("0", ...) pruned nothing and returned 0 (a string is no tensor
    with a prior), and alpha(weight) raised a KeyError printing the whole weight."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    pruner = MacKayPruner(model, torch.optim.Adam(model.parameters()), num_data=100, batch_size=16)
    drop = torch.zeros(16, 8, dtype=torch.bool)
    drop[:, 0] = True
    assert pruner.prune_entries("0", drop) == 16
    assert pruner.prune_entries(model[0].weight, drop) == 0   # pruned already
    assert bool(torch.isinf(pruner.alpha(model[0].weight)[:, 0]).all()) and not bool(model[0].weight[:, 0].any())
    assert pruner.alpha("0.weight") is pruner.alpha(model[0].weight)
    assert pruner.curvature(model[2].weight).shape == (3, 16)
    with pytest.raises(KeyError, match=r"Parameter of shape \(16,\) given is no weight of this pruner's layers \['0', '2'\]"):
        pruner.alpha(model[0].bias)
    with pytest.raises(TypeError, match="param must be a weight .* or a layer's name, got int"):
        pruner.prune_entries(0, drop)
    with pytest.raises(KeyError, match="no layer 'head'"):
        pruner.prune_entries("head", drop)
    assert pruner.prune_entries(model[0].bias, torch.zeros(16, dtype=torch.bool)) == 0   # no prior: as documented


def test_a_layer_pruned_whole_is_not_said_to_be_without_data_and_warnings_name_the_users_line():
    """A layer emptied by prune_entries reads curvature 0 (its gradients are held at 0): it was
    reported as 'no data has reached it'. And update()'s warnings named torch's no_grad wrapper."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    pruner = MacKayPruner(model, optimizer, num_data=100, batch_size=16, allow_empty_layers=True)
    x, y = torch.randn(16, 8), torch.randint(0, 3, (16,))
    for _ in range(5):
        pruner_step(pruner, model, optimizer, x, y)
    pruner.update()
    pruner.prune_entries("2", torch.ones(3, 16, dtype=torch.bool))
    for _ in range(5):
        pruner_step(pruner, model, optimizer, x, y)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = pruner.update()
    layer = next(entry for entry in report["layers"] if entry["name"] == "2")
    assert layer["kept"] == 0 and not layer.get("without_data")
    assert not any("no data has reached" in note for note in report["notes"])
    assert all(w.filename == __file__ for w in caught), [(w.filename, str(w.message)[:60]) for w in caught]


def test_a_batch_size_beyond_the_training_set_is_said():
    """The CLI's --batch-size 100000 on digits trained full-batch without a word."""
    data = mackay_ext.data.load("digits", seed=0)
    with pytest.warns(UserWarning, match=rf"batch_size 100,000 exceeds the training set \({len(data.x_train):,} "
                                         r"examples\): every batch is the whole set"):
        trainer = Trainer(mackay_ext.models.create("digits-mlp"), data, FitConfig(batch_size=100_000, backend="torch"))
    assert trainer.optimizer.param_groups[0]["batch_size"] == len(data.x_train)


def test_an_optimizer_wrapper_s_inner_step_is_its_own():
    """Lookahead (timm's shape) steps its inner AdamW inside its own step: that inner step is the
    pruner's optimizer's, not another optimizer training without the prior."""
    class Lookahead(torch.optim.Optimizer):
        def __init__(self, base):
            self.base = base
            super().__init__(base.param_groups, dict(base.defaults))
            self.param_groups = base.param_groups

        @torch.no_grad()
        def step(self, closure=None):
            return self.base.step(closure)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 16), nn.Tanh(), nn.Linear(16, 4))
    optimizer = Lookahead(torch.optim.AdamW(model.parameters(), lr=3e-3))
    pruner = MacKayPruner(model, optimizer, num_data=256, batch_size=64)
    x, y = torch.randn(64, 20), torch.randint(0, 4, (64,))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for update in range(2):
            for _ in range(5):
                pruner_step(pruner, model, optimizer, x, y)
            pruner.update(prune=update > 0)
    assert pruner.foreign_steps == {}


def test_a_state_loaded_onto_a_replaced_head_is_said_and_fresh_keeps_the_head():
    """A new user replaced a pruned head by a fresh one of the same shape and loaded the old
    pruner's state into the new pruner, as the README says to go on: the old head's mask zeroed 91
    of the new head's 256 weights and its alphas became the new head's prior, with no word."""
    import torch.nn.functional as F

    def build():
        return torch.nn.Sequential(torch.nn.Linear(10, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))

    torch.manual_seed(0)
    model = build()
    x, y = torch.randn(128, 10), torch.randint(0, 4, (128,))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    settings = dict(num_data=128, batch_size=32, prune="alpha", threshold=10.0, curvature="ef-exact")
    pruner = MacKayPruner(model, optimizer, **settings)

    def steps(count):
        train_steps(model, optimizer, x, y, count, batch=32)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        steps(50)
        pruner.update()
        steps(30)
        pruner.update()
        steps(3)
    assert bool((model[0].weight == 0).any()) and bool((model[2].weight == 0).any())
    state, backbone = pruner.state_dict(), model[0].weight.detach().clone()
    pruner.detach()
    model[2] = torch.nn.Linear(32, 4)
    head = model[2].weight.detach().clone()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    pruner = MacKayPruner(model, optimizer, **settings)
    with pytest.warns(RuntimeWarning, match=r"the state pruned weights of 2 \(\d+\) that were not 0 in the model.*"
                                            r"load_state_dict\(state, fresh=\['2'\]\)"):
        pruner.load_state_dict(state)
    assert not torch.equal(model[2].weight, head)   # zeroed at the old mask, as it says
    pruner.detach()
    with torch.no_grad():
        model[2].weight.copy_(head)
    pruner = MacKayPruner(model, optimizer, **settings)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pruner.load_state_dict(state, fresh=["2"])
    assert torch.equal(model[2].weight, head) and not bool(pruner.alpha("2").any())
    assert torch.equal(model[0].weight, backbone) and torch.equal(pruner.alpha("0"), state["alpha"]["0"])
    # the new head's exact-curvature sums (weight and bias) start at nothing; the backbone's are loaded
    sums = pruner.accumulator.state_dict()
    assert set(sums) == {"0.weight", "0.bias"} and sums["0.weight"]["count"] > 0
    with pytest.raises(ValueError, match=r"fresh names layers this pruner has not: \['head'\]"):
        pruner.load_state_dict(state, fresh=["head"])
    for bad in ("2", 5, [2], None):
        with pytest.raises(TypeError, match=rf"fresh must be a list of layer names, got {re.escape(repr(bad))}"):
            pruner.load_state_dict(state, fresh=bad)
    # not said: a model whose own state is loaded after the pruner's (either order is fine), a
    # zero-initialised layer included
    for zero_initialised in (False, True):
        model_now = build()
        if zero_initialised:
            torch.nn.init.zeros_(model_now[2].weight)
        other = MacKayPruner(model_now, torch.optim.Adam(model_now.parameters()), **settings)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            other.load_state_dict(state)
        other.detach()


def test_a_layer_covered_now_but_not_when_the_state_was_saved_is_explained():
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    model[0].requires_grad_(False)
    saved = MacKayPruner(model, torch.optim.Adam(model[2].parameters()), num_data=64, batch_size=16)
    state = saved.state_dict()
    saved.detach()
    model[0].requires_grad_(True)
    pruner = MacKayPruner(model, torch.optim.Adam(model.parameters()), num_data=64, batch_size=16)
    with pytest.raises(KeyError, match=r"no alpha for layers \['0'\] \(this pruner covers layers the saved one did "
                                       r"not, such as a layer frozen when the saved pruner was built"):
        pruner.load_state_dict(state)


def test_a_layer_frozen_under_exact_curvature_keeps_its_alpha():
    """ef-exact gathers no curvature for a layer frozen at its calls: the update holds it as it is,
    said as frozen (not as a layer no data reached), where a re-estimate from a curvature of 0 set
    its alphas to 0 (the prior off: mean 3.5e3 -> 0 in a review's run)."""
    import torch.nn.functional as F
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.Tanh(), torch.nn.Linear(12, 12), torch.nn.Tanh(),
                                torch.nn.Linear(12, 3))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    pruner = MacKayPruner(model, optimizer, num_data=64, batch_size=16, curvature="ef-exact")
    x, y = torch.randn(64, 6), torch.randint(0, 3, (64,))

    def steps(count):
        train_steps(model, optimizer, x, y, count, batch=16)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        steps(20)
        pruner.update()
        steps(20)
        pruner.update()
    model[2].requires_grad_(False)
    alpha = pruner.alpha("2").clone()
    assert bool(torch.isfinite(alpha).any()) and bool((alpha[torch.isfinite(alpha)] > 0).any())
    steps(20)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = pruner.update()
    said = [str(w.message) for w in caught]
    assert any("2 (Linear.weight" in text and "its requires_grad is False now" in text for text in said)
    assert not any("no data" in text for text in said)
    assert torch.equal(pruner.alpha("2"), alpha)
    assert next(layer for layer in report["layers"] if layer["name"] == "2").get("held") is True


@pytest.mark.parametrize("optimizer_kind", ["mackay", "adam"])
def test_reset_curvature_reads_the_new_data_alone(optimizer_kind):
    """A continual learner's second task: after reset_curvature() ef-batch's estimate is the new
    batch's B g^2 whatever the first task left (h and its t restart; h.zero_() alone read it at
    1 - rho^t); the exact estimators drop the squares since the last update; alphas are kept."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    optimizer = (MacKayAdam(ard_param_groups(model), lr=0.0, num_data=256, batch_size=16)
                 if optimizer_kind == "mackay" else torch.optim.Adam(model.parameters(), lr=0.0))
    pruner = MacKayPruner(model, optimizer, num_data=256, **({} if optimizer_kind == "mackay" else {"batch_size": 16}))

    def steps(x, y, count):
        for _ in range(count):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()

    steps(torch.randn(16, 6), torch.randint(0, 3, (16,)), 40)
    pruner.update()
    alphas = {name: pruner.alpha(name).clone() for name in pruner.targets}
    x, y = torch.randn(16, 6) * 3, torch.randint(0, 3, (16,))
    pruner.reset_curvature()
    steps(x, y, 3)
    optimizer.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()   # (lr 0: the same gradient at every step)
    for name, target in pruner.targets.items():
        expected = 16 * target.param.grad.square()
        kept = torch.isfinite(alphas[name])
        torch.testing.assert_close(pruner.curvature_estimate(name)[kept], expected[kept], rtol=1e-4, atol=1e-9)
        assert torch.equal(pruner.alpha(name), alphas[name])


def test_reset_curvature_drops_the_exact_squares_and_refuses_where_it_cannot():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    pruner = MacKayPruner(model, optimizer, num_data=256, batch_size=16, curvature="ef-exact")
    optimizer.zero_grad()
    nn.functional.cross_entropy(model(torch.randn(16, 6)), torch.randint(0, 3, (16,))).backward()
    optimizer.step()
    assert pruner.accumulator.num_examples == 16
    pruner.reset_curvature()
    assert pruner.accumulator.num_examples == 0
    pruner.detach()
    with pytest.raises(RuntimeError, match="reset_curvature: this pruner was detached"):
        pruner.reset_curvature()


def test_ef_batch_holds_a_head_whose_gradient_is_all_zero():
    """A head in the loss at weight 0 (DDP's unused-parameter trick, loss + 0 * out.sum()) has a
    gradient, all zeros, at every step: no data reached it, and it is held (it was emptied when
    only a None gradient read as idle)."""
    torch.manual_seed(0)
    model = _IdleHead()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    pruner = MacKayPruner(model, optimizer, num_data=256, batch_size=16, threshold=0.5)
    for update in range(2):
        for _ in range(30):
            x = torch.randn(16, 12)
            optimizer.zero_grad()
            h = torch.relu(model.a(x))
            loss = nn.functional.cross_entropy(model.b(h), (x[:, 0] > 0).long()) + 0.0 * model.head2(h).sum()
            loss.backward()
            optimizer.step()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            report = pruner.update()
    head = {layer["name"]: layer for layer in report["layers"]}["head2"]
    assert head.get("without_data") and head["kept"] == head["total"]
