"""examples_of_rows: a graph batch's nodes (several rows of a layer's input per example) under
ef-exact and fisher-mc, against float64 per-graph references (one graph at a time)."""
import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from mackay_ext import MacKayPruner
from mackay_ext.curvature import FisherAccumulator
from mackay_ext.row_examples import RowExamples


class GraphNet(nn.Module):
    """Message passing by index_add_ over an edge list, an edge-feature layer, a layer shared by
    node rows and pooled graph rows, sum pooling, a head: plain PyTorch, as a GNN user writes it."""

    def __init__(self, features=5, hidden=7, outputs=3):
        super().__init__()
        self.node = nn.Linear(features, hidden)
        self.edge = nn.Linear(2, hidden, bias=False)
        self.shared = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, outputs)

    def forward(self, x, edges, edge_features, batch, graphs):
        source, target = edges
        h = torch.tanh(self.node(x))
        messages = h[source] * torch.sigmoid(self.edge(edge_features))
        h = torch.tanh(self.shared(h + torch.zeros_like(h).index_add_(0, target, messages)))
        pooled = torch.zeros(graphs, h.shape[1], dtype=h.dtype).index_add_(0, batch, h)
        return self.head(torch.tanh(self.shared(pooled)))


def random_batch(sizes, features=5, seed=0):
    """Graphs of the given node counts (0: an empty graph), concatenated as a GNN library does."""
    generator = torch.Generator().manual_seed(seed)
    xs, edges, batch, offset = [], [], [], 0
    for graph, nodes in enumerate(sizes):
        xs.append(torch.randn(nodes, features, generator=generator, dtype=torch.float64))
        if nodes:
            edges.append(torch.randint(0, nodes, (2, 2 * nodes), generator=generator) + offset)
        batch.append(torch.full((nodes,), graph))
        offset += nodes
    edges = torch.cat(edges, 1)
    edge_features = torch.randn(edges.shape[1], 2, generator=generator, dtype=torch.float64)
    return torch.cat(xs), edges, edge_features, torch.cat(batch)


def graph_of(batch_data, graph):
    """One graph of a batch, as a batch of its own."""
    x, edges, edge_features, batch = batch_data
    nodes = (batch == graph).nonzero().squeeze(1)
    keep = (batch[edges[0]] == graph)
    renumber = torch.full((batch.numel(),), -1)
    renumber[nodes] = torch.arange(nodes.numel())
    return x[nodes], renumber[edges[:, keep]], edge_features[keep], torch.zeros(nodes.numel(), dtype=torch.long)


def per_graph_reference(model, batch_data, targets, loss, weights=None):
    """Sum over graphs of each parameter's squared gradient of the graph's own loss; `weights`:
    a probability per (graph, class), the Fisher's expectation over labels."""
    total = {name: torch.zeros_like(param) for name, param in model.named_parameters()}
    for graph in range((targets if weights is None else weights).shape[0]):
        output = model(*graph_of(batch_data, graph), 1)
        labels = [(targets[graph:graph + 1], 1.0)] if weights is None else \
            [(torch.tensor([c]), float(weights[graph, c])) for c in range(weights.shape[1])]
        for label, weight in labels:
            grads = torch.autograd.grad(loss(output, label), list(model.parameters()), retain_graph=True)
            for (name, _), grad in zip(model.named_parameters(), grads):
                total[name] += weight * grad.square()
    return total


@pytest.mark.parametrize("sizes", [[4, 1, 9, 3], [2, 0, 5], [6], [3, 4, 2, 3], [40, 1, 2, 0, 3, 1, 17, 9]],
                         ids=["odd", "empty-graph", "one-graph", "alike", "skewed"])
def test_ef_exact_squares_each_graph(sizes):
    """Node rows, edge rows (a second index) and pooled rows through one shared layer."""
    model = GraphNet().double()
    data = random_batch(sizes)
    graphs, targets = len(sizes), torch.randint(0, 3, (len(sizes),))
    x, edges, edge_features, batch = data
    acc = FisherAccumulator(model)
    acc.examples_of_rows(batch, batch[edges[0]], num_examples=graphs)
    F.cross_entropy(model(x, edges, edge_features, batch, graphs), targets).backward()
    got = {name: acc.curvature(param) * acc.counts[param] for name, param in model.named_parameters()}
    assert acc.num_examples == graphs
    acc.detach()
    expected = per_graph_reference(model, data, targets, F.cross_entropy)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-10, atol=1e-13)


def test_fisher_mc_samples_each_graph():
    model = GraphNet().double()
    data = random_batch([3, 6, 2, 5])
    x, edges, edge_features, batch = data
    acc = FisherAccumulator(model, mode="fisher-mc")
    acc.examples_of_rows(batch, batch[edges[0]])
    with acc.capture_mc():
        logits = model(x, edges, edge_features, batch, 4)
    acc.accumulate_mc_from(logits, num_samples=600)
    got = {name: acc.curvature(param) * acc.counts[param] / 600 for name, param in model.named_parameters()}
    acc.detach()
    expected = per_graph_reference(model, data, None, F.cross_entropy, torch.softmax(logits.detach(), 1))
    for name in expected:   # (sampling noise; node rows read as examples were 0.02-0.05x)
        assert abs(float(got[name].sum() / expected[name].sum()) - 1) < 0.15, name


def test_examples_of_unlike_size_are_laid_out_in_groups():
    """One graph of 200 nodes among 3-node ones: each group of like size is padded to its own
    largest, at most twice its rows (all padded to the largest: 67x); an empty graph is in one."""
    sizes = [200] + [3] * 30 + [0, 1, 2, 5, 60]
    batch = torch.cat([torch.full((n,), g) for g, n in enumerate(sizes)])
    edges = torch.repeat_interleave(batch, 2)   # (an edge index of other counts, grouped alike)
    rows = RowExamples((batch, edges), None, "test")
    for index in (batch, edges):
        layout = rows.layout(index.numel())
        members = torch.cat([group.members for group in layout.groups])
        assert sorted(members.tolist()) == list(range(len(sizes)))   # each example in one group
        padded = sum(group.examples * group.most for group in layout.groups)
        assert padded <= 2 * index.numel() + len(layout.groups), (padded, index.numel())
        values = torch.arange(index.numel(), dtype=torch.float64)
        for number, group in enumerate(layout.groups):   # each example's rows, in order, then zeros
            spread = layout.spread(values, number)
            for place, example in enumerate(group.members.tolist()):
                own = values[index == example]
                assert torch.equal(spread[place, :own.numel()], own) and not spread[place, own.numel():].any()
    alike = RowExamples((torch.tensor([0, 0, 1, 1, 1, 2]),), None, "test").layout(6)
    assert [group.members for group in alike.groups] == [None]


@pytest.mark.parametrize("mode", ["ef-exact", "fisher-mc"])
def test_float32_graphs_of_unlike_size_against_float64(mode):
    """The kernels' float32 path on grouped rows (the fused sequence kernel), skewed graphs."""
    model = GraphNet()
    sizes = [30, 2, 1, 0, 3, 2, 11]
    data = random_batch(sizes, seed=3)
    x, edges, edge_features, batch = data
    acc = FisherAccumulator(model, mode=mode)
    acc.examples_of_rows(batch, batch[edges[0]], num_examples=len(sizes))
    targets = torch.randint(0, 3, (len(sizes),))
    if mode == "fisher-mc":
        torch.manual_seed(0)
        with acc.capture_mc():
            logits = model(x.float(), edges, edge_features.float(), batch, len(sizes))
        acc.accumulate_mc_from(logits, num_samples=1)
        torch.manual_seed(0)   # the same labels, drawn as the accumulator drew them
        targets = torch.multinomial(torch.softmax(logits.detach().double(), 1), 1).squeeze(1)
    else:
        F.cross_entropy(model(x.float(), edges, edge_features.float(), batch, len(sizes)), targets).backward()
    got = {name: (acc.curvature(param) * acc.counts[param]).double() for name, param in model.named_parameters()}
    acc.detach()
    expected = per_graph_reference(model.double(), data, targets, F.cross_entropy)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=2e-4, atol=1e-7)


def test_two_batches_with_their_own_indices_in_one_backward_are_refused():
    """Two forwards, each after its own examples_of_rows, then one backward of the summed losses:
    which rows are one example cannot be told (the two layouts were read as one batch's)."""
    model = GraphNet().double()
    acc = FisherAccumulator(model)
    losses = []
    for sizes in ([3, 4], [2, 6]):
        x, edges, edge_features, batch = random_batch(sizes)
        acc.examples_of_rows(batch, batch[edges[0]])
        logits = model(x, edges, edge_features, batch, len(sizes))
        losses.append(F.cross_entropy(logits, torch.zeros(len(sizes), dtype=torch.long)))
    with pytest.raises(RuntimeError, match=r"on the rows of two batches, each given its own examples_of_rows"):
        sum(losses).backward()


def test_each_batch_needs_its_own_index_and_every_size_one():
    model = GraphNet().double()
    x, edges, edge_features, batch = random_batch([3, 4])
    acc = FisherAccumulator(model)
    acc.examples_of_rows(batch)   # (no edge index: the edge layer's rows fit none)
    with pytest.raises(RuntimeError, match=r"edge \(Linear\) got an input of 14 rows.*indices of 7 rows over 2"):
        model(x, edges, edge_features, batch, 2)
    acc.examples_of_rows(batch, batch[edges[0]])
    F.cross_entropy(model(x, edges, edge_features, batch, 2), torch.tensor([0, 1])).backward()
    with pytest.raises(RuntimeError, match="give each batch's index before its forward"):
        model(x, edges, edge_features, batch, 2)
    acc.examples_of_rows(None)   # rows are examples again
    with pytest.raises(RuntimeError, match=r"uses of shared \(Linear\).*\[2, 7\] rows.*examples_of_rows"):
        F.cross_entropy(model(x, edges, edge_features, batch, 2), torch.tensor([0, 1])).backward()


@pytest.mark.parametrize("indices, kwargs, match", [
    ((torch.tensor([0.0, 1.0]),), {}, "index 0 must be a 1-D integer tensor.*float32"),
    ((torch.zeros(2, 2, dtype=torch.long),), {}, "1-D integer tensor.*2-D"),
    ((torch.tensor([0, -1]),), {}, r"in \[0, num_examples=1\).*from -1 to 0"),
    ((torch.tensor([0, 3]),), {"num_examples": 2}, "from 0 to 3"),
    ((torch.tensor([0, 1]),), {"num_examples": -1}, "an int >= 0"),
    ((torch.tensor([1, 0, 0]),), {"num_examples": 3}, "could be that index's or one row an example"),
    ((torch.tensor([0, 0, 1]), torch.tensor([0, 1, 1])), {}, "two indices of 3 rows that differ"),
    (("batch",), {}, "1-D integer tensor.*got a str"),
    ((), {}, "give the example of each row"),
])
def test_bad_indices_are_named(indices, kwargs, match):
    acc = FisherAccumulator(GraphNet())
    with pytest.raises((TypeError, ValueError), match=match):
        acc.examples_of_rows(*indices, **kwargs)


def test_a_conv_on_grouped_rows_is_refused():
    model = nn.Sequential(nn.Conv1d(2, 3, 1), nn.Flatten(), nn.Linear(3, 2))
    acc = FisherAccumulator(model)
    acc.examples_of_rows(torch.tensor([0, 0, 1]))
    with pytest.raises(RuntimeError, match=r"0 \(Conv1d\) got an input of rows grouped.*covers nn.Linear"):
        model(torch.randn(3, 2, 1))


def test_pruner_reads_graphs_as_its_examples():
    """A graph-level regression of K = 6 outputs (num_data and batch_size count values) gets its K
    (node rows read as examples lost it), and the batch-size check counts graphs under ef-batch."""
    torch.manual_seed(0)
    data = random_batch([3, 5, 2, 4])
    x, edges, edge_features, batch = data
    model = GraphNet(outputs=6)
    optimizer = torch.optim.SGD(model.parameters(), 0.0)
    pruner = MacKayPruner(model, optimizer, num_data=40 * 6, batch_size=4 * 6, curvature="ef-exact")
    pruner.examples_of_rows(batch, batch[edges[0]])
    F.mse_loss(model(x.float(), edges, edge_features.float(), batch, 4), torch.randn(4, 6)).backward()
    optimizer.step()
    assert pruner.accumulator.num_examples == 4 and pruner._values_per_example() == 6.0
    pruner.detach()

    model = GraphNet()
    optimizer = torch.optim.Adam(model.parameters(), 1e-3)
    pruner = MacKayPruner(model, optimizer, num_data=400, batch_size=2, curvature="ef-batch")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            optimizer.zero_grad()
            for part in ([3, 5], [2, 4]):   # two micro-batches of 2 graphs
                x, edges, edge_features, batch = random_batch(part)
                pruner.examples_of_rows(batch, batch[edges[0]])
                (F.cross_entropy(model(x.float(), edges, edge_features.float(), batch, 2), torch.tensor([0, 1]))
                 / 2).backward()
            optimizer.step()
        pruner.update()
    said = [str(w.message) for w in caught if "micro-batch" in str(w.message)]
    assert len(said) == 1 and "pass batch_size=4" in said[0]


def test_a_one_shaped_weight_of_ones_own_is_named_unless_it_reads_as_an_embedding():
    """A GAT layer's attention vectors (1, heads, channels) get no prior (read as biases) and a
    warning says so; a ViT's pos_embed and cls_token, the same shapes, get neither."""

    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 6, bias=False)
            self.att_src = nn.Parameter(torch.randn(1, 2, 3))
            self.pos_embed = nn.Parameter(torch.zeros(1, 5, 6))
            self.cls_token = nn.Parameter(torch.zeros(1, 1, 6))

    model = Attention()
    with pytest.warns(UserWarning, match=r"no prior on att_src: \(1, \.\.\.\) parameters.*GAT layer") as caught:
        pruner = MacKayPruner(model, torch.optim.Adam(model.parameters()), num_data=10, batch_size=2)
    assert not any("pos_embed" in str(w.message) or "cls_token" in str(w.message) for w in caught)
    assert list(pruner.targets) == ["lin"]
    pruner.detach()
    named = MacKayPruner(model, torch.optim.Adam(model.parameters()), num_data=10, batch_size=2,
                         layers=["lin", "att_src"])
    assert sorted(named.targets) == ["att_src", "lin"]


def test_a_graph_batch_run_as_one_sequence_through_a_transformer_layer():
    """Graph transformers run a batch's nodes as one unbatched sequence with a block-diagonal
    mask: a Transformer layer's feed-forward layers then group its rows by examples_of_rows
    (read as one example, 0.10x)."""
    torch.manual_seed(0)
    sizes, width = [3, 2, 4], 6
    batch = torch.cat([torch.full((n,), g) for g, n in enumerate(sizes)])
    pre, layer, head = nn.Linear(4, width).double(), nn.TransformerEncoderLayer(
        width, 2, 8, dropout=0.0, batch_first=True).double(), nn.Linear(width, 3).double()
    model = nn.ModuleDict({"pre": pre, "layer": layer, "head": head})

    def logits(x, batch, graphs):
        mask = batch[:, None] != batch[None, :]   # (True: no attention across graphs)
        h = layer(pre(x), src_mask=mask)
        return head(torch.zeros(graphs, width, dtype=h.dtype).index_add_(0, batch, h))

    x, y = torch.randn(len(batch), 4, dtype=torch.float64), torch.randint(0, 3, (len(sizes),))
    acc = FisherAccumulator(model)
    acc.examples_of_rows(batch)
    F.cross_entropy(logits(x, batch, len(sizes)), y).backward()
    got = {name: acc.curvature(param) * acc.counts[param] for name, param in model.named_parameters()
           if acc.saw(param)}
    acc.detach()
    assert {"layer.linear1.weight", "layer.linear2.bias", "pre.weight", "head.weight"} <= set(got)
    for name, param in model.named_parameters():
        if name not in got:
            continue
        expected = torch.zeros_like(param)
        for g in range(len(sizes)):
            nodes = batch == g
            one = torch.zeros(int(nodes.sum()), dtype=torch.long)
            (grad,) = torch.autograd.grad(F.cross_entropy(logits(x[nodes], one, 1), y[g:g + 1]), param)
            expected += grad.square()
        torch.testing.assert_close(got[name], expected, rtol=1e-9, atol=1e-14)
