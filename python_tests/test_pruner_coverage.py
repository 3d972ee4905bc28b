"""Every weight a user has gets a prior, or is listed with the reason it has none (issue 15 item 5):
Conv1d/3d, transposed convs, embeddings, LSTM/GRU, attention, tied weights; exact curvature
for grouped/depthwise/1-d convolutions, and a clear error, at construction, for what it cannot do."""
import math
import warnings

import pytest
import torch
from torch import nn

from mackay_ext import MacKayAdam, MacKayPruner, ard_param_groups
from mackay_ext.curvature import FisherAccumulator


class Zoo(nn.Module):
    """One of every layer kind, and an output layer tied to the embedding."""

    def __init__(self, vocab=11, dim=8):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.lstm = nn.LSTM(dim, dim, batch_first=True)
        self.gru = nn.GRU(dim, dim, batch_first=True)
        self.attn = nn.MultiheadAttention(dim, 2, batch_first=True)
        self.conv1d = nn.Conv1d(dim, dim, 3, padding=1)
        self.depthwise = nn.Conv1d(dim, dim, 3, padding=1, groups=dim)
        self.conv3d = nn.Conv3d(1, 2, 1)
        self.deconv = nn.ConvTranspose2d(2, 1, 1)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab)
        self.head.weight = self.embed.weight               # tied

    def forward(self, tokens):
        h = self.embed(tokens)                             # (B, T, dim)
        h = self.lstm(h)[0] + self.gru(h)[0]
        h = h + self.attn(h, h, h, need_weights=False)[0]
        c = self.depthwise(self.conv1d(h.transpose(1, 2))).transpose(1, 2)
        v = self.deconv(self.conv3d(c.unsqueeze(1).unsqueeze(2)).squeeze(2)).squeeze(1)
        return self.head(self.norm(h + v)).mean(1)         # (B, vocab)


def zoo_batches(steps, batch=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        tokens = torch.randint(0, 11, (batch, 5), generator=g)
        yield tokens, tokens[:, 0]


def test_every_matrix_is_covered_and_the_rest_listed():
    torch.manual_seed(0)
    model = Zoo()
    optimizer = MacKayAdam(ard_param_groups(model), lr=1e-2, num_data=800, batch_size=8)
    pruner = MacKayPruner(model, optimizer, num_data=800)
    matrices = {name for name, p in model.named_parameters() if p.dim() >= 2}
    covered = {f"{t.module_name}.{t.attr}" for t in pruner.targets.values()}
    assert covered == matrices
    assert {"embed", "lstm.weight_ih_l0", "lstm.weight_hh_l0", "gru.weight_ih_l0",
            "attn.in_proj_weight", "attn.out_proj", "conv1d", "depthwise", "conv3d", "deconv"} <= set(pruner.targets)
    assert "head" not in pruner.targets and pruner.targets["embed"].owners == ["embed", "head"]
    report = pruner.report()
    assert report["layers"][0]["tied"] == ["embed", "head"]
    excluded = {entry["name"]: entry["reason"] for entry in report["excluded"]}
    assert set(excluded) == {name for name, p in model.named_parameters() if p.dim() < 2}
    assert all("1-D" in reason for reason in excluded.values())


def test_the_weights_layers_leaves_out_are_listed():
    """With layers=, the other weights were in neither targets nor report()["excluded"], which
    the README says lists every parameter without a prior."""
    torch.manual_seed(0)
    model = Zoo()
    optimizer = MacKayAdam(ard_param_groups(model), lr=1e-2, num_data=800, batch_size=8)
    pruner = MacKayPruner(model, optimizer, num_data=800, layers=["conv1d", "attn.out_proj"])
    assert sorted(pruner.targets) == ["attn.out_proj", "conv1d"]
    excluded = {entry["name"]: entry["reason"] for entry in pruner.report()["excluded"]}
    left_out = {name for name, p in model.named_parameters() if p.dim() >= 2} - {"conv1d.weight",
                                                                                  "attn.out_proj.weight"}
    assert left_out and {name for name, why in excluded.items() if why == "not in layers="} == left_out


def test_per_weight_ard_prunes_every_kind_and_keeps_ties():
    torch.manual_seed(0)
    model = Zoo()
    optimizer = MacKayAdam(ard_param_groups(model), lr=1e-2, num_data=800, batch_size=8)
    pruner = MacKayPruner(model, optimizer, num_data=800, threshold=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for step, (tokens, target) in enumerate(zoo_batches(90)):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(tokens), target).backward()
            optimizer.step()
            if step % 30 == 29:
                report = pruner.update()
    pruned = {layer["name"] for layer in report["layers"] if layer["kept"] < layer["total"]}
    assert {"embed", "lstm.weight_ih_l0", "attn.in_proj_weight", "conv1d"} <= pruned
    assert model.head.weight is model.embed.weight              # still tied
    for name, target in pruner.targets.items():
        dead = (pruner.alpha(name) == math.inf).expand_as(target.param)
        assert (target.param[dead] == 0).all()


def test_group_shapes_of_the_other_layer_kinds():
    model = Zoo()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    pruner = MacKayPruner(model, optimizer, num_data=100, batch_size=8, granularity={
        "lstm.weight_ih_l0": "input", "gru.weight_hh_l0": "output", "embed": "input",
        "deconv": "output", "conv1d": "filter", "depthwise": "output", "conv3d": "input"})
    assert pruner.alpha("lstm.weight_ih_l0").shape == (1, 8)       # one per input feature
    assert pruner.alpha("gru.weight_hh_l0").shape == (24, 1)       # one per gate row
    assert pruner.alpha("embed").shape == (11, 1)                  # one per token
    assert pruner.alpha("deconv").shape == (1, 1, 1, 1)            # (in, out, kh, kw): per output
    assert pruner.alpha("conv1d").shape == (8, 1, 1)
    assert pruner.alpha("conv3d").shape == (1, 1, 1, 1, 1)
    assert pruner.granularity["lstm.weight_hh_l0"] == "weight"     # not named: per weight


def test_granularity_names_are_checked():
    model = Zoo()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"granularity must be one of \('weight', 'input', 'output', 'filter'\) "
                                         r"\(per layer, or for every layer\) or 'channel' .*got 'chanel'"):
        MacKayPruner(model, optimizer, num_data=100, batch_size=8, granularity="chanel")
    with pytest.raises(ValueError, match=r"granularity names \['lsmt'\] are not ARD layers"):
        MacKayPruner(model, optimizer, num_data=100, batch_size=8, granularity={"lsmt": "input"})
    with pytest.raises(ValueError, match=r"depthwise .*'input' is not defined for a grouped"):
        MacKayPruner(model, optimizer, num_data=100, batch_size=8, granularity={"depthwise": "input"})
    # a model-wide granularity falls back to per-weight where it has no meaning, and says so
    pruner = MacKayPruner(model, optimizer, num_data=100, batch_size=8, granularity="input")
    assert pruner.granularity["depthwise"] == "weight" and "depthwise" in pruner.notes


def test_exact_curvature_refuses_at_construction_naming_the_layer():
    model = Zoo()
    optimizer = MacKayAdam(ard_param_groups(model), lr=1e-3, num_data=100)
    with pytest.raises(ValueError, match=r"cannot serve embed \(tied: embed = head\), lstm.weight_ih_l0 \(LSTM\)"):
        MacKayPruner(model, optimizer, num_data=100, curvature="ef-exact")
    # nn.MultiheadAttention passes out_proj.weight to its functional form and never calls
    # out_proj: its hooks would see nothing, its curvature read 0 and the rule prune it
    for curvature in ("ef-exact", "fisher-mc"):
        with pytest.raises(ValueError, match=r"cannot serve attn.out_proj \(MultiheadAttention reads its weight "
                                             r"itself: the layer's hooks never run\)"):
            MacKayPruner(model, optimizer, num_data=100, curvature=curvature, layers=["conv1d", "attn.out_proj"])
    pruner = MacKayPruner(model, optimizer, num_data=100, curvature="ef-exact", layers=["conv1d", "depthwise"])
    assert set(pruner.targets) == {"conv1d", "depthwise"}
    pruner.detach()
    # ef-batch reads the gradient, which out_proj has like any weight
    pruner = MacKayPruner(model, MacKayAdam(ard_param_groups(model), num_data=100, batch_size=8), num_data=100,
                          curvature="ef-batch", layers=["attn.out_proj"])
    assert set(pruner.targets) == {"attn.out_proj"}


def test_an_accumulator_lists_what_multihead_attention_reads_itself():
    model = Zoo()
    accumulator = FisherAccumulator(model)
    assert "attn.out_proj" in accumulator.unsupported and "attn.out_proj" not in accumulator.layers
    with pytest.raises(ValueError, match=r"'attn.out_proj'.*reads out_proj.weight itself"):
        FisherAccumulator(model, modules=["conv1d", "attn.out_proj"], strict=True)


def per_example_squared_grads(module, x, loss_fn):
    """Reference: per-example gradients by looping over the batch, in float64."""
    total = torch.zeros_like(module.weight)
    for n in range(x.shape[0]):
        module.zero_grad()
        loss_fn(module(x[n:n + 1])).backward()
        total += module.weight.grad ** 2
    return total / x.shape[0]


@pytest.mark.parametrize("make", [
    lambda: nn.Conv2d(6, 4, 3, padding=1, groups=2),
    lambda: nn.Conv2d(6, 6, 3, stride=2, groups=6),          # depthwise
    lambda: nn.Conv1d(4, 6, 3, padding=2, dilation=2, groups=2),
    lambda: nn.Conv1d(3, 5, 2, stride=2),
    lambda: nn.Conv1d(4, 6, 3, padding="same", dilation=2),   # = padding 2
    lambda: nn.Conv2d(3, 4, (3, 5), padding="same"),          # = padding (1, 2)
    lambda: nn.Conv2d(3, 4, 3, padding="valid", groups=1),
], ids=["grouped2d", "depthwise2d", "grouped1d", "conv1d", "same1d", "same2d", "valid2d"])
@pytest.mark.parametrize("backend", ["ext", "torch"])
def test_exact_curvature_of_grouped_and_1d_convs(make, backend):
    torch.manual_seed(0)
    module = make().double()
    shape = (5, module.in_channels, 7, 9) if isinstance(module, nn.Conv2d) else (5, module.in_channels, 11)
    x = torch.randn(shape, dtype=torch.float64)

    def loss_fn(out):
        return (out ** 2).sum() * 0.5 + out.sum()
    expected = per_example_squared_grads(module, x, loss_fn)
    accumulator = FisherAccumulator(module, loss_reduction="sum", backend=backend)
    module.zero_grad()
    loss_fn(module(x)).backward()
    torch.testing.assert_close(accumulator.curvature(module.weight), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("curvature", ["ef-exact", "fisher-mc"])
def test_same_padding_that_is_uneven_is_refused_by_name(curvature):
    """padding='same' with an even dilated kernel pads one more on the right than on the left."""
    model = nn.Sequential(nn.Conv1d(2, 3, 4, padding="same"), nn.Flatten(), nn.Linear(3 * 8, 2))
    optimizer = MacKayAdam(ard_param_groups(model), lr=1e-3, num_data=100)
    with pytest.raises(ValueError, match=r"cannot serve 0 \(Conv1d, padding='same' with an even dilated kernel"):
        MacKayPruner(model, optimizer, num_data=100, curvature=curvature)
    reflect = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect"))
    with pytest.raises(ValueError, match=r"cannot serve 0 \(Conv2d, padding_mode='reflect'\)"):
        MacKayPruner(reflect, MacKayAdam(ard_param_groups(reflect), num_data=100), num_data=100, curvature=curvature)


@pytest.mark.parametrize("style", ["parametrize", "old hook", "old spectral_norm hook"])
def test_weight_norm_inputs_are_left_out_with_a_warning_and_training_stays_finite(style):
    """weight_norm computes the weight from g and the direction v: a prior on v pruned whole rows
    of it (weight = g v / |v| = 0/0, NaN). Parametrization inputs are left out, named in a warning
    and in report()["excluded"]; the plain layer beside them keeps its prior."""
    torch.manual_seed(0)
    if style == "parametrize":
        first = nn.utils.parametrizations.weight_norm(nn.Linear(20, 32))
        names = ["0.parametrizations.weight.original0", "0.parametrizations.weight.original1"]
    elif style == "old hook":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)   # torch.nn.utils.weight_norm is deprecated
            first = nn.utils.weight_norm(nn.Linear(20, 32))
        names = ["0.weight_g", "0.weight_v"]
    else:   # weight = weight_orig / its largest singular value, which the hook estimates
        first = nn.utils.spectral_norm(nn.Linear(20, 32))
        names = ["0.weight_orig"]
    model = nn.Sequential(first, nn.ReLU(), nn.Linear(32, 4))
    x = torch.randn(200, 20)
    y = (x[:, :3].sum(1) > 0).long() + 2 * (x[:, 3] > 0).long()
    optimizer = MacKayAdam(ard_param_groups(model), lr=1e-2, num_data=200, batch_size=16)
    with pytest.warns(UserWarning, match="left without a prior: each is an input of a parametrization"):
        pruner = MacKayPruner(model, optimizer, num_data=200)
    assert list(pruner.targets) == ["2"]
    excluded = {entry["name"]: entry["reason"] for entry in pruner.report()["excluded"]}
    assert all("remove_parametrizations" in excluded[name] for name in names)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(4):
            for _ in range(20):
                index = torch.randint(0, 200, (16,))
                optimizer.zero_grad()
                nn.functional.cross_entropy(model(x[index]), y[index]).backward()
                optimizer.step()
            pruner.update()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert pruner.report()["kept"] < pruner.report()["total"]   # the plain layer was pruned


@pytest.mark.parametrize("api", ["parametrize", "hook"])
@pytest.mark.parametrize("where", ["layers", "granularity"])
@pytest.mark.parametrize("name", ["0", "0.weight"])
def test_a_parametrized_layer_named_by_the_user_is_said_to_be_one(api, where, name):
    """A new user named a weight_norm layer as it reads (model[0], model[0].weight): layers= said
    the layer had no weight to put a prior on, or that 0.weight was no parameter of the model;
    granularity= named only the ARD layers. Each now says it is a parametrization's input."""
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    if api == "parametrize":
        nn.utils.parametrizations.weight_norm(model[0])
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)   # the hook form is deprecated
            nn.utils.weight_norm(model[0])
    optimizer = torch.optim.Adam(model.parameters())
    with warnings.catch_warnings(), pytest.raises(ValueError, match="is an input of a parametrization"):
        warnings.simplefilter("ignore")   # (the granularity case also warns that layer 0 has no prior)
        MacKayPruner(model, optimizer, num_data=100, batch_size=10, **{where: {name: "output"}
                                                                        if where == "granularity" else [name]})


@pytest.mark.parametrize("kind", ["spectral_norm", "weight_norm hook", "spectral_norm hook"])
def test_a_parametrization_put_on_a_pruned_layer_later_is_named_at_the_update(kind):
    """A new user added spectral_norm to a layer for a fine-tune stage after building the pruner:
    the update refused as if the layer had been replaced by sparsify or shrink."""
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    optimizer = torch.optim.Adam(model.parameters())
    pruner = MacKayPruner(model, optimizer, num_data=100, batch_size=10)
    if kind == "spectral_norm":
        nn.utils.parametrizations.spectral_norm(model[2])
    elif kind == "spectral_norm hook":   # keeps the pruner's Parameter, as weight_orig
        nn.utils.spectral_norm(model[2])
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)   # the hook form is deprecated
            nn.utils.weight_norm(model[2])
    nn.functional.cross_entropy(model(torch.randn(10, 6)), torch.randint(0, 3, (10,))).backward()
    optimizer.step()
    with pytest.raises(RuntimeError, match="a parametrization was put on the weight of 2 after the pruner was built"):
        pruner.update()
