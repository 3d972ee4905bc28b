"""Pruned weights stay at 0 whichever optimizer steps them.

A pruner holds its pruned weights at 0 through the optimizer it was built with (MacKayAdam's
fused step, or its step hooks on a torch optimizer). A common recipe then fine-tunes with a new
optimizer (SGD after ARD, or a MacKayAdam rebuilt for another schedule), which knows nothing of
the pruning: with MacKayAdam the pruned weights grew back (692 -> 2,268 non-zero in a new user's
run) while report() still counted 692. torch's global optimizer step hook sees every step: after
a step of another optimizer that holds one of the pruner's weights, the pruned entries are zeroed
again, and the step is counted so that update() can say its curvature was not read there.
"""
from __future__ import annotations

import weakref
from typing import Any

from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.utils.hooks import RemovableHandle


def watch_foreign_steps(pruner: Any) -> RemovableHandle:
    """Register the global hook for `pruner` (held weakly: a pruner dropped without detach()
    leaves a hook that does nothing, and is removed with it). Returns the handle detach() removes."""
    ref = weakref.ref(pruner)
    holds: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()   # optimizer -> (params, holds ours)

    def after_step(optimizer, args, kwargs) -> None:
        pruner = ref()
        if pruner is None or pruner.detached or optimizer is pruner.optimizer:
            return
        count = sum(len(group["params"]) for group in optimizer.param_groups)
        known = holds.get(optimizer)
        if known is None or known[0] != count:   # param groups added since: look again
            ours = {id(target.param) for target in pruner.targets.values()}
            known = (count, any(id(p) in ours for group in optimizer.param_groups for p in group["params"]))
            holds[optimizer] = known
        if known[1]:
            pruner.apply_masks()
            pruner.foreign_steps[type(optimizer).__name__] = pruner.foreign_steps.get(type(optimizer).__name__, 0) + 1

    handle = register_optimizer_step_post_hook(after_step)
    weakref.finalize(pruner, handle.remove)
    return handle
