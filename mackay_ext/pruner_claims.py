"""One MacKayPruner per weight.

A pruner's hooks stay live until its detach(): a second pruner over the same weights (a notebook
cell run twice, a pruner rebuilt for a new phase) would apply the prior and the masks twice,
with two alphas that disagree. Pruners over different layers of one model (layers=[...]) are
fine. The registry holds weak references only: a pruner that is garbage releases its weights.
"""
from __future__ import annotations

import gc
import weakref
from typing import Any, Iterable

import torch

# id(weight) -> (the weight, the pruner that puts its prior on it), both weakly. Not a
# WeakKeyDictionary: its lookups compare tensors with ==, which is elementwise.
_CLAIMS: dict[int, tuple[weakref.ref, weakref.ref]] = {}


def holder_of(param: torch.Tensor) -> Any | None:
    """The live pruner that puts its prior on `param`, or None."""
    entry = _CLAIMS.get(id(param))
    if entry is None:
        return None
    weight, pruner = entry[0](), entry[1]()
    if weight is not param or pruner is None:   # an id reused, or a pruner gone
        del _CLAIMS[id(param)]
        return None
    return pruner


def claimed(named_params: Iterable[tuple[str, torch.Tensor]]) -> list[str]:
    """Names of the weights another live pruner already puts a prior on."""
    named_params = list(named_params)
    taken = [name for name, param in named_params if holder_of(param) is not None]
    if taken:   # a pruner left in a reference cycle (e.g. with its old optimizer) may be garbage
        gc.collect()
        taken = [name for name, param in named_params if holder_of(param) is not None]
    return taken


def claim(pruner: Any, params: Iterable[torch.Tensor]) -> None:
    for key in [key for key, (weight, holder) in _CLAIMS.items() if weight() is None or holder() is None]:
        del _CLAIMS[key]
    ref = weakref.ref(pruner)
    for param in params:
        _CLAIMS[id(param)] = (weakref.ref(param), ref)


def release(pruner: Any) -> None:
    for key in [key for key, (_, ref) in _CLAIMS.items() if ref() is pruner]:
        del _CLAIMS[key]


def attached_pruners(model: torch.nn.Module) -> list[Any]:
    """The live pruners (not detached) that put a prior on some weight of `model`."""
    found = []
    for param in model.parameters():
        holder = holder_of(param)
        if holder is not None and all(holder is not f for f in found):
            found.append(holder)
    return found
