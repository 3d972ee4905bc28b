"""Cost of the exact per-graph curvature of a graph batch (examples_of_rows) relative to a plain
forward+backward, one process, round-robin (conftest.interleaved):

  plain             the training step alone
  ef-exact          FisherAccumulator + examples_of_rows(batch): graphs of like size laid out
                    together, each group padded to its own largest (row_examples.py)
  one group         the same with every graph padded to the batch's largest (the layout before
                    the grouping; the library's own code with its grouping switched off)
  per-graph loop    what a user writes without the library: one forward and backward per graph,
                    each parameter's gradient squared and summed (torch.func's vmap needs one size)

Batches: 64 graphs of 15-25 nodes ("alike"), and one 3,000-node graph among 150 of 20 nodes
("skewed"), each node with 2 edges.

Run:  pytest bench/bench_graph_curvature.py --benchmark-only
"""
from unittest import mock

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from conftest import interleaved
from mackay_ext.curvature import FisherAccumulator

FEATURES, HIDDEN, CLASSES = 32, 64, 10
BATCHES = {"alike": lambda g: torch.randint(15, 26, (64,), generator=g).tolist(),
           "skewed": lambda g: [3000] + [20] * 150}


class GraphNet(nn.Module):
    """Two message-passing layers over an edge list (sum of neighbours), sum pooling, a head."""

    def __init__(self):
        super().__init__()
        self.layer1, self.layer2 = nn.Linear(FEATURES, HIDDEN), nn.Linear(HIDDEN, HIDDEN)
        self.head = nn.Linear(HIDDEN, CLASSES)

    def forward(self, x, edges, batch, graphs):
        source, target = edges
        h = x
        for layer in (self.layer1, self.layer2):
            h = torch.relu(layer(h + torch.zeros_like(h).index_add_(0, target, h[source])))
        return self.head(torch.zeros(graphs, h.shape[1], dtype=h.dtype).index_add_(0, batch, h))


def graph_batch(sizes, generator):
    xs, edges, batch, offset = [], [], [], 0
    for graph, nodes in enumerate(sizes):
        xs.append(torch.randn(nodes, FEATURES, generator=generator))
        edges.append(torch.randint(0, nodes, (2, 2 * nodes), generator=generator) + offset)
        batch.append(torch.full((nodes,), graph))
        offset += nodes
    return torch.cat(xs), torch.cat(edges, 1), torch.cat(batch)


def make_step(implementation, x, edges, batch, y):
    torch.manual_seed(0)
    model, graphs = GraphNet(), len(y)
    if implementation == "per-graph loop":
        starts = torch.cumsum(torch.bincount(batch, minlength=graphs), 0).tolist()
        bounds = list(zip([0] + starts[:-1], starts))

        def step():
            model.zero_grad(set_to_none=True)
            F.cross_entropy(model(x, edges, batch, graphs), y).backward()   # the training gradient
            squares = [torch.zeros_like(p) for p in model.parameters()]
            for graph, (start, end) in enumerate(bounds):
                own = (edges[0] >= start) & (edges[0] < end)
                logits = model(x[start:end], edges[:, own] - start, torch.zeros(end - start, dtype=torch.long), 1)
                grads = torch.autograd.grad(F.cross_entropy(logits, y[graph:graph + 1]), list(model.parameters()))
                for total, g in zip(squares, grads):
                    total.add_(g.square())
            return squares
        return step
    accumulator = FisherAccumulator(model) if implementation != "plain" else None

    def step():
        model.zero_grad(set_to_none=True)
        if accumulator is not None:
            accumulator.examples_of_rows(batch, num_examples=graphs)
        F.cross_entropy(model(x, edges, batch, graphs), y).backward()

    if implementation != "one group":
        return step

    def padded_step():
        with mock.patch("mackay_ext.row_examples._groups", lambda counts: [None]):
            step()
    return padded_step


@pytest.mark.parametrize("kind", list(BATCHES))
def test_graph_curvature_overhead(benchmark, record, kind):
    generator = torch.Generator().manual_seed(0)
    sizes = BATCHES[kind](generator)
    x, edges, batch = graph_batch(sizes, generator)
    y = torch.randint(0, CLASSES, (len(sizes),), generator=generator)
    names = ["plain", "ef-exact", "one group", "per-graph loop"]
    steps = {name: make_step(name, x, edges, batch, y) for name in names}
    best = interleaved(benchmark, steps, rounds=8 if kind == "skewed" else 20)
    row = f"cpu {kind}: {len(sizes)} graphs, {batch.numel()} nodes (largest {max(sizes)})"
    for name, seconds in best.items():
        record("graph_curvature", row, name, seconds, baseline="plain")
