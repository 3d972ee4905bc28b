"""Bad input found by testing as a new user: each gets a clear error (or warning) that names what
is wrong, before anything changes, instead of a deep traceback, a silent wrong result or a model
trained against stale state."""

import warnings

import pytest
import torch
from conftest import pruner_step
from torch import nn
from torch.nn import functional as F

from mackay_ext import MacKayAdam, MacKayPruner, ard_param_groups, load_compressed, save_compressed, sparsify
from mackay_ext._files import CorruptFileError
from mackay_ext._checksum import payload_digest


def build(inputs=10, num_data=200, **options):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(inputs, 32), nn.ReLU(), nn.Linear(32, 5))
    optimizer = MacKayAdam(ard_param_groups(model), lr=3e-3, num_data=num_data, batch_size=8)
    return model, optimizer, MacKayPruner(model, optimizer, num_data=num_data, **options)


def train(model, optimizer, inputs=10, steps=5):
    for _ in range(steps):
        x, y = torch.randn(8, inputs), torch.randint(0, 5, (8,))
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()


def test_load_state_dict_from_another_model_names_the_layer_and_changes_nothing():
    other_model, other_optimizer, other = build(inputs=12)
    train(other_model, other_optimizer, 12)
    other.update()
    model, optimizer, pruner = build()
    before = pruner.alpha("0").clone()
    with pytest.raises(ValueError, match="alpha of layer '0' has shape"):
        pruner.load_state_dict(other.state_dict())
    torch.testing.assert_close(pruner.alpha("0"), before)
    train(model, optimizer, steps=1)   # the optimizer still works


@pytest.mark.parametrize("value", [float("nan"), -1.0])
def test_load_state_dict_refuses_nan_or_negative_alpha(value):
    model, optimizer, pruner = build()
    state = pruner.state_dict()
    state["alpha"]["0"] = torch.full_like(state["alpha"]["0"], value)
    with pytest.raises(ValueError, match="non-negative"):
        pruner.load_state_dict(state)


def test_load_state_dict_refuses_another_granularity_and_warns_on_other_settings():
    _, _, saved = build()
    _, _, pruner = build(granularity="input")
    with pytest.raises(ValueError, match="granularity 'weight'; this pruner has 'input'"):
        pruner.load_state_dict(saved.state_dict())
    _, _, stricter = build(threshold=0.2)
    with pytest.warns(RuntimeWarning, match="threshold"):
        stricter.load_state_dict(saved.state_dict())


def test_constructor_checks_its_numbers():
    model = nn.Sequential(nn.Linear(4, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for options, match in (({"backend": "x"}, "backend"), ({"eps": -1.0}, "eps"), ({"alpha_max": -1.0}, "alpha_max"),
                           ({"alpha_max": 0}, "alpha_max"), ({"curvature_decay": 1.0}, "curvature_decay"),
                           ({"curvature_decay": 5.0}, "curvature_decay")):
        with pytest.raises(ValueError, match=match):
            MacKayPruner(model, optimizer, num_data=100, batch_size=8, **options)
    with pytest.raises(ValueError, match="curvature_decay"):
        MacKayAdam(ard_param_groups(model), num_data=100, curvature_decay=1.0)


def test_mackay_adam_settings_given_to_the_pruner():
    model = nn.Sequential(nn.Linear(4, 3))
    optimizer = MacKayAdam(ard_param_groups(model), num_data=200, batch_size=8)
    with pytest.raises(ValueError, match="num_data=50000, but MacKayAdam .* num_data=200"):
        MacKayPruner(model, optimizer, num_data=50000)
    with pytest.warns(UserWarning, match=r"are MacKayAdam's .* not used: batch_size=0.5 \(MacKayAdam's: 8.0\)"):
        MacKayPruner(model, optimizer, num_data=200, batch_size=0.5).detach()
    with warnings.catch_warnings():   # the optimizer's own values repeated: nothing to say
        warnings.simplefilter("error")
        MacKayPruner(model, optimizer, num_data=200, batch_size=8, curvature_decay=0.99)


def test_a_skipped_update_reports_the_same_keys():
    model, optimizer, pruner = build(on_nonfinite="skip")
    train(model, optimizer)
    normal = pruner.update()
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    with pytest.warns(RuntimeWarning, match="non-finite"):
        skipped = pruner.update()
    assert skipped["skipped"] and "diverged" in skipped["notes"][0]
    assert set(normal) <= set(skipped)


@pytest.mark.parametrize("optimizer_kind", ["mackay", "sgd"])
def test_pruner_refuses_layers_sparsify_replaced(optimizer_kind):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 5))
    if optimizer_kind == "mackay":
        optimizer = MacKayAdam(ard_param_groups(model), num_data=200, batch_size=8)
        pruner = MacKayPruner(model, optimizer, num_data=200)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        pruner = MacKayPruner(model, optimizer, num_data=200, batch_size=8)
    train(model, optimizer)
    pruner.update()
    with torch.no_grad():
        model[0].weight[:, 3:] = 0   # sparse enough to convert
        if optimizer_kind == "mackay":   # which reads what is pruned from alpha
            optimizer.ard_state(model[0].weight)["alpha"][:, 3:] = float("inf")
    sparsify(model, optimizer)
    assert type(model[0]).__name__ == "SparseLinear"
    kept = pruner.report()["kept"] if optimizer_kind == "sgd" else None
    train(model, optimizer)
    with pytest.raises(RuntimeError, match="no longer the model's .* sparsify"):
        pruner.update()
    if optimizer_kind == "mackay":   # MacKayAdam moved the alphas to the sparse layer's values
        with pytest.raises(RuntimeError, match="no longer the model's .* sparsify"):
            pruner.report()
    else:   # the weights as they were converted, which later training does not move
        assert pruner.report()["kept"] == kept


def test_sparsify_names_layers_it_has_no_sparse_form_for():
    model = nn.ModuleDict({"conv1d": nn.Conv1d(4, 4, 3), "lstm": nn.LSTM(4, 4), "fc": nn.Linear(4, 4)})
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    with pytest.warns(UserWarning, match=r"conv1d \(Conv1d: no sparse form; 48 of 48 weights zero\).*"
                                         r"lstm \(LSTM: no sparse form; 127 of 128 weights zero\)"):
        with torch.no_grad():
            model["lstm"].weight_hh_l0[0, 0] = 1.0   # 127 of 128: not "100% zeros"
        sparsify(model)


def resealed(payload):
    """An edited compressed payload with its checksum made again (as a deliberate edit would)."""
    payload = {k: v for k, v in payload.items() if k != "digest"}
    return dict(payload, digest=payload_digest(payload))


def test_load_compressed_refuses_a_model_on_the_meta_device(tmp_path):
    """It warned a no-op copy per tensor, then failed inside torch ('Cannot copy out of meta tensor')."""
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Linear(16, 3))
    save_compressed(model, tmp_path / "m.pt")
    with torch.device("meta"):
        shell = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Linear(16, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match=r"model has tensors on the meta device \(0.weight, 0.bias, 1.weight, "
                                             r"\.\.\.\).*model.to_empty\(device='cpu'\) first"):
            load_compressed(tmp_path / "m.pt", model=shell)
    shell.to_empty(device="cpu")
    loaded = load_compressed(tmp_path / "m.pt", model=shell)
    assert torch.equal(loaded[2].weight, model[2].weight)


def test_load_compressed_refuses_a_model_that_does_not_fit(tmp_path):
    saved = nn.Sequential(nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 3))
    with torch.no_grad():
        saved[0].weight[:, 4:] = 0
    sparsify(saved)
    path = tmp_path / "model.pt"
    save_compressed(saved, path)
    with pytest.raises(RuntimeError, match=r"layer '0' is Linear \(out_features, in_features\) = \(8, 10\)"):
        load_compressed(path, model=nn.Sequential(nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 3)))
    with pytest.raises(TypeError, match="model"):
        load_compressed(path, model="lenet-300-100")
    payload = torch.load(path, weights_only=True)
    payload["sparse"]["0"]["bias"] = torch.zeros(5)
    torch.save(resealed(payload), tmp_path / "bias.pt")   # past the checksum: the field check
    with pytest.raises(CorruptFileError, match="bias must be a floating tensor of 8 entries"):
        load_compressed(tmp_path / "bias.pt", model=nn.Sequential(nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 3)))
    del payload["sparse"]
    torch.save(resealed(payload), tmp_path / "nosparse.pt")
    with pytest.raises(CorruptFileError, match="lacks its 'sparse'"):
        load_compressed(tmp_path / "nosparse.pt", model=nn.Sequential(nn.Linear(12, 8)))
    del payload["digest"]   # neither the parts nor a digest: the refusal alone, no checksum warning first
    torch.save(payload, tmp_path / "bare.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(CorruptFileError, match="lacks its 'sparse'"):
            load_compressed(tmp_path / "bare.pt", model=nn.Sequential(nn.Linear(12, 8)))


@pytest.mark.parametrize("dropout", [nn.Dropout2d, nn.AlphaDropout, nn.FeatureAlphaDropout])
def test_channel_groups_follow_eval_mode_dropouts(dropout):
    from mackay_ext import channel_groups
    model = nn.Sequential(nn.Conv2d(3, 4, 3), dropout(0.2), nn.ReLU(), nn.Conv2d(4, 2, 3))
    groups = channel_groups(model, (torch.randn(2, 3, 8, 8),))
    assert len([g for g in groups if any(m.name == "0.weight" for m in g.members)]) == 4


def test_training_api_refuses_what_it_cannot_serve_by_name():
    """From a new-user pass: each used to be accepted silently or to fail deep inside."""
    model = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 2))
    with pytest.raises(TypeError, match="MacKayAdam: lr must be a number, got str '0.1'"):
        MacKayAdam(ard_param_groups(model), lr="0.1", num_data=100, batch_size=16)
    optimizer = MacKayAdam(ard_param_groups(model), num_data=100, batch_size=16)
    with pytest.raises(TypeError, match="allow_empty_layers must be True or False, got 'no'"):
        MacKayPruner(model, optimizer, num_data=100, allow_empty_layers="no")
    pruner = MacKayPruner(model, optimizer, num_data=100)
    with pytest.raises(TypeError, match="update: prune must be True or False, got 'no'"):
        pruner.update(prune="no")
    embedding = nn.Sequential(nn.Embedding(100, 12, sparse=True))
    with pytest.raises(ValueError, match=r"'0' makes sparse gradients .*sparse=False"):
        MacKayPruner(embedding, torch.optim.SparseAdam(list(embedding.parameters())), num_data=256, batch_size=16)


def test_ef_exact_gives_a_layer_no_forward_used_no_curvature_as_ef_batch_does():
    """An idle branch used to raise a KeyError naming no layer at the first update."""
    class Branch(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.unused, self.out = nn.Linear(10, 10), nn.Linear(10, 10), nn.Linear(10, 2)

        def forward(self, x):
            return self.out(torch.relu(self.a(x)))

    reports = {}
    for curvature in ("ef-batch", "ef-exact"):
        torch.manual_seed(0)
        model = Branch()
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        pruner = MacKayPruner(model, optimizer, num_data=256, batch_size=16, curvature=curvature)
        for update in range(2):   # the warm-up update, then one that can prune
            for _ in range(5):
                x = torch.randn(16, 10)
                optimizer.zero_grad()
                F.cross_entropy(model(x), (x[:, 0] > 0).long()).backward()
                optimizer.step()
            if curvature == "ef-exact" and update == 0:   # said once
                with pytest.warns(RuntimeWarning, match=r"unused \(Linear.weight, shape \(10, 10\)\): no data has "
                                  r"reached it .* under exact curvature a layer that ran where the hooks cannot"):
                    reports[curvature] = pruner.update()
            else:
                reports[curvature] = pruner.update()
        idle = next(name for name in pruner.targets if name.startswith("unused"))
        assert float(pruner.curvature(idle).abs().sum()) == 0.0
    layers = {c: {e["name"]: e for e in r["layers"]} for c, r in reports.items()}
    assert layers["ef-exact"]["unused"]["kept"] == layers["ef-batch"]["unused"]["kept"] == 100   # left as it is


class ReadsItsChild(nn.Module):
    """A parent that reads its child Linear's weight itself: the child's hooks never run, though
    its weight gets a gradient."""

    def __init__(self):
        super().__init__()
        self.proj, self.head = nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.head(torch.tanh(F.linear(x, self.proj.weight, self.proj.bias)))


@pytest.mark.parametrize("curvature", ["ef-exact", "fisher-mc"])
@pytest.mark.parametrize("curvature_every", [1, 3])
def test_exact_curvature_refuses_to_price_a_layer_its_hooks_never_saw(curvature, curvature_every):
    torch.manual_seed(0)
    model = ReadsItsChild()
    optimizer = MacKayAdam(ard_param_groups(model), lr=1e-2, num_data=100, batch_size=8)
    pruner = MacKayPruner(model, optimizer, num_data=100, curvature=curvature, curvature_every=curvature_every)
    for _ in range(6):
        pruner_step(pruner, model, optimizer, torch.randn(8, 8), torch.randint(0, 3, (8,)))
    alpha = pruner.alpha("proj").clone()
    with pytest.raises(RuntimeError, match=rf"update: proj had gradients, but the {curvature} hooks never saw "
                                           r"their forward: a parent module reads their weight itself.*ef-batch"):
        pruner.update()
    assert torch.equal(pruner.alpha("proj"), alpha)   # refused before anything changed
    # ef-batch, which reads the gradient, serves it
    model = ReadsItsChild()
    optimizer = MacKayAdam(ard_param_groups(model), lr=1e-2, num_data=100, batch_size=8)
    pruner = MacKayPruner(model, optimizer, num_data=100, curvature="ef-batch")
    optimizer.zero_grad()
    F.cross_entropy(model(torch.randn(8, 8)), torch.randint(0, 3, (8,))).backward()
    optimizer.step()
    pruner.update()
    assert float(pruner.curvature_estimate("proj").sum()) > 0


def test_fit_names_a_config_that_is_no_fitconfig_and_rounds_that_prune_nothing():
    """A dict raised "AttributeError: 'dict' object has no attribute 'schedule'"; FitConfig.extra,
    accepted and never read, is gone (pruner options go in pruner_options=); rounds=0 ran without
    pruning and without a word."""
    import dataclasses

    from mackay_ext import data, models
    from mackay_ext.train import FitConfig, Trainer, fit
    splits = data.load("digits", seed=0)
    with pytest.raises(TypeError, match=r"fit: config must be a mackay_ext.train.FitConfig, got dict "
                                        r"\(FitConfig\(\*\*settings\) builds one; the pruner's options go in "
                                        r"pruner_options=\)"):
        fit(models.create("digits-mlp"), splits, {"rounds": 1})
    assert "extra" not in {f.name for f in dataclasses.fields(FitConfig)}
    with pytest.warns(UserWarning, match="rounds=0 with the paper schedule .* prunes nothing"):
        Trainer(models.create("digits-mlp"), splits, FitConfig(rounds=0))


def test_a_sparse_layers_nonzeros_are_named_as_such_with_what_to_do():
    """They were left out as '1-D (bias or norm scale)', with no hint that densify() helps."""
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 2))
    with torch.no_grad():
        model[0].weight[:, :4] = 0
    sparsify(model)
    optimizer = MacKayAdam(ard_param_groups(model), lr=1e-3, num_data=10, batch_size=2)
    pruner = MacKayPruner(model, optimizer, num_data=10)   # the dense layer 2 keeps a prior
    reasons = {entry["name"]: entry["reason"] for entry in pruner.report()["excluded"]}
    assert reasons["0.values"] == ("the nonzeros of a SparseLinear (stored sparse): no prior; "
                                   "mackay_ext.densify(model) first to prune it further")
    assert list(pruner.targets) == ["2"]


def _hooks_of(model, optimizer):
    return (len(optimizer._optimizer_step_pre_hooks), len(optimizer._optimizer_step_post_hooks),
            sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()),
            sum(len(p._backward_hooks or {}) for p in model.parameters()))


@pytest.mark.parametrize("options, message", [
    (dict(num_data=100), r"batch_size is needed for the ef-batch curvature"),
    (dict(num_data=100, batch_size=500), r"batch_size \(500\) exceeds num_data \(100\)"),
    (dict(num_data=100, batch_size=8, curvature="ef-exact", layers=["0", "emb"]), r"emb"),
])
def test_a_refused_pruner_leaves_nothing_attached(options, message):
    """A build that raised after it had hooked the optimizer left the hook, and every later step
    of that optimizer failed with a bare KeyError (new-user pass, README)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    model.emb = nn.Embedding(4, 3)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    before = _hooks_of(model, optimizer)
    with pytest.raises((ValueError, TypeError), match=message):
        MacKayPruner(model, optimizer, **options)
    assert _hooks_of(model, optimizer) == before
    F.cross_entropy(model[2](model[1](model[0](torch.randn(4, 6)))), torch.randint(0, 3, (4,))).backward()
    optimizer.step()   # (raised KeyError: '0')
    pruner = MacKayPruner(model, optimizer, num_data=100, batch_size=4, layers=["0", "2"])
    assert pruner.targets and not pruner.detached


def test_count_macs_and_group_index_name_their_arguments():
    """They failed deep inside (AttributeError: 'SGD' object has no attribute 'parameters';
    conv2d's input error; 'Conv2d' object has no attribute 'members'; an IndexError)."""
    import mackay_ext
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    x = torch.randn(2, 1, 8, 8)
    groups = mackay_ext.channel_groups(model, (x,))
    with pytest.raises(TypeError, match="count_macs: model must be a torch.nn.Module, got SGD"):
        mackay_ext.count_macs(torch.optim.SGD(model.parameters(), lr=0.1), (x,))
    with pytest.raises(ValueError, match="count_macs: example_inputs do not run the model: RuntimeError: Expected 3D"):
        mackay_ext.count_macs(model, (torch.randn(2, 2),))
    with pytest.raises(TypeError, match=r"group_index: takes \(groups, model\).* got \(Sequential, list\)"):
        mackay_ext.group_index(model, groups)
    with pytest.raises(TypeError, match="groups must be the ChannelGroups"):
        mackay_ext.group_index([1, 2], model)
    with pytest.raises(ValueError, match="not traced from this model: it has no parameter '3.weight'"):
        mackay_ext.group_index(groups, nn.Sequential(nn.Linear(8, 3)))
    narrower = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    with pytest.raises(ValueError, match="its 0.weight has 2 entries along dimension 0, a group reaches index 2"):
        mackay_ext.group_index(groups, narrower)
    index = mackay_ext.group_index(groups, model)
    assert index[("0.weight", 0)].tolist() == [0, 1, 2, 3] and mackay_ext.count_macs(model, x) > 0


def test_shrink_report_must_be_a_bool():
    from mackay_ext import shrink
    model = nn.Sequential(nn.Linear(4, 3))
    with pytest.raises(TypeError, match="shrink: report must be True or False, got 'yes'"):
        shrink(model, torch.randn(2, 4), report="yes")   # any truthy value returned a tuple
