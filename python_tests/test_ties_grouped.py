"""Tied parameters and grouped convolutions in the coupling and in shrink (mackay_ext.coupling,
mackay_ext.shrink): groups derived by hand, shrink of zeroed groups with outputs equal to the
pruned model's (float64, relative 1e-10), the tie kept (one Parameter object in both modules),
and what cannot be cut kept with a reason. Tiny random models on CPU."""
import copy
import importlib

import pytest
import torch
from torch import nn

from mackay_ext import MacKayPruner
from mackay_ext.coupling import CouplingError, channel_groups, trace_coupling
from mackay_ext.shrink import shrink

shrink_module = importlib.import_module("mackay_ext.shrink")   # mackay_ext.shrink is also the function


def as_sets(groups):
    return [{(m.name, m.dim, i) for m in g.members for i in m.indices} for g in groups]


def entries(*specs):
    return {(n, d, i) for n, d, idx in specs for i in idx}


def assert_equal_outputs(expected, got, rtol=1e-10):
    assert got.shape == expected.shape
    scale = expected.abs().max().item()
    assert (got - expected).abs().max().item() <= rtol * scale


# -- tied weights ----------------------------------------------------------------------------
class Tied(nn.Module):
    """The output layer reuses the embedding table: one (50, 32) Parameter under two names."""

    def __init__(self, head_first=False):
        super().__init__()
        if head_first:   # the canonical name (named_parameters) is then head.weight
            self.head = nn.Linear(32, 50, bias=False)
        self.emb = nn.Embedding(50, 32)
        self.mid = nn.Linear(32, 32)
        if not head_first:
            self.head = nn.Linear(32, 50, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, t):
        return self.head(torch.relu(self.mid(self.emb(t))))


def tokens(batch=2, length=7, vocab=50):
    return (torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(0)),)


@pytest.mark.parametrize("head_first", [False, True])
def test_tied_embedding_and_head_make_one_group_per_hidden_feature(head_first):
    model = Tied(head_first)
    table = "head.weight" if head_first else "emb.weight"
    groups = channel_groups(model, tokens())
    # feature d of the table is the embedding's output d (read by mid's column d) and the head's
    # input d (written by mid's row d): one column of one tensor, so both channels go together
    assert as_sets(groups) == [entries((table, 1, [d]), ("mid.weight", 0, [d]), ("mid.weight", 1, [d]),
                                       ("mid.bias", 0, [d])) for d in range(32)]
    names = {m.name for g in groups for m in g.members}
    assert names == {table, "mid.weight", "mid.bias"}   # the other name of the tie never appears


@pytest.mark.parametrize("head_first", [False, True])
def test_tied_shrink_keeps_the_tie_and_the_outputs(head_first):
    torch.manual_seed(0)
    model = Tied(head_first).double().eval()
    inputs = tokens()
    groups = channel_groups(model, inputs)
    for d in (3, 7, 20):
        groups[d].zero_(model)
    with torch.no_grad():
        expected = model(*inputs)
    small, report = shrink(model, inputs, report=True)
    assert small.head.weight is small.emb.weight and isinstance(small.emb.weight, nn.Parameter)
    assert small.emb.weight.shape == (50, 29) and small.mid.weight.shape == (29, 29)
    assert (small.emb.embedding_dim, small.head.in_features, small.mid.in_features) == (29, 29, 29)
    keep = [d for d in range(32) if d not in (3, 7, 20)]
    assert torch.equal(small.emb.weight, model.emb.weight[:, keep])
    assert len(report.removed) == 3 and not report.kept_zero
    assert report.params_after == 50 * 29 + 29 * 29 + 29   # the tied table counted once
    with torch.no_grad():
        assert_equal_outputs(expected, small(*inputs))
    assert model.head.weight is model.emb.weight and model.emb.weight.shape == (50, 32)   # input untouched


class TinyLM(nn.Module):
    """A tied TransformerEncoder language model (random init)."""

    def __init__(self, vocab=40, d=16, heads=4, ff=24, layers=2):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        layer = nn.TransformerEncoderLayer(d, heads, ff, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, vocab)
        self.head.weight = self.emb.weight

    def forward(self, t):
        return self.head(self.encoder(self.emb(t)))


def lm_and_inputs():
    torch.manual_seed(0)
    return TinyLM().double().eval(), tokens(2, 6, 40)


def test_tied_transformer_lm_shrinks_zeroed_feed_forward_units():
    model, inputs = lm_and_inputs()
    coupling = trace_coupling(model, inputs)
    ffn = [g for g in coupling.groups if g.kind == "channel"]
    assert len(ffn) == 2 * 24 and all(g.members[0].name.endswith("linear1.weight") for g in ffn)
    # the model width: embedding table = head input, merged by LayerNorm statistics and the tie
    width = [r for g, r in coupling.blocked if any(m.name == "emb.weight" and m.dim == 1 for m in g.members)]
    assert len(width) == 1 and "spans every channel of emb.weight (dim 1)" in width[0]
    for g in ffn[::5]:
        g.zero_(model)
    with torch.no_grad():
        expected = model(*inputs)
    small, report = shrink(model, inputs, report=True)
    assert small.head.weight is small.emb.weight
    assert small.encoder.layers[0].linear1.out_features == 24 - len(ffn[:24:5])
    assert len(report.removed) == len(ffn[::5])
    with torch.no_grad():
        assert_equal_outputs(expected, small(*inputs))


def test_tied_lm_after_per_weight_pruning_shrinks_unread_and_constant_units():
    model, inputs = lm_and_inputs()
    layer = model.encoder.layers[1]
    with torch.no_grad():   # per-weight pruning that leaves two units without a job
        layer.linear2.weight[:, 3] = 0    # unit 3: every outgoing weight pruned (unread)
        layer.linear1.weight[5, :] = 0    # unit 5: every incoming weight pruned (relu(bias) constant)
        model.emb.weight[4, 2] = 0        # a pruned entry of the tied table stays in place
        expected = model(*inputs)
    small, report = shrink(model, inputs, report=True)
    assert small.head.weight is small.emb.weight and small.emb.weight.shape == (40, 16)
    assert small.emb.weight[4, 2] == 0
    assert small.encoder.layers[1].linear1.out_features == 22
    assert len(report.unread) == 1 and len(report.folded) == 1
    with torch.no_grad():
        assert_equal_outputs(expected, small(*inputs))


def test_channel_pruner_runs_on_a_tied_lm():
    model, inputs = lm_and_inputs()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    pruner = MacKayPruner(model, optimizer, num_data=64, batch_size=2, granularity="channel",
                          example_inputs=inputs)
    kinds = [g.kind for g in pruner.channel.groups]
    assert (kinds.count("channel"), kinds.count("head")) == (48, 8)   # feed-forward units, 4 heads x 2
    assert {m.name for g in pruner.channel.groups for m in g.members} >= {
        "encoder.layers.0.linear1.weight", "encoder.layers.1.linear2.weight"}


class TiedIntoAttention(nn.Module):
    """A Linear whose weight is an nn.MultiheadAttention's in_proj_weight: shrink cannot change
    the attention's embed_dim, so a channel the tie reaches there must stay."""

    def __init__(self, e=8, heads=2):
        super().__init__()
        self.pre = nn.Linear(5, e)
        self.side = nn.Linear(e, 3 * e)
        self.mha = nn.MultiheadAttention(e, heads, batch_first=True)
        self.mha.in_proj_weight = self.side.weight
        self.out = nn.Linear(e, 3)
        self.out2 = nn.Linear(3 * e, 3)

    def forward(self, x):
        h = self.pre(x)
        return self.out(self.mha(h, h, h, need_weights=False)[0]) + self.out2(torch.relu(self.side(h)))


def test_a_group_whose_tie_reaches_an_attention_module_is_kept_with_the_reason():
    torch.manual_seed(0)
    model = TiedIntoAttention().double().eval()
    inputs = (torch.randn(2, 4, 5, dtype=torch.float64),)
    groups = channel_groups(model, inputs)
    group = next(g for g in groups if any(m.name == "pre.weight" for m in g.members))
    assert {(m.name, m.dim) for m in group.members} >= {("pre.weight", 0), ("side.weight", 1)}
    group.zero_(model)
    with torch.no_grad():
        expected = model(*inputs)
    small, report = shrink(model, inputs, report=True)
    assert report.removed == [] and len(report.kept_zero) == 1
    reason = report.kept_zero[0][1]
    assert "'mha' is an nn.MultiheadAttention" in reason and "tied" in reason and "'side' and 'mha'" in reason
    assert small.mha.in_proj_weight is small.side.weight
    with torch.no_grad():
        assert_equal_outputs(expected, small(*inputs))


def test_a_cut_that_would_break_a_tie_is_refused(monkeypatch):
    """The last check of shrink: should a cut ever put two tensors where the input model had one,
    shrink raises naming the tied modules instead of returning a model that trains them apart."""
    torch.manual_seed(0)
    model = Tied().double().eval()
    inputs = tokens()
    channel_groups(model, inputs)[1].zero_(model)

    def slice_one_holder(small, name, dim, indices):   # shrink's cut before ties were handled
        path, _, local = name.rpartition(".")
        module = small.get_submodule(path)
        old = getattr(module, local)
        keep = torch.tensor([i for i in range(old.shape[dim]) if i not in indices])
        new = old.detach().index_select(dim, keep)
        module._parameters[local] = nn.Parameter(new)
        if name == "emb.weight":   # the other holder gets an equal copy: same outputs, no tie
            small.head._parameters["weight"] = nn.Parameter(new.clone())

    monkeypatch.setattr(shrink_module, "_slice", slice_one_holder)
    with pytest.raises(CouplingError, match="the tie between 'emb' and 'head' would be broken"):
        shrink(model, inputs)


# -- grouped convolutions --------------------------------------------------------------------
def grouped_net(conv, pool):
    return nn.Sequential(conv(4, 16, 3), nn.ReLU(), conv(16, 16, 3, groups=4), nn.ReLU(), pool(1),
                         nn.Flatten(), nn.Linear(16, 3))


GROUPED = {"2d": (nn.Conv2d, nn.AdaptiveAvgPool2d, (2, 4, 9, 9)),
           "1d": (nn.Conv1d, nn.AdaptiveAvgPool1d, (2, 4, 9))}


@pytest.mark.parametrize("kind", GROUPED)
def test_grouped_conv_groups_are_positions_inside_the_conv_groups(kind):
    conv, pool, shape = GROUPED[kind]
    groups = channel_groups(grouped_net(conv, pool), (torch.randn(*shape),))
    # 4 conv groups of 4 channels: input position j is channels j, 4+j, 8+j, 12+j (weight column j)
    expected = [entries(("0.weight", 0, range(j, 16, 4)), ("0.bias", 0, range(j, 16, 4)), ("2.weight", 1, [j]))
                for j in range(4)]
    expected += [entries(("2.weight", 0, range(k, 16, 4)), ("2.bias", 0, range(k, 16, 4)),
                         ("6.weight", 1, range(k, 16, 4))) for k in range(4)]
    assert as_sets(groups) == expected
    assert all(g.fixed is None for g in groups)


@pytest.mark.parametrize("kind", GROUPED)
def test_grouped_conv_shrinks_every_conv_group_alike(kind):
    conv, pool, shape = GROUPED[kind]
    torch.manual_seed(0)
    model = grouped_net(conv, pool).double().eval()
    inputs = (torch.randn(*shape, dtype=torch.float64),)
    groups = channel_groups(model, inputs)
    groups[1].zero_(model)   # input position 1 of every conv group
    groups[6].zero_(model)   # output position 2 of every conv group
    with torch.no_grad():
        expected = model(*inputs)
    small, report = shrink(model, inputs, report=True)
    grouped = small[2]
    assert (grouped.groups, grouped.in_channels, grouped.out_channels) == (4, 12, 12)
    assert grouped.weight.shape[:2] == (12, 3) and small[0].out_channels == 12 and small[6].in_features == 12
    # an independent reference: the grouped conv built by hand from the kept filters
    rows, cols = [o for o in range(16) if o % 4 != 2], [0, 2, 3]
    by_hand = conv(12, 12, 3, groups=4).double()
    with torch.no_grad():
        by_hand.weight.copy_(model[2].weight[rows][:, cols])
        by_hand.bias.copy_(model[2].bias[rows])
        x = torch.randn(2, 12, *shape[2:], dtype=torch.float64)
        assert_equal_outputs(by_hand(x), grouped(x))
        assert_equal_outputs(expected, small(*inputs))
    assert len(report.removed) == 2
    program = torch.export.export(small, inputs)
    with torch.no_grad():
        assert_equal_outputs(expected, program.module()(*inputs))


def test_depthwise_conv_with_a_channel_multiplier_loses_whole_conv_groups():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Conv2d(4, 8, 3, groups=4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(8, 2)).double().eval()
    inputs = (torch.randn(2, 3, 6, 6, dtype=torch.float64),)
    groups = channel_groups(model, inputs)
    assert as_sets(groups) == [entries(("0.weight", 0, [c]), ("0.bias", 0, [c]), ("1.weight", 0, [2 * c, 2 * c + 1]),
                                       ("1.bias", 0, [2 * c, 2 * c + 1]), ("5.weight", 1, [2 * c, 2 * c + 1]))
                               for c in range(4)]
    groups[2].zero_(model)
    with torch.no_grad():
        expected = model(*inputs)
        small = shrink(model, inputs)
        assert_equal_outputs(expected, small(*inputs))
    assert (small[1].groups, small[1].in_channels, small[1].out_channels) == (3, 3, 6)


def test_channel_pruner_finds_the_grouped_conv_groups():
    model = grouped_net(nn.Conv2d, nn.AdaptiveAvgPool2d)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    pruner = MacKayPruner(model, copy.copy(optimizer), num_data=64, batch_size=2, granularity="channel",
                          example_inputs=torch.randn(2, 4, 9, 9))
    assert len(pruner.channel.groups) == 8


class ResNeXtLike(nn.Module):
    """Bottleneck blocks with a grouped 3x3 conv, BatchNorm and residual additions, then a depthwise
    conv with channel multiplier 2 on the residual stream."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.blocks = nn.ModuleList([self.block(16, 16, 4), self.block(16, 8, 2)])
        self.dw = nn.Conv2d(16, 32, 3, groups=16)
        self.fc = nn.Linear(32, 5)

    @staticmethod
    def block(c, mid, groups):
        return nn.Sequential(nn.Conv2d(c, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(),
                             nn.Conv2d(mid, mid, 3, padding=1, groups=groups, bias=False), nn.BatchNorm2d(mid),
                             nn.ReLU(), nn.Conv2d(mid, c, 1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x):
        x = torch.relu(self.stem(x))
        for block in self.blocks:
            x = torch.relu(x + block(x))
        return self.fc(self.dw(x).mean((2, 3)))


@pytest.mark.parametrize("round_to", [1, 2])
def test_resnext_like_network_shrinks_exactly(round_to):
    torch.manual_seed(0)
    model = ResNeXtLike().double().eval()
    with torch.no_grad():   # BatchNorm statistics and affine terms as after training, not identity
        for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
            bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2)
            bn.weight.uniform_(0.5, 1.5), bn.bias.uniform_(-1, 1)
    inputs = (torch.randn(2, 3, 8, 8, dtype=torch.float64),)
    groups = channel_groups(model, inputs)
    for g in groups[::3]:
        g.zero_(model)
    with torch.no_grad():
        expected = model(*inputs)
    small, report = shrink(model, inputs, round_to=round_to, report=True)
    assert report.params_after < report.params_before and not report.kept_zero
    grouped = [small.blocks[0][3], small.blocks[1][3]]
    assert [c.groups for c in grouped] == [4, 2]
    assert all(c.in_channels % c.groups == c.out_channels % c.groups == c.out_channels % round_to == 0
               for c in grouped)
    assert small.dw.out_channels == 2 * small.dw.groups == 2 * small.dw.in_channels
    with torch.no_grad():
        assert_equal_outputs(expected, small(*inputs))


class SharedLinear(nn.Module):
    """One Linear called on two branches: its input column j reads channel j of both."""

    def __init__(self):
        super().__init__()
        self.p1, self.p2 = nn.Linear(6, 5), nn.Linear(6, 5)
        self.shared = nn.Linear(5, 4)
        self.out = nn.Linear(4, 2)

    def forward(self, x):
        return self.out(torch.relu(self.shared(torch.relu(self.p1(x))) + self.shared(torch.tanh(self.p2(x)))))


def test_a_module_called_twice_couples_the_channels_both_calls_read():
    torch.manual_seed(0)
    model = SharedLinear().double().eval()
    inputs = (torch.randn(3, 6, dtype=torch.float64),)
    groups = channel_groups(model, inputs)
    assert as_sets(groups) == [entries(("p1.weight", 0, [j]), ("p1.bias", 0, [j]), ("p2.weight", 0, [j]),
                                       ("p2.bias", 0, [j]), ("shared.weight", 1, [j])) for j in range(5)] + [
        entries(("shared.weight", 0, [k]), ("shared.bias", 0, [k]), ("out.weight", 1, [k])) for k in range(4)]
    groups[2].zero_(model)
    with torch.no_grad():
        expected = model(*inputs)
        small = shrink(model, inputs)
        assert_equal_outputs(expected, small(*inputs))
    assert (small.p1.out_features, small.p2.out_features, small.shared.in_features) == (4, 4, 4)
