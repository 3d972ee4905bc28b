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
gradient exactly (the zero rows add nothing).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RowLayout:
    """Where each row of an input goes in the [examples, most, ...] layout."""
    order: torch.Tensor      # rows sorted by example (stable)
    example: torch.Tensor    # the example of each sorted row
    position: torch.Tensor   # its place among its example's rows
    examples: int
    most: int                # rows of the largest example
    index: torch.Tensor      # the index given, on the CPU (two indices of one length are told apart)

    def spread(self, rows: torch.Tensor) -> torch.Tensor:
        """[rows, ...] -> [examples, most, ...], zeros where an example has fewer rows."""
        out = rows.new_zeros((self.examples, self.most, *rows.shape[1:]))
        order, example, position = (t.to(rows.device) for t in (self.order, self.example, self.position))
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
                self.layouts[rows] = _layout(index, num_examples)

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


def _layout(index: torch.Tensor, examples: int) -> RowLayout:
    order = torch.argsort(index, stable=True)
    example = index[order]
    counts = torch.bincount(index, minlength=examples)
    starts = torch.cumsum(counts, 0) - counts
    position = torch.arange(index.numel(), device=index.device) - starts[example]
    return RowLayout(order, example, position, examples, int(counts.max()) if index.numel() else 0, index.cpu())
