"""Gradual magnitude pruning (Zhu and Gupta 2017, "To prune, or not to prune").

The sparsity rises from 0 to its final value s_f along the cubic schedule
    s_t = s_f (1 - (1 - (t - t_0) / (n dt))^3),   t_0 <= t <= t_0 + n dt,
pruning every dt optimizer steps; each time, the globally smallest |w| over every Linear and
Conv2d weight (the weights kept so far compete with each other; pruned ones stay pruned) are
set to zero and held there. Training then goes on with the masks fixed: the rest of the pruning
phase, then the fine-tuning epochs (cosine lr, best validation weights), which is the MacKay
recipes' budget and shape after the dense network.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from mackay_ext.data import Splits

from . import common


def cubic_sparsity(step: int, final: float, start: int, end: int) -> float:
    """Zhu and Gupta's schedule: 0 before `start`, `final` from `end` on, cubic in between."""
    if step <= start:
        return 0.0
    if step >= end:
        return final
    return final * (1 - (1 - (step - start) / (end - start)) ** 3)


@torch.no_grad()
def prune_globally(layers: list[nn.Module], masks: common.Masks, keep: int) -> None:
    """Keep the `keep` largest |w| over all layers' weights (among those not yet pruned)."""
    scores = torch.cat([(m.weight.abs() * masks[m.weight]).flatten() for m in layers])
    if keep >= scores.numel():
        return
    # rank instead of comparing with a threshold, so ties still keep exactly `keep`; pruned
    # weights score 0 and rank last, so they stay pruned
    order = torch.argsort(scores, descending=True, stable=True)
    flat = torch.zeros_like(scores)
    flat[order[:keep]] = 1.0
    offset = 0
    for m in layers:
        n = m.weight.numel()
        masks[m.weight].copy_(flat[offset:offset + n].view_as(m.weight))
        offset += n
    common.apply_masks(masks)


def run(model: nn.Module, data: Splits, *, keep: int, prune_epochs: int, finetune_epochs: int,
        lr: float, finetune_lr: float, seed: int, shift: int, batch_size: int = 128,
        prune_every: int = 100, ramp_fraction: float = 0.75,
        log: Callable[[str], None] = lambda message: None) -> nn.Module:
    """Prune `model` (a trained dense network, changed in place) to `keep` weights: the cubic
    ramp over the first `ramp_fraction` of the pruning phase's steps, then training with the
    masks fixed, then fine-tuning."""
    layers = common.prunable(model)
    total = sum(m.weight.numel() for m in layers)
    if not 0 < keep <= total:
        raise ValueError(f"gmp: keep must be in 1..{total}, got {keep}")
    masks = {m.weight: torch.ones_like(m.weight) for m in layers}
    steps_per_epoch = -(-len(data.x_train) // batch_size)
    end = max(1, int(ramp_fraction * prune_epochs * steps_per_epoch))
    final = 1 - keep / total

    def after_step(step: int) -> None:
        if step % prune_every == 0 or step == end:
            kept_now = round(total * (1 - cubic_sparsity(step, final, 0, end)))
            prune_globally(layers, masks, max(kept_now, keep))

    common.train(model, data, epochs=prune_epochs, lr=lr, seed=seed, tag=1000, shift=shift,
                 batch_size=batch_size, after_step=after_step, masks=masks, log=log)
    prune_globally(layers, masks, keep)  # a phase shorter than the ramp still ends at `keep`
    common.train(model, data, epochs=finetune_epochs, lr=finetune_lr, seed=seed, tag=1_000_000,
                 shift=shift, batch_size=batch_size, cosine=True, keep_best=True, masks=masks, log=log)
    return model
