"""Remove the weights of units nobody listens to.

Group ARD prunes whole input neurons of a Linear layer (or whole filters): once every weight
leaving a unit is pruned, the weights that feed it (its row, or its filter) no longer change the
network's output, yet per-input grouping cannot prune them. `prune_unused_units` finds them in a
chain of layers (nn.Sequential: Linear / Conv2d separated by element-wise layers, pooling,
dropout and Flatten) and drops them from the masks; the function the network computes is
unchanged. It iterates from the last layer back, since emptying a row can silence the units
below it.
"""
from __future__ import annotations

import torch
from torch import nn

PRUNABLE = (nn.Linear, nn.Conv2d)
# layers that keep unit j of their input as unit j (channel j) of their output
PASS_THROUGH = (nn.ReLU, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.Identity,
                nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d,
                nn.Dropout, nn.Dropout2d, nn.Flatten)


def _chain(model: nn.Module) -> list[tuple[str, nn.Module, bool]] | None:
    """The prunable layers of a Sequential in order, each with whether an nn.Flatten sits between
    it and the prunable layer before it; None when something else sits between."""
    if not isinstance(model, nn.Sequential):
        return None
    chain, flattened = [], False
    for name, module in model.named_children():
        if isinstance(module, PRUNABLE):
            chain.append((name, module, flattened))
            flattened = False
        elif isinstance(module, nn.Flatten) and (module.start_dim, module.end_dim) == (1, -1):
            flattened = True
        elif isinstance(module, nn.Flatten) or not isinstance(module, PASS_THROUGH):
            return None
    return chain


def _listened_units(producer: nn.Module, consumer: nn.Module, mask: torch.Tensor,
                    flattened: bool) -> torch.Tensor | None:
    """Which of the producer's output units have a kept weight in `consumer` (bool, (units,)), or
    None where the consumer's inputs are not the producer's units in a known order. A Conv2d's
    channels reach a Linear only through nn.Flatten (channel-major: C x H x W); without it the
    Linear reads the width axis. A Linear's units reach the next Linear as its last dimension,
    which a Flatten of a 3-D (N, T, units) output would interleave with T."""
    units = producer.weight.shape[0]
    per_input = mask.transpose(0, 1).reshape(mask.shape[1], -1).any(1)  # per input (channel)
    if isinstance(producer, nn.Conv2d) and isinstance(consumer, nn.Linear):
        if not flattened or per_input.numel() % units:
            return None
        return per_input.reshape(units, -1).any(1)
    if isinstance(producer, nn.Conv2d) and flattened:   # a conv cannot read flattened features
        return None
    return per_input if per_input.numel() == units else None


@torch.no_grad()
def prune_unused_units(model: nn.Module, masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Given {layer name: bool mask of kept weights} for the layers of an nn.Sequential, return
    new masks without the weights of units whose every outgoing weight is pruned. A model that is
    not such a chain, or a layer without a mask, is left as it is."""
    chain = _chain(model)
    masks = dict(masks)
    if not chain:
        return masks
    for (name, producer, _), (next_name, consumer, flattened) in reversed(list(zip(chain, chain[1:]))):
        if name not in masks or next_name not in masks:
            continue
        listened = _listened_units(producer, consumer, masks[next_name], flattened)
        if listened is None:
            continue
        shape = (-1,) + (1,) * (masks[name].dim() - 1)
        masks[name] = masks[name] & listened.reshape(shape)
    return masks
