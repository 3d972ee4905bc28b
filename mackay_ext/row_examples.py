"""Rows of a layer's input that belong to one example: a graph batch's nodes.

The exact curvature (ef-exact, fisher-mc) squares each example's gradient of a layer and reads
the rows of the layer's input (its first dimension) as the examples. A graph network's batch
concatenates its graphs' nodes: the message-passing layers see [nodes, F], whose rows are nodes,
and only the pooled head sees a row per graph. Squaring each node's gradient instead of each
graph's (the sum over its nodes), rescaled by the nodes where the loss averages over graphs,
read a new user's GIN 3.1x the per-graph curvature under ef-exact and 0.04x under fisher-mc,
with no word. `examples_of_rows(index)` says which example each row of such inputs belongs to
(PyG's `batch` vector, node -> graph); a use of a layer on those rows is then laid out
[examples, most rows of one, ...], each example's rows followed by zeros, which every path of the
accumulator reads as positions whose gradients add up (a sequence's tokens): each example's
gradient exactly (the zero rows add nothing). Where examples differ much in size, padding every
one to the largest multiplied the work and memory (one 3,000-node graph among 20-node ones: 45x
the rows); the examples are then laid out in groups of like size, each padded to its own
largest (at most twice the rows there are), and the groups' squares add up: each example is in
one group.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RowGroup:
    """Where each row of one group of examples goes in its [examples, most, ...] layout."""
    members: torch.Tensor | None   # the group's examples, in its order (None: all of the batch's)
    order: torch.Tensor      # the group's rows, sorted by example (stable)
    example: torch.Tensor    # the place of each sorted row's example in the group
    position: torch.Tensor   # its place among its example's rows
    examples: int
    most: int                # rows of the group's largest example


@dataclass(frozen=True)
class RowLayout:
    """Where each row of an input goes: the batch's examples in groups (RowExamples.groups)."""
    groups: tuple[RowGroup, ...]
    examples: int
    index: torch.Tensor      # the index given, on the CPU (two indices of one length are told apart)
    batch: object            # the examples_of_rows call it came from (its RowExamples)

    def spread(self, rows: torch.Tensor, group: int = 0) -> torch.Tensor:
        """[rows, ...] -> [examples of the group, most, ...], zeros where an example has fewer rows."""
        part = self.groups[group]
        out = rows.new_zeros((part.examples, part.most, *rows.shape[1:]))
        order, example, position = (t.to(rows.device) for t in (part.order, part.example, part.position))
        out[example, position] = rows[order]
        return out


class RowExamples:
    """The examples of a batch whose layer inputs hold several rows per example.

    Args:
        indices: one or more 1-D integer tensors, each mapping the rows of one kind of layer
            input to their example (a graph batch's node -> graph; edge -> graph for layers on
            edge features). An input with as many rows as an index is laid out by it.
        num_examples: the examples of the batch (graphs); default: the largest index + 1. An input
            with that many rows is read a row an example (a pooled head).
    """

    def __init__(self, indices: tuple[torch.Tensor, ...], num_examples: int | None, where: str):
        if not indices:
            raise TypeError(f"{where}: give the example of each row, a 1-D integer tensor per kind of input "
                            "(a graph batch's node -> graph index), or None to read rows as examples again")
        for number, index in enumerate(indices):
            if not isinstance(index, torch.Tensor) or index.dim() != 1 or index.is_floating_point() \
                    or index.is_complex() or index.dtype == torch.bool:
                got = (f"a {index.dim()}-D {index.dtype} tensor" if isinstance(index, torch.Tensor)
                       else f"a {type(index).__name__}")
                raise TypeError(f"{where}: index {number} must be a 1-D integer tensor giving each row's example "
                                f"(a graph batch's node -> graph), got {got}")
        largest = max((int(index.max()) for index in indices if index.numel()), default=-1)
        smallest = min((int(index.min()) for index in indices if index.numel()), default=0)
        if num_examples is None:
            num_examples = largest + 1
        elif isinstance(num_examples, bool) or not isinstance(num_examples, int) or num_examples < 0:
            raise ValueError(f"{where}: num_examples must be a count of examples (an int >= 0), got {num_examples!r}")
        if smallest < 0 or largest >= num_examples:
            raise ValueError(f"{where}: the indices must lie in [0, num_examples={num_examples}), got values from "
                             f"{smallest} to {largest}")
        self.examples = num_examples
        self.layouts: dict[int, RowLayout] = {}
        # one grouping of the examples for every kind of input, read off the first (the nodes): a
        # layer used on nodes and on edges sums each example's gradients over both in one group
        self.groups = _groups(torch.bincount(indices[0].cpu(), minlength=num_examples) if num_examples else
                              torch.zeros(0, dtype=torch.long))
        for index in indices:
            rows = index.numel()
            if rows == num_examples and rows and not torch.equal(index.cpu(), torch.arange(rows)):
                raise ValueError(f"{where}: an index of {rows} rows over {num_examples} examples: an input of "
                                 f"{rows} rows could be that index's or one row an example, which cannot be told "
                                 "apart; pad the batch or leave this batch's curvature out")
            if rows in self.layouts and not torch.equal(self.layouts[rows].index, index.cpu()):
                raise ValueError(f"{where}: two indices of {rows} rows that differ: an input of {rows} rows could "
                                 "be either's")
            if rows != num_examples:
                self.layouts[rows] = _layout(index, num_examples, self.groups, self)

    def layout(self, rows: int) -> RowLayout | None:
        """The layout of an input of `rows` rows; None where each row is an example. KeyError for a
        size no index has."""
        if rows == self.examples:
            return None
        return self.layouts[rows]

    def sizes(self) -> str:
        return ", ".join(str(rows) for rows in self.layouts) or "none"


@dataclass(frozen=True)
class GroupedRows:
    """A captured input whose rows the layout groups into examples."""
    rows: torch.Tensor
    layout: RowLayout


def _groups(counts: torch.Tensor) -> list[torch.Tensor | None]:
    """The examples to lay out together: [None] (all at once) where padding every example to the
    largest at most doubles the rows; else the examples of at most 1, 2, 3-4, 5-8, ... rows
    apart (one of no rows with those of one: a pooled head's row of an empty graph still has
    a gradient)."""
    rows, largest = int(counts.sum()), int(counts.max()) if counts.numel() else 0
    if counts.numel() * largest <= 2 * rows:
        return [None]
    level = torch.ceil(torch.log2(counts.clamp(min=1).double())).long()   # 0-1 -> 0, 2 -> 1, 3-4 -> 2, ...
    return [torch.nonzero(level == value).squeeze(1) for value in torch.unique(level).tolist()]


def _layout(index: torch.Tensor, examples: int, groups: list[torch.Tensor | None], batch: object) -> RowLayout:
    parts = []
    for group in groups:
        if group is None:
            slot, members = index, examples
        else:   # each example's place in its group, -1 outside it
            place = torch.full((examples,), -1, dtype=torch.long)
            place[group] = torch.arange(group.numel())
            slot, members = place.to(index.device)[index], group.numel()
        rows = torch.nonzero(slot >= 0).squeeze(1)
        order = rows[torch.argsort(slot[rows], stable=True)]
        example = slot[order]
        counts = torch.bincount(example, minlength=members)
        starts = torch.cumsum(counts, 0) - counts
        position = torch.arange(order.numel(), device=index.device) - starts[example]
        parts.append(RowGroup(group, order, example, position, members, int(counts.max()) if order.numel() else 0))
    return RowLayout(tuple(parts), examples, index.cpu(), batch)
