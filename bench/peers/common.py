"""What the peers share: one training loop (the harness's batches, shifts and Adam), masks that
hold pruned weights at zero, and the counts every row reports.

The loop draws each epoch's batch order and shifts from a generator seeded by (seed, tag), as the
library's Trainer does, so two methods given the same tags see the same batches."""
from __future__ import annotations

import copy
import math
from collections.abc import Callable

import torch
from torch import nn

from mackay_ext.data import Splits, random_shift
from mackay_ext.train import evaluate

Masks = dict[nn.Parameter, torch.Tensor]


def prunable(model: nn.Module) -> list[nn.Module]:
    """The layers whose weights count (and are pruned): every Linear and Conv2d, in order."""
    return [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def apply_masks(masks: Masks) -> None:
    with torch.no_grad():
        for param, mask in masks.items():
            param.mul_(mask)


def masks_from_zeros(model: nn.Module) -> Masks:
    """Hold every weight that is exactly zero now at zero from here on."""
    return {m.weight: (m.weight.detach() != 0).to(m.weight.dtype) for m in prunable(model)}


def train(model: nn.Module, data: Splits, *, epochs: int, lr: float, seed: int, tag: int,
          shift: int, batch_size: int = 128, cosine: bool = False, keep_best: bool = False,
          extra_loss: Callable[[int, int], torch.Tensor] | None = None,
          after_step: Callable[[int], None] | None = None, masks: Masks | None = None,
          log: Callable[[str], None] = lambda message: None) -> nn.Module:
    """Adam on cross-entropy (+ extra_loss(epoch, step), already scaled per example) for `epochs`
    epochs. after_step(global_step) runs after every optimizer step, then the masks are applied.
    cosine: the lr anneals to 0 over the phase (as the recipes' fine-tuning); keep_best: the
    weights of the best validation accuracy are restored at the end (as the recipes' fine-tuning)."""
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(epochs, 1)) if cosine else None
    num_data = len(data.x_train)
    best_accuracy, best_state, step = -1.0, None, 0
    for epoch in range(epochs):
        generator = torch.Generator().manual_seed(seed * 100003 + tag + epoch)
        order = torch.randperm(num_data, generator=generator)
        model.train()
        total = 0.0
        for start in range(0, num_data, batch_size):
            index = order[start:start + batch_size]
            xb, yb = data.x_train[index], data.y_train[index]
            if shift:
                xb = random_shift(xb, shift, generator=generator)
            loss = nn.functional.cross_entropy(model(xb), yb)
            if extra_loss is not None:
                loss = loss + extra_loss(epoch, step)
            value = float(loss.detach())
            if not math.isfinite(value):
                raise FloatingPointError(f"loss is {value} at epoch {epoch + 1}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            if after_step is not None:
                after_step(step)
            if masks:
                apply_masks(masks)
            total += value * len(yb)
        if scheduler is not None:
            scheduler.step()
        accuracy = evaluate(model, data.x_val, data.y_val)[0]
        log(f"    epoch {epoch + 1}/{epochs}: loss {total / num_data:.4f} val acc {accuracy:.4f}")
        if keep_best and accuracy > best_accuracy:
            best_accuracy, best_state = accuracy, copy.deepcopy(model.state_dict())
    if keep_best and best_state is not None:
        model.load_state_dict(best_state)
    return model


# ------------------------------------------------------------------------------ the counts
def weights_kept(model: nn.Module) -> tuple[int, int]:
    """(nonzero, total) weights of the prunable layers (biases are not counted, as in the table)."""
    layers = prunable(model)
    return (sum(int((m.weight != 0).sum()) for m in layers), sum(m.weight.numel() for m in layers))


def _nonzero_map(layer: nn.Module) -> torch.Tensor:
    """(outputs, inputs): whether a weight connects them (a conv kernel collapsed)."""
    return (layer.weight.detach() != 0).flatten(2).any(2) if layer.weight.dim() > 2 else \
        layer.weight.detach() != 0


def _expand(alive: torch.Tensor, width: int) -> torch.Tensor:
    """Channels flattened into a Linear's features (channel-major, as nn.Flatten lays them)."""
    return alive if alive.numel() == width else alive.repeat_interleave(width // alive.numel())


def _collapse(alive: torch.Tensor, channels: int) -> torch.Tensor:
    return alive if alive.numel() == channels else alive.view(channels, -1).any(1)


def alive_units(model: nn.Module) -> list[torch.Tensor]:
    """For a chain of Linear / Conv2d layers, the live units at each boundary: [inputs of the
    first layer, outputs of layer 1, ..., logits]. A unit lives when a nonzero weight connects it
    to a live unit on both sides (iterated to a fixed point); one with no live input outputs a
    constant (its bias through the activation), which folds into its consumers' biases exactly
    in these chains (no padding between a conv and its consumer in the LeNets), and one nobody
    reads can go. The inputs count as live, the logits always do."""
    layers = prunable(model)
    for layer in layers:
        if isinstance(layer, nn.Conv2d) and layer.groups != 1:
            raise ValueError("alive_units: grouped convolutions are not counted")
    maps = [_nonzero_map(layer) for layer in layers]
    alive = [torch.ones(maps[0].shape[1], dtype=torch.bool)] + [
        torch.ones(m.shape[0], dtype=torch.bool) for m in maps]
    while True:
        before = [a.clone() for a in alive]
        for i, connections in enumerate(maps):            # forward: fed by a live input
            fed = (connections & _expand(alive[i], connections.shape[1])[None, :]).any(1)
            if i + 1 < len(maps):
                alive[i + 1] &= fed
        for i in reversed(range(len(maps))):              # backward: read by a live output
            read = (connections := maps[i])[alive[i + 1]].any(0)
            alive[i] &= _collapse(read, alive[i].numel())
        if all(torch.equal(a, b) for a, b in zip(alive, before)):
            return alive


@torch.no_grad()
def macs_without_dead_units(model: nn.Sequential, input_shape: tuple[int, ...]) -> tuple[int, int]:
    """(MACs per example of the network with its dead units removed, MACs of the full network)
    for a chain of Conv2d / Linear with shape-preserving or pooling layers between (the
    LeNets); see alive_units."""
    layers = prunable(model)
    positions: list[int] = []
    hooks = [m.register_forward_hook(lambda m, i, o: positions.append(math.prod(o.shape[2:])))
             for m in layers]
    model.eval()(torch.zeros(1, *input_shape))
    for hook in hooks:
        hook.remove()
    alive = alive_units(model)
    full = pruned = 0
    for i, layer in enumerate(layers):
        per_pair = layer.weight[0, 0].numel() * positions[i]  # kernel area x output positions
        inputs = _expand(alive[i], layer.weight.shape[1])
        full += layer.weight.shape[0] * layer.weight.shape[1] * per_pair
        pruned += int(alive[i + 1].sum()) * int(inputs.sum()) * per_pair
    return pruned, full


def surviving_architecture(model: nn.Module) -> list[int]:
    """Live inputs of the first layer, then the live output units of each layer: e.g.
    491-187-85-10 for LeNet-300-100."""
    return [int(a.sum()) for a in alive_units(model)]
